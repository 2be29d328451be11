"""The full training objective: matching + every loss term + the weighted total.

``Sam3Criterion`` plays the role of SAM3's ``Sam3LossWrapper`` (``sam3/train/loss/sam3_loss.py``)
plus the model-side matching SAM3 does in ``Sam3Image._compute_matching``:

    for each decoder layer (final, then aux_outputs[i] → suffix "_aux_{i}"):
        indices = outputs.get("indices") or matcher(layer, targets)
        Boxes, IABCEMdetr (and Masks on the final layer only, SAM3's compute_aux=False)
        if the layer has "*_o2m" outputs: the same terms on them with the one-to-many
            matcher (suffix "_o2m", weighted × o2m_weight)
    SemanticSegCriterion, ViewCriterion and (Stage 2) SegmentIdentityLoss on the final layer.

    forward(outputs, targets) → dict[str, Tensor] (scalars):
        every UNWEIGHTED term under SAM3's name, e.g. loss_bbox, loss_giou, loss_ce,
        presence_loss, loss_mask, loss_dice, loss_semantic_seg, loss_semantic_dice,
        loss_semantic_presence, loss_view, loss_bbox_aux_0, loss_ce_o2m, …
        "loss": Σ weight · term (o2m terms additionally × o2m_weight) — what to backpropagate.

Instance terms are normalised by the number of target instances averaged over DDP ranks
(SAM3's ``normalization="global"``), at least 1. Everything runs in fp32 with autocast off,
whatever precision the model ran in. Naming note: SAM3 writes aux suffixes as ``_aux_{i}``,
and so do we, so the two backends log the same metric names.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from angioexp.losses.box_ops import box_cxcywh_to_xyxy
from angioexp.losses.identity import SegmentIdentityLoss
from angioexp.losses.loss_fns import Boxes, IABCEMdetr, Masks, SemanticSegCriterion, ViewCriterion
from angioexp.losses.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher, build_matcher, build_o2m_matcher

log = logging.getLogger(__name__)

# Which output key each term needs, and the config key that switches it off (for error messages).
_REQUIRED_OUTPUT = {
    Masks: ("pred_masks", "loss.masks.loss_mask / loss_dice (or scratch.enable_segmentation=false)"),
    SemanticSegCriterion: ("semantic_seg", "loss.semantic.* weights (or scratch.enable_segmentation=false)"),
    ViewCriterion: ("view_logits", "loss.view.loss_view"),
    SegmentIdentityLoss: ("identity_logits", "loss.identity.* weights (or model.identity_head=false)"),
}


def _to_fp32(value):
    """Recursively cast floating tensors in dicts/lists/tuples to float32 (others untouched)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _weighted_sum(terms: dict[str, torch.Tensor], weight_dict: dict[str, float]) -> torch.Tensor | float:
    total: torch.Tensor | float = 0.0
    for key, weight in weight_dict.items():
        if weight != 0:  # a zero weight must not let a NaN term into the total (as SAM3)
            total = total + weight * terms[key]
    return total


def _find_reference_tensor(outputs: dict) -> torch.Tensor:
    return outputs["pred_logits"] if "pred_logits" in outputs else outputs["view_logits"]


