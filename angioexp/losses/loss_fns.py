"""SAM3's loss terms (``sam3/train/loss/loss_fns.py``), same names, same arithmetic.

Each term is one class with a ``weight_dict`` (term name → weight, used by the criterion to
form the total) and returns its terms UNWEIGHTED:

    Boxes                 loss_bbox, loss_giou                  (outputs, targets, indices, num_boxes)
    IABCEMdetr            loss_ce, presence_loss                (outputs, targets, indices, num_boxes)
    Masks                 loss_mask, loss_dice                  (outputs, targets, indices, num_boxes)
    SemanticSegCriterion  loss_semantic_seg, loss_semantic_dice, loss_semantic_presence   (outputs, targets)
    ViewCriterion         loss_view                             (outputs, targets)

Shapes follow the contract in ``angioexp.losses``. ``indices`` is the matcher's
(batch_idx, src_idx, tgt_idx) triple; ``num_boxes`` is the (global, ≥ 1) number of target
instances that instance terms are normalised by, as SAM3's ``Sam3LossWrapper(normalization=
"global")``.

Differences from SAM3, all deliberate and documented where they happen:
* GIoU/IoU are division-safe (``box_ops``): degenerate (zero-width) boxes give finite values.
* Mask targets can be resized to the prediction (``resize="targets_area"``, the default: an
  area average, so a 1-px vessel becomes a soft 0.25–0.5 target instead of vanishing or
  dilating) or SAM3's ways (``"predictions"``: upsample logits to the target, SAM3's ``Masks``
  and ``SemanticSegCriterion(downsample=False)``; ``"targets_sam3"``: bilinear then ``bool``,
  SAM3's ``SemanticSegCriterion(downsample=True)``).
* IABCEMdetr's presence target is "the find query has ≥ 1 target" (SAM3 also drops zero-size
  boxes, which mark invisible objects in its video data; a zero-width vessel box is visible).
* No torchmetrics side-metrics (ce_f1, accuracies); only losses are returned.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from angioexp.losses.box_ops import box_cxcywh_to_xyxy, diag_box_iou, diag_generalized_box_iou


ResizeMode = Literal["targets_area", "targets_sam3", "predictions"]
RESIZE_MODES: tuple[str, ...] = ("targets_area", "targets_sam3", "predictions")


# ---------------------------------------------------------------------------------------------
# Elementwise pieces


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise sigmoid focal loss (Lin et al., ICCV 2017); any shape in, same shape out.

    ``targets`` may be soft (in [0, 1]). ``alpha < 0`` disables the class balancing, as SAM3.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row soft Dice loss with SAM3's +1 smoothing: (N, P) logits, (N, P) targets → (N,)."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def _zero(reference: torch.Tensor) -> torch.Tensor:
    """A 0 that stays connected to the graph (DDP sees every parameter used; no NaN either)."""
    return reference.float().sum() * 0.0 + 0.0  # + 0.0 turns a -0.0 into 0.0


def resize_to(
    pred_logits: torch.Tensor, target: torch.Tensor, mode: ResizeMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring (N, h, w) logits and (N, H, W) binary/soft targets to one size.

    Returns (logits, targets), both (N, s, s') float32. See the module docstring for the modes.
    """
    target = target.float()
    if target.shape[0] == 0:
        return pred_logits, target.new_zeros((0, *pred_logits.shape[-2:]))
    if pred_logits.shape[-2:] == target.shape[-2:]:
        return pred_logits, target
    if mode == "predictions":
        up = F.interpolate(pred_logits[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)
        return up[:, 0], target
    size = pred_logits.shape[-2:]
    with torch.no_grad():
        if mode == "targets_sam3":
            resized = F.interpolate(target[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].bool().float()
        elif mode == "targets_area":
            if size[0] <= target.shape[-2] and size[1] <= target.shape[-1]:
                resized = F.adaptive_avg_pool2d(target[:, None], size)[:, 0]
            else:  # targets smaller than the prediction: interpolate
                resized = F.interpolate(target[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        else:
            raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    return pred_logits, resized


# ---------------------------------------------------------------------------------------------
# Importance sampling of mask points (PointRend, Kirillov et al., CVPR 2020), as SAM3's
# mask_sampling.py: the loss is evaluated at points where the prediction is least certain,
# which on thin vessels are exactly the boundary pixels.


def point_sample(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup: features (N, C, H, W), coords (N, P, 2) in [0, 1] (x, y) → (N, C, P)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (N, P, 1, 2) in [-1, 1]
    return F.grid_sample(features, grid, align_corners=False).squeeze(3)


def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (N, 1, h, w) → coords (N, num_points, 2) in [0, 1].

    Draw ``num_points·oversample_ratio`` uniform candidates, keep the
    ``importance_sample_ratio·num_points`` with logits closest to 0, fill up with uniform points.
    Random draws happen in SAM3's order, so equal seeds give equal points.
    """
    n = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(n, num_candidates, 2, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits, candidates).abs()  # (N, 1, P)
    num_uncertain = int(importance_sample_ratio * num_points)
    top = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1).indices  # (N, k)
    coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=logits.device, generator=generator)], dim=1)
    return coords


# ---------------------------------------------------------------------------------------------
# Terms


def _matched(outputs: dict, key: str, indices) -> torch.Tensor:
    return outputs[key][indices[0], indices[1]]


def _gather_targets(targets: dict, key: str, indices) -> torch.Tensor:
    return targets[key] if indices[2] is None else targets[key][indices[2]]


def _check_weights(name: str, weight_dict: dict[str, float], expected: tuple[str, ...]) -> dict[str, float]:
    weight_dict = dict(weight_dict or {})
    for key, value in weight_dict.items():
        if key not in expected:
            raise ValueError(f"{name}: unknown loss term {key!r}; it computes {list(expected)}")
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"{name}: weight of {key} must be a finite number >= 0, got {value}")
    return weight_dict


def _check_alpha(name: str, key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name}: {key} must be in [0, 1], got {value}")


def _check_nonneg(name: str, key: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name}: {key} must be >= 0, got {value}")


class Boxes(nn.Module):
    """L1 and GIoU losses of matched boxes.

    In:  outputs["pred_boxes"] (B, Q, 4) cxcywh, outputs["pred_boxes_xyxy"] (B, Q, 4) (derived
         from pred_boxes when absent); targets["boxes"] (N, 4), targets["boxes_xyxy"] (N, 4).
    Out: loss_bbox = Σ|Δ| over the 4 coordinates of matched pairs / num_boxes,
         loss_giou = Σ(1 − GIoU) / num_boxes. Finite for zero-width or zero-height boxes.
    """

    TERMS = ("loss_bbox", "loss_giou")

    def __init__(self, weight_dict: dict[str, float] | None = None, compute_aux: bool = True):
        super().__init__()
        self.weight_dict = _check_weights("Boxes", weight_dict, self.TERMS)
        self.compute_aux = compute_aux

    def forward(self, outputs: dict, targets: dict, indices, num_boxes) -> dict[str, torch.Tensor]:
        src_boxes = _matched(outputs, "pred_boxes", indices).float()
        if "pred_boxes_xyxy" in outputs:
            src_xyxy = _matched(outputs, "pred_boxes_xyxy", indices).float()
        else:
            src_xyxy = box_cxcywh_to_xyxy(src_boxes)
        tgt_boxes = _gather_targets(targets, "boxes", indices).float()
        tgt_xyxy = (
            _gather_targets(targets, "boxes_xyxy", indices).float() if "boxes_xyxy" in targets else box_cxcywh_to_xyxy(tgt_boxes)
        )
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        loss_giou = (1 - diag_generalized_box_iou(src_xyxy, tgt_xyxy)).sum() / num_boxes
        if src_boxes.shape[0] == 0:  # keep the graph connected when nothing matched
            loss_bbox = loss_bbox + _zero(outputs["pred_boxes"])
            loss_giou = loss_giou + _zero(outputs["pred_boxes"])
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}


class IABCEMdetr(nn.Module):
    """IoU-aware BCE on query scores, with SAM3's presence token.

    Matched queries get the soft target t = clamp(p^α · IoU^(1−α), 0.01) (p = their own score,
    detached), weighted by ``pos_weight``; unmatched queries get target 0 weighted by p^γ (a
    focal-style down-weighting of easy negatives). With ``use_presence``, find queries without
    any target contribute no score loss (their "absent" answer is the presence token's job) and
    ``presence_logit_dec`` gets a sigmoid focal loss (α = presence_alpha, γ = presence_gamma)
    against "has ≥ 1 target".

    In:  outputs["pred_logits"] (B, Q, 1), outputs["pred_boxes_xyxy"] (B, Q, 4),
         outputs["presence_logit_dec"] (B, 1) optional; targets["boxes_xyxy"] (N, 4),
         targets["num_boxes"] (B,).
    Out: loss_ce = mean over B·Q (or Σ / (pad_n_queries·B) when the model has fewer queries
         than ``pad_n_queries``, SAM3's trick to keep the scale of a 200-query model),
         presence_loss = mean over B (0 when unused or ``presence_logit_dec`` is absent).
    """

    TERMS = ("loss_ce", "presence_loss")

    def __init__(
        self,
        pos_weight: float,
        weight_dict: dict[str, float] | None = None,
        compute_aux: bool = True,
        alpha: float = 0.25,
        gamma: float = 0.0,
        use_presence: bool = False,
        presence_alpha: float = 0.5,
        presence_gamma: float = 0.0,
        pos_focal: bool = False,
        pad_n_queries: int | None = None,
    ):
        super().__init__()
        self.weight_dict = _check_weights("IABCEMdetr", weight_dict, self.TERMS)
        _check_nonneg("IABCEMdetr", "pos_weight", pos_weight)
        _check_alpha("IABCEMdetr", "alpha", alpha)
        _check_alpha("IABCEMdetr", "presence_alpha", presence_alpha)
        _check_nonneg("IABCEMdetr", "gamma", gamma)
        _check_nonneg("IABCEMdetr", "presence_gamma", presence_gamma)
        if pad_n_queries is not None and pad_n_queries < 1:
            raise ValueError(f"IABCEMdetr: pad_n_queries must be >= 1 or None, got {pad_n_queries}")
        self.compute_aux = compute_aux
        self.pos_weight = pos_weight
        self.alpha = alpha
        self.gamma = gamma
        self.use_presence = use_presence
        self.presence_alpha = presence_alpha
        self.presence_gamma = presence_gamma
        self.pos_focal = pos_focal
        self.pad_n_queries = pad_n_queries

    def forward(self, outputs: dict, targets: dict, indices, num_boxes) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]
        if logits.dim() != 3 or logits.shape[-1] != 1:
            raise ValueError(f"pred_logits must be (B, Q, 1), got {tuple(logits.shape)}")
        logits = logits.squeeze(-1).float()  # (B, Q)
        prob = logits.sigmoid()
        matched = (indices[0], indices[1])
        with torch.no_grad():
            is_positive = torch.zeros_like(logits)
            is_positive[matched] = 1.0
            src_xyxy = (
                outputs["pred_boxes_xyxy"][matched] if "pred_boxes_xyxy" in outputs else box_cxcywh_to_xyxy(outputs["pred_boxes"][matched])
            ).float()
            tgt_xyxy = (
                _gather_targets(targets, "boxes_xyxy", indices)
                if "boxes_xyxy" in targets
                else box_cxcywh_to_xyxy(_gather_targets(targets, "boxes", indices))
            ).float()
            iou = diag_box_iou(src_xyxy, tgt_xyxy)
            soft = (prob[matched] ** self.alpha * iou ** (1 - self.alpha)).clamp(min=0.01)
            soft_targets = is_positive.clone()
            soft_targets[matched] = soft

        if self.pos_focal:
            positive = sigmoid_focal_loss(logits, soft_targets, alpha=0.5, gamma=self.gamma)
        else:
            positive = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
        loss = positive * is_positive * self.pos_weight
        negative = F.binary_cross_entropy_with_logits(logits, is_positive, reduction="none")
        loss = loss + negative * (1 - is_positive) * prob**self.gamma

        presence_loss = _zero(logits)
        if self.use_presence:
            has_target = (targets["num_boxes"] > 0).to(logits)[:, None]  # (B, 1)
            loss = loss * has_target
            if "presence_logit_dec" in outputs:
                presence_logits = outputs["presence_logit_dec"].float().reshape(has_target.shape)
                presence_loss = sigmoid_focal_loss(
                    presence_logits, has_target, alpha=self.presence_alpha, gamma=self.presence_gamma
                ).mean()

        if self.pad_n_queries is not None and loss.shape[1] < self.pad_n_queries:
            loss_ce = loss.sum() / (self.pad_n_queries * loss.shape[0])
        else:
            loss_ce = loss.mean()
        return {"loss_ce": loss_ce, "presence_loss": presence_loss}


class Masks(nn.Module):
    """Sigmoid focal + Dice loss of matched instance masks.

    In:  outputs["pred_masks"] (B, Q, h, w) logits; targets["masks"] (N, H, W) bool (any size;
         ``resize`` decides who is resampled), targets["is_valid_mask"] (N,) bool optional.
    Out: loss_mask = Σ_instances mean_pixels(focal) / num_boxes,
         loss_dice = Σ_instances dice / num_boxes.
    With ``num_sample_points`` the two losses are evaluated on that many points per instance,
    chosen by uncertainty (``oversample_ratio``, ``importance_sample_ratio``), straight from
    the full-resolution target (no resizing needed).
    """

    TERMS = ("loss_mask", "loss_dice")

    def __init__(
        self,
        weight_dict: dict[str, float] | None = None,
        compute_aux: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_sample_points: int | None = None,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        resize: ResizeMode = "targets_area",
    ):
        super().__init__()
        self.weight_dict = _check_weights("Masks", weight_dict, self.TERMS)
        _check_alpha("Masks", "focal_alpha", focal_alpha)
        _check_nonneg("Masks", "focal_gamma", focal_gamma)
        if num_sample_points is not None:
            if num_sample_points < 1:
                raise ValueError(f"Masks: num_sample_points must be >= 1 or None, got {num_sample_points}")
            if oversample_ratio < 1:
                raise ValueError(f"Masks: oversample_ratio must be >= 1, got {oversample_ratio}")
            _check_alpha("Masks", "importance_sample_ratio", importance_sample_ratio)
        if resize not in RESIZE_MODES:
            raise ValueError(f"Masks: resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.compute_aux = compute_aux
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_sample_points = num_sample_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.resize = resize

    def forward(self, outputs: dict, targets: dict, indices, num_boxes) -> dict[str, torch.Tensor]:
        all_masks = outputs["pred_masks"]
        if targets.get("masks") is None:  # a dataset without masks: SAM3 returns zeros
            return {"loss_mask": _zero(all_masks), "loss_dice": _zero(all_masks)}
        src = all_masks[indices[0], indices[1]].float()  # (M, h, w)
        tgt = _gather_targets(targets, "masks", indices)  # (M, H, W)
        if "is_valid_mask" in targets:
            keep = _gather_targets(targets, "is_valid_mask", indices)
            src, tgt = src[keep], tgt[keep]
        if src.shape[0] == 0:
            return {"loss_mask": _zero(all_masks), "loss_dice": _zero(all_masks)}

        if self.num_sample_points is not None:
            with torch.no_grad():
                coords = uncertain_point_coords(
                    src[:, None], self.num_sample_points, self.oversample_ratio, self.importance_sample_ratio
                )
                tgt_points = point_sample(tgt[:, None].float(), coords)[:, 0]
            src_points = point_sample(src[:, None], coords)[:, 0]  # (M, P)
        else:
            src, tgt = resize_to(src, tgt, self.resize)
            src_points, tgt_points = src.flatten(1), tgt.flatten(1)

        focal = sigmoid_focal_loss(src_points, tgt_points, alpha=self.focal_alpha, gamma=self.focal_gamma)
        return {
            "loss_mask": focal.mean(1).sum() / num_boxes,
            "loss_dice": dice_loss(src_points, tgt_points).sum() / num_boxes,
        }


def semantic_targets_from_instances(masks: torch.Tensor, num_boxes: torch.Tensor) -> torch.Tensor:
    """Union of each find query's instance masks: masks (N, H, W), num_boxes (B,) → (B, H, W) bool."""
    if masks.shape[0] == 0:
        return masks.new_zeros((num_boxes.shape[0], *masks.shape[-2:]), dtype=torch.bool)
    groups = torch.split(masks.bool(), num_boxes.tolist())
    return torch.stack([g.any(dim=0) for g in groups])


class SemanticSegCriterion(nn.Module):
    """Per-pixel loss of the semantic (union) mask of each find query.

    In:  outputs["semantic_seg"] (B, 1, h, w) logits, outputs["presence_logit"] (B, 1) optional
         (the semantic head's own presence logit, SAM3's key); targets["semantic_masks"]
         (B, H, W) bool, or targets["masks"] (N, H, W) + targets["num_boxes"] (B,) to build it.
    Out: loss_semantic_seg: focal (focal_alpha, focal_gamma) or BCE, mean over pixels, mean over
         find queries; loss_semantic_dice: Dice, mean over find queries;
         loss_semantic_presence: BCE of ``presence_logit`` vs "mask non-empty" (when
         ``presence_head`` and ``presence_loss``; else 0).
    With ``presence_head`` (SAM3's training config) the seg/Dice means run over POSITIVE find
    queries only: an absent concept's empty mask is not taught to the pixels, the presence
    score answers it.
    """

    TERMS = ("loss_semantic_seg", "loss_semantic_dice", "loss_semantic_presence")

    def __init__(
        self,
        weight_dict: dict[str, float] | None = None,
        focal: bool = True,
        focal_alpha: float = 0.6,
        focal_gamma: float = 2.0,
        resize: ResizeMode = "targets_area",
        presence_head: bool = True,
        presence_loss: bool = False,
    ):
        super().__init__()
        self.weight_dict = _check_weights("SemanticSegCriterion", weight_dict, self.TERMS)
        _check_alpha("SemanticSegCriterion", "focal_alpha", focal_alpha)
        _check_nonneg("SemanticSegCriterion", "focal_gamma", focal_gamma)
        if resize not in RESIZE_MODES:
            raise ValueError(f"SemanticSegCriterion: resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.compute_aux = False
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.resize = resize
        self.presence_head = presence_head
        self.presence_loss = presence_loss

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        logits = outputs["semantic_seg"].float()  # (B, 1, h, w)
        if logits.dim() != 4 or logits.shape[1] != 1:
            raise ValueError(f"semantic_seg must be (B, 1, h, w), got {tuple(logits.shape)}")
        if targets.get("semantic_masks") is not None and targets["semantic_masks"].shape[0] > 0:
            sem = targets["semantic_masks"]
        elif targets.get("masks") is not None:
            sem = semantic_targets_from_instances(targets["masks"], targets["num_boxes"])
        else:
            zero = _zero(logits)
            return {"loss_semantic_seg": zero, "loss_semantic_dice": zero, "loss_semantic_presence": zero}
        if sem.shape[0] != logits.shape[0]:
            raise ValueError(f"semantic targets have {sem.shape[0]} find queries, semantic_seg has {logits.shape[0]}")

        pred, sem = resize_to(logits[:, 0], sem, self.resize)
        pred, sem = pred.flatten(1), sem.flatten(1)  # (B, P)
        if self.focal:
            per_query = sigmoid_focal_loss(pred, sem, alpha=self.focal_alpha, gamma=self.focal_gamma).mean(1)
        else:
            per_query = F.binary_cross_entropy_with_logits(pred, sem, reduction="none").mean(1)
        per_query_dice = dice_loss(pred, sem)

        presence = _zero(logits)
        if self.presence_head:
            is_present = (sem > 0).any(dim=1)
            if self.presence_loss:
                if outputs.get("presence_logit") is None:
                    raise ValueError(
                        "loss.semantic.presence_loss is on but the model gives no outputs['presence_logit'] (B, 1)"
                    )
                presence = F.binary_cross_entropy_with_logits(outputs["presence_logit"].float().flatten(), is_present.float())
            weight = is_present.float()
            denominator = weight.sum() + 1e-6
            seg, dice = (per_query * weight).sum() / denominator, (per_query_dice * weight).sum() / denominator
        else:
            seg, dice = per_query.mean(), per_query_dice.mean()
        return {"loss_semantic_seg": seg, "loss_semantic_dice": dice, "loss_semantic_presence": presence}


class ViewCriterion(nn.Module):
    """Auxiliary C-arm view classification (angioexp's own; SAM3 has no view head).

    In:  outputs["view_logits"] (I, V); targets["view_labels"] (I,) long, −1 = unknown view.
    Out: loss_view = cross-entropy averaged over images with a known view; 0 (not NaN) when no
         image in the batch has one.
    """

    TERMS = ("loss_view",)

    def __init__(self, weight_dict: dict[str, float] | None = None):
        super().__init__()
        self.weight_dict = _check_weights("ViewCriterion", weight_dict, self.TERMS)
        self.compute_aux = False

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        logits = outputs["view_logits"].float()
        labels = targets["view_labels"].long().to(logits.device)
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"view_logits (I, V) and view_labels (I,) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
        if labels.numel() and int(labels.max()) >= logits.shape[1]:
            raise ValueError(f"view label {int(labels.max())} out of range for {logits.shape[1]} view classes")
        known = labels >= 0
        if not bool(known.any()):
            return {"loss_view": _zero(logits)}
        return {"loss_view": F.cross_entropy(logits[known], labels[known])}
