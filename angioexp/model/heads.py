"""Prediction heads, shared across decoder layers (DETR): class, box, instance mask, presence,
semantic mask, and the auxiliary view classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from angioexp.losses.box_ops import box_cxcywh_to_xyxy


class MLP(nn.Module):
    """Linear layers with GELU between: (..., d_in) → (..., d_out)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.functional.gelu(x)
        return x


class Heads(nn.Module):
    """Decoder tokens + pixel embeddings → the losses contract's prediction keys.

    Input:  tokens (B, 2 + Q, D) one decoder layer's output (presence, semantic, queries)
            pixel_embed (I, M, H, W) per-pixel mask embeddings of the images
            img_idx (B,) long, the image of each find query
    Output: dict with pred_logits (B, Q, 1), pred_boxes (B, Q, 4) cxcywh in [0, 1],
            pred_boxes_xyxy (B, Q, 4), pred_masks (B, Q, H, W), presence_logit_dec (B, 1),
            and with ``semantic=True`` also semantic_seg (B, 1, H, W)

    Boxes (``mask_guided_boxes``): the extent of the query's own full-resolution mask, refined
    by the box MLP in logit space (its last layer starts at zero, so a box starts as its mask's
    extent). A box regressed from stride-16 tokens alone misses a 2-px-wide segment by more
    than its width (docs/decisions.md#mask-guided-boxes-scratchmask_guided_boxes), and IABCEMdetr's scores are
    trained towards box IoU — so bad boxes meant scores below 0.5 for good masks.

    Region term (``region_masks``): every mask (instance and semantic) is a factorised sum

        logits(p) = e_q · pixel_embed(p)  +  upsample(r_q · memory)(p)
                    fine: shape, thin edges   coarse: where this prompt's object lies

    where memory (B, L, D) is the find query's prompt-conditioned stride-16 image memory (after
    global self-attention). A Stage 2 segment is a thin piece of one tree: *whether* a pixel is
    vessel is a local question the full-resolution embedding answers well (Stage 1), *which*
    segment it belongs to is a global one that a 16-dim per-pixel embedding encodes poorly
    (docs/decisions.md#the-region-term-modelregion_masks). In logit space
    the sum acts as a soft AND when the fine term is asymmetric (vessel ≈ +a, background ≪ −a):
    the region term, bounded by it, switches vessels on or off by location. Its projections
    start at zero, so a model starts (and a Stage 1 checkpoint continues) as the fine term alone.
    """

    def __init__(self, d_model: int, mask_dim: int, mask_guided_boxes: bool = True, region_masks: bool = False):
        super().__init__()
        self.mask_guided_boxes = mask_guided_boxes
        self.region_masks = region_masks
        if region_masks:
            self.region_norm = nn.LayerNorm(d_model)
            self.region_embed = MLP(d_model, d_model, d_model, 2)
            self.semantic_region_embed = MLP(d_model, d_model, d_model, 2)
            for mlp in (self.region_embed, self.semantic_region_embed):
                nn.init.zeros_(mlp.layers[-1].weight)
                nn.init.zeros_(mlp.layers[-1].bias)
        self.class_embed = nn.Linear(d_model, 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        if mask_guided_boxes:
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.mask_embed = MLP(d_model, d_model, mask_dim, 3)
        self.presence_head = MLP(d_model, d_model, 1, 2)
        self.semantic_embed = MLP(d_model, d_model, mask_dim, 2)
        self.semantic_bias = nn.Parameter(torch.zeros(1))
        # Start at a prior of ≈ 0.12: low enough that the 1-of-Q matched query stands out, high
        # enough for IABCEMdetr's IoU-aware target p^α·IoU^(1−α), which bootstraps from p, to rise
        # quickly (DETR's 0.01 prior was slower: docs/decisions.md#class-prior--012).
        nn.init.constant_(self.class_embed.bias, -2.0)

    def region(self, embed: torch.Tensor, memory: torch.Tensor, memory_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
        """Coarse region logits: embed (B, K, D) · memory (B, h*w, D) → (B, K, H, W), bilinear."""
        b, k, _ = embed.shape
        coarse = torch.bmm(embed, self.region_norm(memory).transpose(1, 2)).view(b, k, *memory_hw)
        return F.interpolate(coarse, size=out_hw, mode="bilinear", align_corners=False)

    def semantic(self, tokens: torch.Tensor, pixel_embed: torch.Tensor, img_idx: torch.Tensor,
                 memory: torch.Tensor | None = None, memory_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The prompted concept's semantic mask logits (B, 1, H, W) from the semantic token."""
        sem_tok = tokens[:, 1:2]
        sem = per_image_dot(self.semantic_embed(sem_tok), pixel_embed, img_idx)
        if self.region_masks and memory is not None:
            sem = sem + self.region(self.semantic_region_embed(sem_tok), memory, memory_hw, sem.shape[-2:])
        return sem + self.semantic_bias

    def forward(self, tokens: torch.Tensor, pixel_embed: torch.Tensor, img_idx: torch.Tensor, semantic: bool,
                mask_base: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """``mask_base`` (B, 1, H, W), optional: logits every instance mask of a find query starts
        from (``model.semantic_mask_base``: the query's semantic mask). ``memory`` (B, h*w, D)
        with ``memory_hw`` = (h, w): the find queries' image memory for the region term."""
        presence_tok, queries = tokens[:, 0], tokens[:, 2:]
        masks = per_image_dot(self.mask_embed(queries), pixel_embed, img_idx)
        if self.region_masks and memory is not None:
            masks = masks + self.region(self.region_embed(queries), memory, memory_hw, masks.shape[-2:])
        sem = self.semantic(tokens, pixel_embed, img_idx, memory, memory_hw) if semantic else None
        if mask_base is not None:
            masks = masks + mask_base
        if self.mask_guided_boxes:
            prior = mask_extent_boxes(masks).clamp(1e-4, 1 - 1e-4)
            boxes = (torch.logit(prior) + self.bbox_embed(queries)).sigmoid()
        else:
            boxes = self.bbox_embed(queries).sigmoid()
        out = {
            "pred_logits": self.class_embed(queries),
            "pred_boxes": boxes,
            "pred_boxes_xyxy": box_cxcywh_to_xyxy(boxes),
            "pred_masks": masks,
            "presence_logit_dec": self.presence_head(presence_tok),
        }
        if semantic:
            out["semantic_seg"] = sem
        return out


def _soft_extent(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Occupancy per column (…, N) in [0, 1] → (first, last + 1) occupied position / N.

    ``Π_{x' ≤ x} (1 − occupancy)`` is the probability that nothing is occupied up to x; its sum
    is the expected index of the first occupied column — exact for a hard mask, differentiable
    for a soft one (gradients reach the mask logits at the extremes).
    """
    n = profile.shape[-1]
    empty = 1 - profile
    lo = torch.cumprod(empty, dim=-1).sum(-1) / n
    hi = 1 - torch.cumprod(empty.flip(-1), dim=-1).sum(-1) / n
    return lo, hi


def mask_extent_boxes(mask_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q, H, W) mask logits → (B, Q, 4) normalised cx, cy, w, h of each mask's extent.

    An empty mask gives a one-pixel box at the centre (its extents cross: lo ≈ 1, hi ≈ 0).
    """
    prob = mask_logits.float().sigmoid()
    h, w = prob.shape[-2:]
    x0, x1 = _soft_extent(prob.amax(dim=-2))
    y0, y1 = _soft_extent(prob.amax(dim=-1))
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0).clamp(min=1 / w), (y1 - y0).clamp(min=1 / h)], dim=-1)


def per_image_dot(embed: torch.Tensor, pixel_embed: torch.Tensor, img_idx: torch.Tensor) -> torch.Tensor:
    """embed (B, K, M) · pixel_embed (I, M, H, W) of each query's image → (B, K, H, W).

    Find queries are grouped by image (one matmul per image) instead of gathering
    ``pixel_embed[img_idx]``, which would copy a full-resolution (B, M, H, W) tensor; and the
    images are taken apart with one ``unbind`` — indexing them one by one costs a full-size
    zero-filled gradient per image in the backward pass (docs/decisions.md#one-matmul-per-image-in-per_image_dot).
    """
    b, k, m = embed.shape
    h, w = pixel_embed.shape[-2:]
    planes = pixel_embed.flatten(2).unbind(0)  # I × (M, H*W)
    if b == len(planes) and bool((img_idx == torch.arange(b, device=img_idx.device)).all()):
        return torch.bmm(embed, pixel_embed.flatten(2)).view(b, k, h, w)  # one query per image
    order = torch.argsort(img_idx, stable=True)
    counts = torch.bincount(img_idx, minlength=len(planes)).tolist()
    pieces = embed[order].split(counts)
    out = torch.cat([torch.matmul(piece, planes[i]) for i, piece in enumerate(pieces) if counts[i]])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(b, device=order.device)
    return out[inverse].view(b, k, h, w)


class ViewHead(nn.Module):
    """Auxiliary C-arm view classifier on globally pooled coarse features: (I, C, h, w) → (I, V)."""

    def __init__(self, channels: int, num_views: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, num_views))

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        return self.net(coarse.mean(dim=(-2, -1)))
