"""Box conversions, IoU and generalised IoU (Rezatofighi et al., CVPR 2019) for the matcher and
the box losses.

Same formulas and conventions as ``sam3.model.box_ops``, with one deliberate difference: every
division is guarded. Vessel boxes can be degenerate — a straight vertical segment has zero
width — and a predicted box can collapse to a line; SAM3's formulas then divide 0 by 0 and the
NaN reaches the loss and the gradient. Here unions and enclosing areas are clamped to
``AREA_EPS`` (far below one pixel², 1/1008² ≈ 1e-6 in normalised units), so ordinary boxes give
bit-identical results and degenerate ones give a finite IoU of 0 and a finite gradient.

Box formats (all normalised to [0, 1] unless said otherwise):
    cxcywh  (..., 4)  centre x, centre y, width, height — what the model predicts
    xyxy    (..., 4)  x0, y0, x1, y1
"""

from __future__ import annotations

import torch

AREA_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh → (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy → (..., 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy → (...,) area (may be 0 for degenerate boxes)."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return (x1 - x0) * (y1 - y0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes.

    boxes1 (..., N, 4), boxes2 (..., M, 4) → iou (..., N, M), union (..., N, M) (union clamped).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area1[..., :, None] + area2[..., None, :] - inter).clamp(min=AREA_EPS)
    return inter / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU in [-1, 1]: boxes1 (..., N, 4), boxes2 (..., M, 4) xyxy → (..., N, M)."""
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = (wh[..., 0] * wh[..., 1]).clamp(min=AREA_EPS)
    return iou - (enclosing - union) / enclosing


def _diag_terms(boxes1: torch.Tensor, boxes2: torch.Tensor):
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"paired boxes need equal shapes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(-1)
    inter = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(-1)
    union = (area1 + area2 - inter).clamp(min=AREA_EPS)
    return inter, union


def diag_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of paired xyxy boxes: (N, 4), (N, 4) → (N,)."""
    inter, union = _diag_terms(boxes1, boxes2)
    return inter / union


def diag_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of paired xyxy boxes: (N, 4), (N, 4) → (N,) in [-1, 1]."""
    inter, union = _diag_terms(boxes1, boxes2)
    lt = torch.min(boxes1[:, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1).clamp(min=AREA_EPS)
    return inter / union - (enclosing - union) / enclosing


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around binary masks, in PIXELS, SAM3's convention (x1 = last column + 1).

    masks (N, H, W) bool/0-1 → (N, 4) xyxy float; an empty mask gives (0, 0, 0, 0).
    """
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), device=masks.device)
    masks = masks.bool()
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = torch.tensor(1e8, device=masks.device)
    x0 = torch.where(cols, xs, big).min(dim=1).values
    x1 = torch.where(cols, xs, -big).max(dim=1).values + 1
    y0 = torch.where(rows, ys, big).min(dim=1).values
    y1 = torch.where(rows, ys, -big).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return boxes * masks.flatten(1).any(dim=1, keepdim=True)


def pad_packed(packed: torch.Tensor, num_per_query: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
    """Packed rows (N, ...) with counts (B,) → padded (B, max_count, ...) (SAM3's ``*_padded``)."""
    counts = num_per_query.tolist()
    width = max(counts, default=0)
    out = packed.new_full((len(counts), width, *packed.shape[1:]), pad_value)
    start = 0
    for b, n in enumerate(counts):
        out[b, :n] = packed[start : start + n]
        start += n
    return out
