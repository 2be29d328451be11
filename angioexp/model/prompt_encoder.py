"""Prompt encoder (SAM3's ``language_backbone``): text, points, boxes and the view as tokens.

Text: a word-level vocabulary over the segment prompts of :mod:`angioexp.segments`, so that
"proximal / mid / distal right coronary artery" share the words they share and differ in the
word that differs. Words outside the vocabulary map to ``<unk>`` (a user prompt still runs).
Points: sine positional encoding of (x, y) + a positive/negative label embedding (SAM-style).
Boxes: the two corners encoded like points, each with its own corner embedding.
View: one token for the C-arm view class (from primary/secondary angles; "unknown" when the
angles are missing or the image was mirrored by augmentation).

All tokens share the model width D and come with a padding mask, so a batch can mix prompts.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from angioexp.segments import SEGMENTS, STAGE1_PROMPT

PAD, UNK = 0, 1
MAX_TEXT_TOKENS = 8


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class PromptTokenizer:
    """Fixed, deterministic word vocabulary (stored with the model's config, never learned from
    data, so a checkpoint's embedding rows always mean the same words)."""

    def __init__(self, extra_prompts: tuple[str, ...] = ()):
        words = set(_words(STAGE1_PROMPT))
        for seg in SEGMENTS:
            words.update(_words(seg.prompt))
            words.update(_words(seg.slug.replace("_", " ")))
        for text in extra_prompts:
            words.update(_words(text))
        self.vocab = ["<pad>", "<unk>", *sorted(words)]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(w, UNK) for w in _words(text)][:MAX_TEXT_TOKENS]
        return ids or [UNK]

    def batch(self, texts: list[str]) -> torch.Tensor:
        """list of B strings → (B, T) long, padded with PAD."""
        encoded = [self.encode(t) for t in texts]
        out = torch.full((len(texts), max(len(e) for e in encoded) if encoded else 1), PAD, dtype=torch.long)
        for i, ids in enumerate(encoded):
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def sine_embed(xy: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Normalised coordinates (..., 2) in [0, 1] → (..., dim) sine/cosine features (DETR)."""
    assert dim % 4 == 0, "dim must be divisible by 4"
    quarter = dim // 4
    freqs = temperature ** (torch.arange(quarter, device=xy.device, dtype=torch.float32) / quarter)
    angles = xy.float().unsqueeze(-1) * (2 * math.pi) / freqs  # (..., 2, quarter)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2, dim/2)
    return emb.flatten(-2)


def grid_positions(h: int, w: int, device=None) -> torch.Tensor:
    """Cell centres of an h×w grid, normalised: (h*w, 2) as (x, y)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


class PromptEncoder(nn.Module):
    """(text ids, points, boxes, view) → prompt tokens.

    Inputs (B find queries):
        text_ids      (B, T) long, PAD = 0 (a row of PADs = no text prompt)
        point_coords  (B, P, 2) float, normalised (x, y)
        point_labels  (B, P) long: 1 positive, 0 negative, -1 padding
        boxes         (B, K, 4) float, normalised x0, y0, x1, y1
        box_valid     (B, K) bool
        views         (B,) long view class, num_views = unknown
    Output:
        tokens        (B, T + P + 2K + 1, D)
        padding_mask  (B, T + P + 2K + 1) bool, True = ignore
    """

    def __init__(self, vocab_size: int, d_model: int, num_views: int, use_view: bool = True):
        super().__init__()
        self.d_model = d_model
        self.text_embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.text_pos = nn.Embedding(MAX_TEXT_TOKENS, d_model)
        # A light contextualiser so word order ("mid" before "right coronary") can matter.
        self.text_mixer = nn.TransformerEncoderLayer(
            d_model, nhead=max(1, d_model // 32), dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.point_label_embed = nn.Embedding(2, d_model)  # negative, positive
        self.box_corner_embed = nn.Embedding(2, d_model)  # top-left, bottom-right
        self.geo_proj = nn.Linear(d_model, d_model)
        self.use_view = use_view
        self.view_embed = nn.Embedding(num_views + 1, d_model)  # last row: unknown view
        self.num_views = num_views
        self.norm = nn.LayerNorm(d_model)

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(C, T) text ids → (C, D): one embedding per prompt (mean of its contextualised words),
        what the segment-identity head turns into a per-pixel classifier."""
        t = text_ids.shape[1]
        pad = text_ids == PAD
        text = self.text_embed(text_ids) + self.text_pos(torch.arange(t, device=text_ids.device))
        text = self.text_mixer(text, src_key_padding_mask=pad & ~pad.all(dim=1, keepdim=True))
        keep = (~pad).unsqueeze(-1).to(text.dtype)
        return self.norm((text * keep).sum(1) / keep.sum(1).clamp(min=1))

    def forward(
        self,
        text_ids: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        boxes: torch.Tensor,
        box_valid: torch.Tensor,
        views: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = text_ids.shape
        text_pad = text_ids == PAD
        text = self.text_embed(text_ids) + self.text_pos(torch.arange(t, device=text_ids.device))
        if (~text_pad).any():
            # Rows that are all padding would make attention NaN; let them attend to themselves.
            safe_pad = text_pad & ~text_pad.all(dim=1, keepdim=True)
            text = self.text_mixer(text, src_key_padding_mask=safe_pad)
        tokens, pads = [text], [text_pad]

        if point_coords.shape[1]:
            label = point_labels.clamp(min=0)
            pts = self.geo_proj(sine_embed(point_coords, self.d_model)) + self.point_label_embed(label)
            tokens.append(pts)
            pads.append(point_labels < 0)
        if boxes.shape[1]:
            corners = boxes.reshape(b, -1, 2, 2)  # (B, K, 2 corners, xy)
            box_tok = self.geo_proj(sine_embed(corners, self.d_model)) + self.box_corner_embed.weight
            tokens.append(box_tok.reshape(b, -1, self.d_model))
            pads.append(~box_valid.repeat_interleave(2, dim=1))
        view_ids = views if self.use_view else torch.full_like(views, self.num_views)
        tokens.append(self.view_embed(view_ids).unsqueeze(1))
        pads.append(torch.zeros(b, 1, dtype=torch.bool, device=text_ids.device))
        return self.norm(torch.cat(tokens, dim=1)), torch.cat(pads, dim=1)
