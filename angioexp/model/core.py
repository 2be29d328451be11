"""``CoreModel``: the CPU-trainable model with SAM3's interface and objective.

A *find query* is one (image, prompt) pair, as in SAM3: the image is encoded once, every find
query on it reuses the encoding. Parameter names carry SAM3's three LR groups:

    vision_backbone.*    the image encoder           (scratch.lr_vision_backbone, layer decay)
    language_backbone.*  text / point / box / view prompt tokens (scratch.lr_language_backbone)
    transformer.*        pixel decoder, fusion, query decoder, heads (scratch.lr_transformer)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from angioexp.model.encoder import ImageEncoder
from angioexp.model.heads import Heads, ViewHead
from angioexp.model.identity import SegmentIdentityHead
from angioexp.model.pixel_decoder import PixelDecoder
from angioexp.model.prompt_encoder import PromptEncoder, grid_positions, sine_embed
from angioexp.model.query_decoder import ContextEncoder, PromptFusion, QueryDecoder

# Fixed intensity normalisation for 8-bit angiograms (inference and training must agree, and a
# per-crop statistic would differ between a training crop and the whole image at eval).
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


@dataclass
class FindQueries:
    """The prompts of B find queries over I images (padded; see PromptEncoder for layouts)."""

    img_idx: torch.Tensor  # (B,) long, which image each find query is about
    text_ids: torch.Tensor  # (B, T) long
    point_coords: torch.Tensor  # (B, P, 2) float, normalised x, y
    point_labels: torch.Tensor  # (B, P) long, 1 / 0 / -1 = pad
    boxes: torch.Tensor  # (B, K, 4) float, normalised xyxy
    box_valid: torch.Tensor  # (B, K) bool
    views: torch.Tensor  # (I,) long view class per image; num_views = unknown
    # (C, T) long: the text of every prompt of the category set, for the segment-identity head
    # (one softmax over all of them per pixel); None when it is not asked for
    class_text_ids: torch.Tensor | None = None

    def to(self, device) -> "FindQueries":
        return FindQueries(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                              for f in fields(self)})

    def __len__(self) -> int:
        return int(self.img_idx.shape[0])


class Transformer(nn.Module):
    """Everything SAM3 trains at ``lr_transformer``: pixel decoder, fusion, decoder, heads."""

    def __init__(self, encoder: ImageEncoder, d_model: int, num_heads: int, num_layers: int, num_queries: int, mask_dim: int, num_views: int,
                 mask_guided_boxes: bool = True, context_layers: int = 0, region_masks: bool = False,
                 identity_head: bool = False, identity_levels: int = 0, presence_evidence: bool = False):
        super().__init__()
        self.pixel_decoder = PixelDecoder(encoder.channels, encoder.stem_channels, mask_dim)
        self.memory_proj = nn.Linear(encoder.channels[-1], d_model)
        if context_layers:
            self.context = ContextEncoder(d_model, num_heads, context_layers)
            # Global context back into the CNN's coarsest map, so that the pixel decoder's
            # top-down path carries it to every pixel embedding. Starts at zero (a plain U-Net).
            self.context_to_pixels = nn.Linear(d_model, encoder.channels[-1])
            nn.init.zeros_(self.context_to_pixels.weight)
            nn.init.zeros_(self.context_to_pixels.bias)
        self.fusion = PromptFusion(d_model, num_heads)
        self.decoder = QueryDecoder(d_model, num_heads, num_layers, num_queries)
        self.heads = Heads(d_model, mask_dim, mask_guided_boxes, region_masks)
        self.view_head = ViewHead(encoder.channels[-1], num_views)
        if identity_head:
            levels = self.pixel_decoder.level_channels[:identity_levels]
            self.identity = SegmentIdentityHead(d_model, mask_dim, num_views, levels, presence_evidence)


class CoreModel(nn.Module):
    """images (I, 1, H, W) uint8 or float in [0, 255], FindQueries(B) → outputs dict.

    Output (the contract in :mod:`angioexp.losses`):
        pred_logits (B, Q, 1), pred_boxes (B, Q, 4), pred_boxes_xyxy (B, Q, 4),
        pred_masks (B, Q, H, W) — full input resolution,
        presence_logit_dec (B, 1), semantic_seg (B, 1, H, W), view_logits (I, V),
        with ``identity_head`` and ``queries.class_text_ids`` (C, T) also
        identity_logits (I, 1 + C, H, W) (class 0 = background) and identity_presence (I, C),
        aux_outputs: list (decoder_layers - 1) of dicts with the first five keys (empty in eval mode).
    H and W must be multiples of 16.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_views: int,
        encoder_channels: tuple[int, ...] = (16, 32, 64, 96),
        stem_channels: int = 8,
        d_model: int = 96,
        num_heads: int = 4,
        decoder_layers: int = 2,
        num_queries: int = 8,
        mask_dim: int = 16,
        use_view_conditioning: bool = True,
        mask_guided_boxes: bool = True,
        semantic_mask_base: bool = False,
        context_layers: int = 0,
        region_masks: bool = False,
        identity_head: bool = False,
        identity_levels: int = 0,
        presence_evidence: bool = False,
    ):
        super().__init__()
        self.semantic_mask_base = semantic_mask_base
        self.num_views = num_views
        self.num_queries = num_queries
        self.vision_backbone = ImageEncoder(encoder_channels, stem_channels)
        self.language_backbone = PromptEncoder(vocab_size, d_model, num_views, use_view_conditioning)
        self.transformer = Transformer(self.vision_backbone, d_model, num_heads, decoder_layers, num_queries, mask_dim, num_views,
                                       mask_guided_boxes, context_layers, region_masks, identity_head, identity_levels,
                                       presence_evidence)
        self.d_model = d_model

    # Parameters of the optional Stage 2 aids (model.context_layers, model.region_masks). They
    # start at zero, so a checkpoint without them (a Stage 1 model) continues unchanged.
    OPTIONAL_PREFIXES = ("transformer.context.", "transformer.context_to_pixels.", "transformer.heads.region_",
                         "transformer.heads.semantic_region_", "transformer.identity.")

    @classmethod
    def is_optional_addition(cls, name: str) -> bool:
        return name.startswith(cls.OPTIONAL_PREFIXES)

    @property
    def stride(self) -> int:
        return self.vision_backbone.stride

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(I, 1, H, W) → pixel_embed (I, M, H, W), memory (I, h*w, D), coarse (I, C, h, w), and the
        pixel decoder's top-down maps that the identity head reads (coarsest first; often none)."""
        t = self.transformer
        x = (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
        x = x.contiguous(memory_format=torch.channels_last)
        feats = self.vision_backbone(x)
        coarse = feats[-1]
        memory = t.memory_proj(coarse.flatten(2).transpose(1, 2))  # (I, h*w, D)
        if hasattr(t, "context"):
            hc, wc = coarse.shape[-2:]
            memory = t.context(memory, self.memory_pos(hc, wc, memory.device))
            context = t.context_to_pixels(memory).transpose(1, 2).reshape(coarse.shape)
            feats = [*feats[:-1], coarse + context.contiguous(memory_format=torch.channels_last)]
        pixel_embed, levels = t.pixel_decoder(feats, len(t.identity.levels) if self.has_identity else 0)
        return pixel_embed, memory, coarse, levels

    def memory_pos(self, h: int, w: int, device) -> torch.Tensor:
        """Sine positions of the h×w stride-16 tokens: (h*w, D)."""
        return sine_embed(grid_positions(h, w, device=device), self.d_model)

    def forward(self, images: torch.Tensor, queries: FindQueries) -> dict:
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h}x{w} must be a multiple of {self.stride}")
        pixel_embed, memory, coarse, levels = self.encode_images(images)
        if len(queries):
            outputs = self.decode(pixel_embed, memory, coarse, queries)
        else:  # loss.per_prompt=false: no prompt to decode, the identity head below does the work
            outputs = {"view_logits": self.transformer.view_head(coarse)}
        if queries.class_text_ids is not None and self.has_identity:
            outputs["identity_logits"], outputs["identity_presence"] = self.identify(
                pixel_embed, memory, coarse, levels, queries.views, queries.class_text_ids)
        return outputs

    @property
    def has_identity(self) -> bool:
        return hasattr(self.transformer, "identity")

    def identify(self, pixel_embed, memory, coarse, levels, views: torch.Tensor, class_text_ids: torch.Tensor):
        """Encoded images + (C, T) prompt texts → identity logits (I, 1 + C, H, W), presence (I, C)."""
        prompts = self.language_backbone.encode_text(class_text_ids)
        return self.transformer.identity(pixel_embed, memory, tuple(coarse.shape[-2:]), views, prompts, levels)

    def decode(self, pixel_embed, memory, coarse, queries: FindQueries) -> dict:
        """Run the prompt-dependent part for B find queries on already-encoded images."""
        t = self.transformer
        idx = queries.img_idx
        prompt, prompt_pad = self.language_backbone(
            queries.text_ids, queries.point_coords, queries.point_labels, queries.boxes, queries.box_valid, queries.views[idx]
        )
        hc, wc = coarse.shape[-2:]
        memory_pos = self.memory_pos(hc, wc, memory.device)  # (L, D)
        query_memory = t.fusion(memory[idx], memory_pos, prompt, prompt_pad)  # (B, L, D)
        layer_tokens = t.decoder(prompt, prompt_pad, query_memory, memory_pos)
        region = {"memory": query_memory, "memory_hw": (hc, wc)}
        # Optionally every instance mask starts from its find query's semantic mask, which needs no
        # matching and so learns fast; the query term then only carves out its instance.
        base = t.heads.semantic(layer_tokens[-1], pixel_embed, idx, **region) if self.semantic_mask_base else None
        outputs = t.heads(layer_tokens[-1], pixel_embed, idx, semantic=base is None, mask_base=base, **region)
        if base is not None:
            outputs["semantic_seg"] = base
        # Deep supervision only while training: at inference the earlier layers would cost a
        # full-resolution (B, Q, H, W) mask tensor each for nothing.
        outputs["aux_outputs"] = [t.heads(tok, pixel_embed, idx, semantic=False, mask_base=base, **region)
                                  for tok in layer_tokens[:-1]] if self.training else []
        outputs["view_logits"] = t.view_head(coarse)
        return outputs
