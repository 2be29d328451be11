"""Assign predictions to ground-truth instances (SAM3's ``sam3/train/matcher.py`` semantics).

``BinaryHungarianMatcherV2`` is DETR's one-to-one bipartite matching (Carion et al., ECCV 2020)
with a single "object" class: the cost of pairing query q with target t is

    C[q, t] = cost_class · focal(q) + cost_bbox · ‖box_q − box_t‖₁ − cost_giou · GIoU(q, t)

solved per find query with ``scipy.optimize.linear_sum_assignment``. The focal class cost is
the positive-minus-negative focal loss of the query's score (Lin et al., ICCV 2017), so a
confident query is cheap to match.

``BinaryOneToManyMatcher`` is the greedy auxiliary assignment of DAC-DETR (Hu et al.,
NeurIPS 2023): each target takes every query among the top-k by α·score + (1−α)·IoU whose
value also exceeds a threshold. As in SAM3's code (though not its docstring), nothing stops one
query from being assigned to two targets.

Both return SAM3's index triple over PACKED targets (see ``angioexp.losses``):
    batch_idx (M,) long, src_idx (M,) long, tgt_idx (M,) long
so that ``outputs["pred_boxes"][batch_idx, src_idx]`` pairs with ``targets["boxes"][tgt_idx]``.
Unlike SAM3, ``tgt_idx`` is always a tensor (SAM3 returns None when it is the identity).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from angioexp.losses.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou, pad_packed

log = logging.getLogger(__name__)

# Costs for invalid pairs (masked queries/targets) and for non-finite entries. A diverged model
# (NaN boxes) must not crash the assignment: the loss will be NaN and the NaN guard skips the step.
_INVALID_COST = 1e9
_NONFINITE_COST = 1e8

Indices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _padded_target_boxes(targets: dict) -> torch.Tensor:
    """(B, T_max, 4) cxcywh target boxes, taken from ``boxes_padded`` or built from the packed ones."""
    if "boxes_padded" in targets:
        return targets["boxes_padded"]
    return pad_packed(targets["boxes"], targets["num_boxes"])


def _empty(device) -> Indices:
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone()


def _check_common(outputs: dict, targets: dict) -> None:
    logits = outputs["pred_logits"]
    if logits.dim() != 3 or logits.shape[-1] != 1:
        raise ValueError(f"pred_logits must be (B, Q, 1), got {tuple(logits.shape)}")
    num_boxes = targets["num_boxes"]
    if num_boxes.shape[0] != logits.shape[0]:
        raise ValueError(f"targets['num_boxes'] has {num_boxes.shape[0]} find queries, outputs have {logits.shape[0]}")
    if "boxes" in targets and int(num_boxes.sum()) != targets["boxes"].shape[0]:
        raise ValueError(
            f"targets['num_boxes'] sums to {int(num_boxes.sum())} but targets['boxes'] has {targets['boxes'].shape[0]} rows"
        )


class BinaryHungarianMatcherV2(nn.Module):
    """One-to-one Hungarian matching with focal class cost, L1 box cost and GIoU cost.

    Args (SAM3's names and its config defaults):
        cost_class, cost_bbox, cost_giou: relative weights of the three costs (not all zero).
        focal: use the focal class cost (else −probability).
        alpha, gamma: focal cost parameters.
        stable: SAM3's "stable" focal cost (score × rescaled GIoU as the probability).
        remove_samples_with_0_gt: skip find queries without targets (nothing to match).

    forward(outputs, targets, out_is_valid=None, target_is_valid_padded=None) → Indices
        outputs["pred_logits"]  (B, Q, 1)    outputs["pred_boxes"] (B, Q, 4) cxcywh
        targets["boxes"]        (N, 4) cxcywh, targets["num_boxes"] (B,) long
        out_is_valid            (B, Q) bool, optional — invalid queries are never matched
        target_is_valid_padded  (B, T_max) bool, optional — invalid targets are never matched
    Returns (batch_idx, src_idx, tgt_idx), each (M,) long with M = Σ_b min(Q_b, T_b) (fewer if
    validity masks exclude pairs), grouped by find query and sorted by target within each.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = True,
        alpha: float = 0.25,
        gamma: float = 2.0,
        stable: bool = False,
        remove_samples_with_0_gt: bool = True,
    ):
        super().__init__()
        for name, value in (("cost_class", cost_class), ("cost_bbox", cost_bbox), ("cost_giou", cost_giou), ("gamma", gamma)):
            if not value >= 0:
                raise ValueError(f"matcher.{name} must be >= 0, got {value}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("matcher costs cannot all be 0 (matcher.cost_class, cost_bbox, cost_giou)")
        if not 0 <= alpha <= 1:
            raise ValueError(f"matcher.alpha must be in [0, 1], got {alpha}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.alpha = alpha
        self.gamma = gamma
        self.stable = stable
        self.remove_samples_with_0_gt = remove_samples_with_0_gt

    def cost_matrix(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor) -> torch.Tensor:
        """pred_logits (B, Q, 1), pred_boxes (B, Q, 4), tgt_boxes (B, T, 4) → cost (B, Q, T)."""
        scores = pred_logits.squeeze(-1).float()
        pred_boxes = pred_boxes.float()
        tgt_boxes = tgt_boxes.float()
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        prob = scores.sigmoid()
        if not self.focal:
            cost_class = -prob.unsqueeze(-1).expand_as(cost_bbox)
        elif self.stable:
            # SAM3's "stable" variant: the matching quality (score × (GIoU+1)/2) plays the probability.
            quality = prob.unsqueeze(-1) * (giou + 1) / 2
            cost_class = -self.alpha * (1 - quality) ** self.gamma * torch.log(quality) + (
                1 - self.alpha
            ) * quality**self.gamma * torch.log(1 - quality)
        else:
            # positive focal term − negative focal term, with log-sigmoid for stability
            cost_class = (
                -self.alpha * (1 - prob) ** self.gamma * F.logsigmoid(scores)
                + (1 - self.alpha) * prob**self.gamma * F.logsigmoid(-scores)
            ).unsqueeze(-1).expand_as(cost_bbox)
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class - self.cost_giou * giou

    @torch.no_grad()
    def forward(
        self,
        outputs: dict,
        targets: dict,
        out_is_valid: torch.Tensor | None = None,
        target_is_valid_padded: torch.Tensor | None = None,
    ) -> Indices:
        _check_common(outputs, targets)
        device = outputs["pred_logits"].device
        num_boxes = targets["num_boxes"].cpu()
        if int(num_boxes.sum()) == 0:
            return _empty(device)
        cost = self.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], _padded_target_boxes(targets))
        if out_is_valid is not None:
            cost = torch.where(out_is_valid[:, :, None], cost, torch.full_like(cost, _INVALID_COST))
        if target_is_valid_padded is not None:
            cost = torch.where(target_is_valid_padded[:, None, :], cost, torch.full_like(cost, _INVALID_COST))
        cost_np = cost.cpu().numpy()
        if not np.isfinite(cost_np).all():
            log.debug("non-finite matching costs (diverging predictions?); replaced by %g", _NONFINITE_COST)
            cost_np = np.nan_to_num(cost_np, nan=_NONFINITE_COST, posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)

        offsets = np.concatenate([[0], np.cumsum(num_boxes.numpy())[:-1]])
        batch_ids, src_ids, tgt_ids = [], [], []
        for b, n in enumerate(num_boxes.tolist()):
            if n == 0 and self.remove_samples_with_0_gt:
                continue
            c = cost_np[b, :, :n]
            rows, cols = linear_sum_assignment(c)
            if out_is_valid is not None or target_is_valid_padded is not None:
                keep = c[rows, cols] < _INVALID_COST / 10
                rows, cols = rows[keep], cols[keep]
            order = np.argsort(cols, kind="stable")
            rows, cols = rows[order], cols[order]
            batch_ids.append(np.full(len(rows), b, dtype=np.int64))
            src_ids.append(rows.astype(np.int64))
            tgt_ids.append(cols.astype(np.int64) + offsets[b])
        if not batch_ids:
            return _empty(device)
        as_tensor = lambda parts: torch.from_numpy(np.concatenate(parts)).to(device)  # noqa: E731
        return as_tensor(batch_ids), as_tensor(src_ids), as_tensor(tgt_ids)


