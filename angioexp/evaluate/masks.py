"""Overlap measures for binary masks of thin structures: Dice, clDice, Boundary IoU, tolerant IoU.

Every mask is a bool numpy array of shape (H, W). Conventions shared by all measures:

* both masks empty → NaN ("not scored": nothing to find and nothing found carries no overlap
  information; callers leave such pairs out of their averages);
* exactly one mask empty → 0.0.

Distances are Euclidean and "within d px" means distance ≤ d (the digital disk of radius d:
for d = 1 the 4-neighbours). Morphology runs on the tight bounding box of the mask (zero
padded), so its cost follows the vessel's extent, not the frame's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.morphology import skeletonize

# ---------------------------------------------------------------------------------------------
# Morphology on bounding boxes


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (r0, r1, c0, c1), end-exclusive, of a bool (H, W) mask; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _pad(mask: np.ndarray, d: int) -> np.ndarray:
    """Zero-pad a bool (h, w) array by ``d`` on every side (C order; np.pad is slower here)."""
    h, w = mask.shape
    out = np.zeros((h + 2 * d, w + 2 * d), dtype=bool)
    out[d : d + h, d : d + w] = mask
    return out


def _dilate_array(mask: np.ndarray, d: int) -> np.ndarray:
    """Euclidean-disk dilation of a bool (h, w) array; pixels beyond its edge count as empty.

    The disk is decomposed into rows: a horizontal run of half-width ⌊√(d² − dy²)⌋ shifted
    by dy. Horizontal runs are built incrementally, so the cost is O(d) array passes.
    """
    h, w = mask.shape
    runs = [mask]  # runs[k]: dilation by the horizontal segment [-k, k]
    for k in range(1, d + 1):
        run = runs[-1].copy()
        run[:, k:] |= mask[:, : w - k]
        run[:, : w - k] |= mask[:, k:]
        runs.append(run)
    out = runs[d].copy()
    for dy in range(1, d + 1):
        half = int(np.floor(np.sqrt(d * d - dy * dy) + 1e-9))
        run = runs[half]
        out[dy:, :] |= run[: h - dy, :]
        out[: h - dy, :] |= run[dy:, :]
    return out


def dilate(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels within distance ``d`` of ``mask`` (bool (H, W) in and out)."""
    box = bbox(mask)
    if d <= 0 or box is None:
        return mask.copy()
    r0, r1, c0, c1 = box
    grown = _dilate_array(_pad(mask[r0:r1, c0:c1], d), d)
    out = np.zeros_like(mask)
    h, w = mask.shape
    # The padded crop starts d px before the box; clip what falls outside the frame.
    top, left = r0 - d, c0 - d
    rs, cs = max(top, 0), max(left, 0)
    re, ce = min(r1 + d, h), min(c1 + d, w)
    out[rs:re, cs:ce] = grown[rs - top : re - top, cs - left : ce - left]
    return out


def _band_of_box(box_mask: np.ndarray, d: int) -> np.ndarray:
    """Inner band of a mask given as its tight-box crop (everything outside is background)."""
    padded = _pad(box_mask, d)
    return (padded & _dilate_array(~padded, d))[d:-d, d:-d]


def _skeleton_of_box(box_mask: np.ndarray) -> np.ndarray:
    return skeletonize(_pad(box_mask, 1))[1:-1, 1:-1]


def boundary_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Inner boundary band: mask pixels within distance ``max(d, 1)`` of the background, bool (H, W).

    Pixels on the frame's edge count as boundary (the outside is background), as in Cheng et
    al.'s reference implementation, which zero-pads before eroding.
    """
    out = np.zeros_like(mask)
    box = bbox(mask)
    if box is not None:
        r0, r1, c0, c1 = box
        out[r0:r1, c0:c1] = _band_of_box(mask[r0:r1, c0:c1], max(int(d), 1))
    return out


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Morphological skeleton (scikit-image, Zhang's thinning), bool (H, W)."""
    out = np.zeros_like(mask)
    box = bbox(mask)
    if box is not None:
        r0, r1, c0, c1 = box
        out[r0:r1, c0:c1] = _skeleton_of_box(mask[r0:r1, c0:c1])
    return out


# ---------------------------------------------------------------------------------------------
# Per-mask features, computed once and reused for every pair the mask takes part in


@dataclass
class MaskFeatures:
    """What the pair measures need from one mask; skeletonised once.

    Pixel sets are (rows, cols) coordinate arrays, int32 — small for thin structures, so the
    truth's features can be cached across evaluations — and they index masks of any memory
    order (pycocotools decodes to Fortran order).
    """

    shape: tuple[int, int]
    area: int
    skeleton: tuple[np.ndarray, np.ndarray]  # (S,), (S,) skeleton pixels
    band: tuple[np.ndarray, np.ndarray]  # (B,), (B,) inner boundary band of width band_px
    band_px: int

    @classmethod
    def of(cls, mask: np.ndarray, band_px: int) -> MaskFeatures:
        mask = np.asarray(mask, dtype=bool)
        band_px = max(int(band_px), 1)
        box = bbox(mask)
        if box is None:
            none = (np.zeros(0, np.int32), np.zeros(0, np.int32))
            return cls(mask.shape, 0, none, none, band_px)
        r0, r1, c0, c1 = box
        crop = np.ascontiguousarray(mask[r0:r1, c0:c1])  # one C-order copy of the box, reused

        def coordinates(box_mask):
            rows, cols = np.nonzero(box_mask)
            return (rows + r0).astype(np.int32), (cols + c0).astype(np.int32)

        return cls(
            shape=mask.shape,
            area=int(np.count_nonzero(crop)),
            skeleton=coordinates(_skeleton_of_box(crop)),
            band=coordinates(_band_of_box(crop, band_px)),
            band_px=band_px,
        )