class Sam3Criterion(nn.Module):
    """Matcher + loss terms → dict of unweighted terms and the weighted ``"loss"``.

    Args:
        matcher: one-to-one matcher (BinaryHungarianMatcherV2).
        instance_losses: terms with signature (outputs, targets, indices, num_boxes): Boxes,
            IABCEMdetr, Masks. Each has ``weight_dict`` and ``compute_aux``.
        semantic_loss, view_loss: optional terms with signature (outputs, targets).
        o2m_matcher, o2m_weight: one-to-many auxiliary matching (when the model emits
            ``*_o2m`` outputs; required then).
        use_o2m_matcher_on_o2m_aux: SAM3's flag; False (its config) matches the o2m queries of
            aux layers one-to-one.
        normalization: "global" (mean instance count over DDP ranks), "local" or "none".
        scale_by_find_batch_size: multiply the total by sqrt(B) as SAM3's configs do.
    """

    def __init__(
        self,
        matcher: BinaryHungarianMatcherV2,
        instance_losses: list[nn.Module],
        semantic_loss: SemanticSegCriterion | None = None,
        view_loss: ViewCriterion | None = None,
        identity_loss: SegmentIdentityLoss | None = None,
        o2m_matcher: BinaryOneToManyMatcher | None = None,
        o2m_weight: float = 1.0,
        use_o2m_matcher_on_o2m_aux: bool = False,
        normalization: str = "global",
        scale_by_find_batch_size: bool = False,
    ):
        super().__init__()
        if normalization not in ("global", "local", "none"):
            raise ValueError(f"normalization must be global, local or none, got {normalization!r}")
        if not o2m_weight >= 0:
            raise ValueError(f"o2m.o2m_weight must be >= 0, got {o2m_weight}")
        self.matcher = matcher
        self.instance_losses = nn.ModuleList(instance_losses)
        self.semantic_loss = semantic_loss
        self.view_loss = view_loss
        self.identity_loss = identity_loss
        self.o2m_matcher = o2m_matcher
        self.o2m_weight = o2m_weight
        self.use_o2m_matcher_on_o2m_aux = use_o2m_matcher_on_o2m_aux
        self.normalization = normalization
        self.scale_by_find_batch_size = scale_by_find_batch_size
        self._warned: set[str] = set()

    # -- helpers --------------------------------------------------------------------------

    def num_boxes(self, targets: dict) -> torch.Tensor | float:
        """The instance count the instance terms are divided by (SAM3's ``_get_num_boxes``)."""
        if self.normalization == "none":
            return 1.0
        n = targets["num_boxes"].sum().float()
        if self.normalization == "global" and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            n = n / torch.distributed.get_world_size()
        return torch.clamp(n, min=1)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _usable(self, term: nn.Module, outputs: dict) -> bool:
        """Whether a term's model output is present; a missing output for a weighted term is an error."""
        key, switch = _REQUIRED_OUTPUT.get(type(term), (None, None))
        if key is None or outputs.get(key) is not None:
            return True
        if any(w != 0 for w in term.weight_dict.values()):
            raise ValueError(f"the model gives no outputs['{key}'] but {type(term).__name__} is weighted; set {switch} to 0")
        return False

    @staticmethod
    def _complete_targets(targets: dict) -> dict:
        targets = dict(targets)
        if "boxes_xyxy" not in targets and "boxes" in targets:
            targets["boxes_xyxy"] = box_cxcywh_to_xyxy(targets["boxes"])
        n = int(targets["num_boxes"].sum())
        for key in ("boxes", "masks"):
            if targets.get(key) is not None and targets[key].shape[0] != n:
                raise ValueError(f"targets['num_boxes'] sums to {n} but targets['{key}'] has {targets[key].shape[0]} rows")
        return targets

    # -- forward --------------------------------------------------------------------------

    def forward(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        device_type = _find_reference_tensor(outputs).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_fp32(_to_fp32(outputs), self._complete_targets(_to_fp32(targets)))

    def _forward_fp32(self, outputs: dict, targets: dict) -> dict[str, torch.Tensor]:
        num_boxes = self.num_boxes(targets)
        if self.o2m_matcher is not None and "pred_logits_o2m" not in outputs:
            raise ValueError("o2m.enabled is set but the model gives no 'pred_logits_o2m' outputs (one-to-many queries)")
        if self.o2m_matcher is None and "pred_logits_o2m" in outputs:
            self._warn_once("o2m", "the model gives *_o2m outputs but o2m.enabled is false; they are not supervised")

        layers = [(outputs, "", False)] if self.instance_losses else []  # none: loss.per_prompt=false
        layers += [(aux, f"_aux_{i}", True) for i, aux in enumerate(outputs.get("aux_outputs") or [])]
        losses: dict[str, torch.Tensor] = {}
        total = _find_reference_tensor(outputs).sum() * 0.0
        for layer, suffix, is_aux in layers:
            indices = layer["indices"] if layer.get("indices") is not None else self.matcher(layer, targets)
            o2m_layer = o2m_indices = None
            if self.o2m_matcher is not None and "pred_logits_o2m" in layer:
                o2m_layer = {k[: -len("_o2m")]: v for k, v in layer.items() if k.endswith("_o2m")}
                o2m_matcher = self.o2m_matcher if (self.use_o2m_matcher_on_o2m_aux or not is_aux) else self.matcher
                o2m_indices = o2m_matcher(o2m_layer, targets)
            for term in self.instance_losses:
                if is_aux and not term.compute_aux:
                    continue
                if not self._usable(term, layer):
                    continue
                values = term(layer, targets, indices, num_boxes)
                total = total + _weighted_sum(values, term.weight_dict)
                losses.update({f"{k}{suffix}": v for k, v in values.items()})
                if o2m_layer is not None and (not isinstance(term, Masks) or "pred_masks" in o2m_layer):
                    values = term(o2m_layer, targets, o2m_indices, num_boxes)
                    total = total + self.o2m_weight * _weighted_sum(values, term.weight_dict)
                    losses.update({f"{k}{suffix}_o2m": v for k, v in values.items()})

        for term in (self.semantic_loss, self.view_loss, self.identity_loss):
            if term is None or not self._usable(term, outputs):
                continue
            if isinstance(term, ViewCriterion) and targets.get("view_labels") is None:
                self._warn_once("view_labels", "targets carry no 'view_labels'; loss_view is 0 (views unknown)")
                values = {"loss_view": outputs["view_logits"].sum() * 0.0}
            else:
                values = term(outputs, targets)
            total = total + _weighted_sum(values, term.weight_dict)
            losses.update(values)

        if self.scale_by_find_batch_size:
            total = total * math.sqrt(targets["num_boxes"].shape[0])
        losses["loss"] = total
        return losses


def build_criterion(cfg) -> Sam3Criterion:
    """The objective configured by ``cfg`` (angioexp.config.Config): ``cfg.matcher``, ``cfg.o2m``,
    ``cfg.loss.*``; mask and semantic terms only when ``cfg.scratch.enable_segmentation``."""
    loss = cfg.loss
    instance_losses: list[nn.Module] = [
        Boxes(weight_dict={"loss_bbox": loss.boxes.loss_bbox, "loss_giou": loss.boxes.loss_giou}),
        IABCEMdetr(
            weight_dict={"loss_ce": loss.iabce.loss_ce, "presence_loss": loss.iabce.presence_loss},
            pos_weight=loss.iabce.pos_weight,
            alpha=loss.iabce.alpha,
            gamma=loss.iabce.gamma,
            use_presence=loss.iabce.use_presence,
            pos_focal=loss.iabce.pos_focal,
            pad_n_queries=loss.iabce.pad_n_queries,
        ),
    ]
    semantic = None
    if cfg.scratch.enable_segmentation:
        m = loss.masks
        instance_losses.append(
            Masks(
                weight_dict={"loss_mask": m.loss_mask, "loss_dice": m.loss_dice},
                focal_alpha=m.focal_alpha,
                focal_gamma=m.focal_gamma,
                num_sample_points=m.num_sample_points,
                oversample_ratio=m.oversample_ratio,
                importance_sample_ratio=m.importance_sample_ratio,
                resize=m.resize,
            )
        )
        s = loss.semantic
        semantic = SemanticSegCriterion(
            weight_dict={
                "loss_semantic_seg": s.loss_semantic_seg,
                "loss_semantic_dice": s.loss_semantic_dice,
                "loss_semantic_presence": s.loss_semantic_presence,
            },
            focal=s.focal,
            focal_alpha=s.focal_alpha,
            focal_gamma=s.focal_gamma,
            resize=s.resize,
            presence_head=s.presence_head,
            presence_loss=s.presence_loss,
        )
    if not loss.per_prompt:  # no prompt is decoded in training: only the identity and view terms
        instance_losses, semantic = [], None
    return Sam3Criterion(
        matcher=build_matcher(cfg),
        instance_losses=instance_losses,
        semantic_loss=semantic,
        view_loss=ViewCriterion(weight_dict={"loss_view": loss.view.loss_view}),
        identity_loss=SegmentIdentityLoss(
            weight_dict={"loss_identity_ce": loss.identity.loss_identity_ce,
                         "loss_identity_dice": loss.identity.loss_identity_dice,
                         "loss_identity_presence": loss.identity.loss_identity_presence},
            class_weight_power=loss.identity.class_weight_power,
        ) if cfg.model.identity_head and cfg.backend == "core" else None,
        o2m_matcher=build_o2m_matcher(cfg) if cfg.o2m.enabled else None,
        o2m_weight=cfg.o2m.o2m_weight,
    )