class BinaryOneToManyMatcher(nn.Module):
    """Greedy one-to-many assignment (DAC-DETR), SAM3's ``o2m_matcher``.

    A query q is assigned to target t when C[q, t] = α·sigmoid(score_q) + (1−α)·IoU(q, t) is
    among the ``topk`` largest values of C[:, t] over the queries (SAM3's quantile rule) and
    above ``threshold``.

    Args: alpha (0.3 in SAM3's configs), threshold (0.4), topk (4; class default 6 in SAM3).
    forward(outputs, targets, out_is_valid=None, target_is_valid_padded=None) → Indices
        same shapes as BinaryHungarianMatcherV2; M is data-dependent (0 … Q·T).
    """

    def __init__(self, alpha: float = 0.3, threshold: float = 0.4, topk: int = 6):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"o2m.alpha must be in [0, 1], got {alpha}")
        if topk < 1:
            raise ValueError(f"o2m.topk must be >= 1, got {topk}")
        self.alpha = alpha
        self.threshold = threshold
        self.topk = topk

    @torch.no_grad()
    def forward(
        self,
        outputs: dict,
        targets: dict,
        out_is_valid: torch.Tensor | None = None,
        target_is_valid_padded: torch.Tensor | None = None,
    ) -> Indices:
        _check_common(outputs, targets)
        prob = outputs["pred_logits"].float().sigmoid().squeeze(-1)  # (B, Q)
        device = prob.device
        num_queries = prob.shape[1]
        num_boxes = targets["num_boxes"].to(device)
        tgt_boxes = _padded_target_boxes(targets).float()  # (B, T, 4)
        num_targets = tgt_boxes.shape[1]
        if num_targets == 0:
            return _empty(device)
        iou, _ = box_iou(box_cxcywh_to_xyxy(outputs["pred_boxes"].float()), box_cxcywh_to_xyxy(tgt_boxes))
        quality = self.alpha * prob.unsqueeze(-1) + (1 - self.alpha) * iou  # (B, Q, T), higher is better
        if out_is_valid is not None:
            quality = torch.where(out_is_valid[:, :, None], quality, torch.full_like(quality, -_INVALID_COST))
        if target_is_valid_padded is not None:
            quality = torch.where(target_is_valid_padded[:, None, :], quality, torch.full_like(quality, -_INVALID_COST))
        # SAM3 keeps the values strictly above the (1 − k/Q) quantile over queries; k ≥ Q keeps all
        # but the smallest there, and here too (SAM3 would raise for k > Q).
        q_level = min(max(1 - self.topk / num_queries, 0.0), 1.0)
        kth = torch.quantile(quality, q_level, dim=1, keepdim=True)
        matches = (quality > kth) & (quality > self.threshold)
        if out_is_valid is not None:
            matches &= out_is_valid[:, :, None]
        if target_is_valid_padded is not None:
            matches &= target_is_valid_padded[:, None, :]
        matches &= (torch.arange(num_targets, device=device)[None] < num_boxes[:, None]).unsqueeze(1)
        batch_idx, src_idx, tgt_idx = torch.nonzero(matches, as_tuple=True)
        offsets = torch.cat([num_boxes.new_zeros(1), num_boxes.cumsum(0)[:-1]])
        return batch_idx, src_idx, tgt_idx + offsets[batch_idx]


def build_matcher(cfg) -> BinaryHungarianMatcherV2:
    """``cfg.matcher`` (angioexp.config.MatcherConfig) → the one-to-one matcher."""
    m = cfg.matcher
    return BinaryHungarianMatcherV2(
        cost_class=m.cost_class, cost_bbox=m.cost_bbox, cost_giou=m.cost_giou, focal=m.focal, alpha=m.alpha, gamma=m.gamma
    )


def build_o2m_matcher(cfg) -> BinaryOneToManyMatcher:
    """``cfg.o2m`` (angioexp.config.O2MConfig) → the one-to-many auxiliary matcher."""
    return BinaryOneToManyMatcher(alpha=cfg.o2m.alpha, threshold=cfg.o2m.threshold, topk=cfg.o2m.topk)