def pair_scores(pred: np.ndarray, pred_f: MaskFeatures, gt: np.ndarray, gt_f: MaskFeatures) -> dict[str, float]:
    """Dice, clDice and Boundary IoU of one prediction against one ground truth.

    pred, gt: bool (H, W); pred_f, gt_f: their features (same band width).
    Returns {"dice", "cldice", "biou"}: NaN when both masks are empty, 0 when one is.
    """
    if pred_f.band_px != gt_f.band_px:
        raise ValueError("pred and gt features use different band widths")
    if pred_f.area == 0 and gt_f.area == 0:
        return {"dice": float("nan"), "cldice": float("nan"), "biou": float("nan")}
    if pred_f.area == 0 or gt_f.area == 0:
        return {"dice": 0.0, "cldice": 0.0, "biou": 0.0}
    overlap = int(np.count_nonzero(pred & gt))
    dice_value = 2.0 * overlap / (pred_f.area + gt_f.area)

    # clDice (Shit et al., CVPR 2021): topology precision = share of the predicted skeleton
    # inside the truth, topology sensitivity = share of the true skeleton inside the prediction.
    t_prec = np.count_nonzero(gt[pred_f.skeleton]) / max(pred_f.skeleton[0].size, 1)
    t_sens = np.count_nonzero(pred[gt_f.skeleton]) / max(gt_f.skeleton[0].size, 1)
    cldice_value = 0.0 if t_prec + t_sens == 0 else 2.0 * t_prec * t_sens / (t_prec + t_sens)

    # Boundary IoU (Cheng et al., CVPR 2021): IoU of the two inner boundary bands.
    gt_band = np.zeros(gt_f.shape, dtype=bool)
    gt_band[gt_f.band] = True
    band_overlap = int(np.count_nonzero(gt_band[pred_f.band]))
    band_union = pred_f.band[0].size + gt_f.band[0].size - band_overlap
    biou_value = band_overlap / band_union if band_union else 0.0
    return {"dice": float(dice_value), "cldice": float(cldice_value), "biou": float(biou_value)}


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return float("nan")
    return 2.0 * np.count_nonzero(pred & gt) / total


def cldice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Centreline Dice (Shit et al., CVPR 2021) with scikit-image skeletons."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return pair_scores(pred, MaskFeatures.of(pred, 1), gt, MaskFeatures.of(gt, 1))["cldice"]


def boundary_iou(pred: np.ndarray, gt: np.ndarray, d: int = 1) -> float:
    """Boundary IoU (Cheng et al., CVPR 2021) with an inner band of ``d`` px (d ≥ 1)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return pair_scores(pred, MaskFeatures.of(pred, d), gt, MaskFeatures.of(gt, d))["biou"]


# ---------------------------------------------------------------------------------------------
# Boundary-tolerant IoU


def tolerant_iou_matrix(
    preds: list[np.ndarray], gts: list[np.ndarray], d: int, iscrowd: list[int] | None = None
) -> np.ndarray:
    """Boundary-tolerant IoU between every prediction and every ground-truth mask.

    preds: D bool (H, W) masks; gts: G bool (H, W) masks → (D, G) float64.

    A pixel of P outside G is forgiven when it lies within ``d`` px of G, and likewise for G:

        tolerant precision  p = |P ∩ dilate(G, d)| / |P|
        tolerant recall     r = |G ∩ dilate(P, d)| / |G|
        F = 2pr / (p + r),  tolerant IoU = F / (2 − F)

    These are the relaxed ("buffered") precision and recall long used for thin-structure
    extraction (road networks: Wiedemann et al. 1998's correctness/completeness; Mnih & Hinton,
    ECCV 2010), mapped to the IoU scale through the identity IoU = F/(2−F) that holds exactly
    between IoU and Dice. At d = 0, p and r are the plain precision and recall, F is Dice and the
    result is exactly the ordinary mask IoU, so COCO's thresholds keep their meaning. For a crowd
    ground truth the value is the tolerant precision, as COCO uses |P∩G|/|P| for crowds.
    Empty prediction or ground truth → 0 (as pycocotools).
    """
    iscrowd = list(iscrowd) if iscrowd is not None else [0] * len(gts)
    out = np.zeros((len(preds), len(gts)), dtype=np.float64)
    if not preds or not gts:
        return out
    gt_areas = [int(np.count_nonzero(g)) for g in gts]
    gt_grown = [dilate(g, d) for g in gts]
    for i, pred in enumerate(preds):
        pred_area = int(np.count_nonzero(pred))
        if pred_area == 0:
            continue
        pred_grown = dilate(pred, d)
        for j, gt in enumerate(gts):
            if gt_areas[j] == 0:
                continue
            p = np.count_nonzero(pred & gt_grown[j]) / pred_area
            if iscrowd[j]:
                out[i, j] = p
                continue
            r = np.count_nonzero(gt & pred_grown) / gt_areas[j]
            if p + r == 0:
                continue
            f = 2.0 * p * r / (p + r)
            out[i, j] = f / (2.0 - f)
    return out


def tolerant_iou(pred: np.ndarray, gt: np.ndarray, d: int = 1) -> float:
    """Boundary-tolerant IoU of one pair (see :func:`tolerant_iou_matrix`)."""
    return float(tolerant_iou_matrix([np.asarray(pred, bool)], [np.asarray(gt, bool)], d)[0, 0])
