"""SAM3's Hungarian matcher, made to report a non-finite cost instead of crashing the run.

``BinaryHungarianMatcherV2.forward`` hands its cost matrix to scipy (``C.cpu().numpy()`` →
``linear_sum_assignment``), which raises ``ValueError: matrix contains invalid numeric entries``
when a prediction went NaN — inside ``model.forward``, before any loss exists, so no NaN guard
ever sees it and the run dies (facebookresearch/sam3 issues #289, #440). A diverging step is
exactly what the guard exists for: :class:`GuardedHungarianMatcher` raises
:class:`NonFiniteMatchCost` instead, and :class:`~angioexp.backends.sam3.trainer.GuardedTrainer`
counts it as a bad step (skip, restore + LR backoff, diverged), like a non-finite loss.
"""

from __future__ import annotations

import torch
from sam3.train.matcher import BinaryHungarianMatcherV2

# scipy.optimize.linear_sum_assignment's message for NaN/inf entries
_SCIPY_INVALID = "invalid numeric entries"


class NonFiniteMatchCost(FloatingPointError):
    """The matching cost of a step is not finite (non-finite predictions or degenerate boxes)."""


def _nonfinite(name: str, tensor: torch.Tensor) -> str | None:
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return None
    return f"{int(bad.sum())} of {tensor.numel()} {name} entries are non-finite"


class GuardedHungarianMatcher(BinaryHungarianMatcherV2):
    """``BinaryHungarianMatcherV2`` (same arguments and results) that raises
    :class:`NonFiniteMatchCost` where SAM3's would hand scipy a NaN/inf cost matrix."""

    @torch.no_grad()
    def forward(self, outputs, batched_targets, *args, **kwargs):
        problems = [p for p in (_nonfinite("pred_logits", outputs["pred_logits"]),
                                _nonfinite("pred_boxes", outputs["pred_boxes"])) if p]
        if problems:
            raise NonFiniteMatchCost("non-finite matching cost: " + "; ".join(problems))
        try:
            return super().forward(outputs, batched_targets, *args, **kwargs)
        except ValueError as exc:  # finite inputs, non-finite cost: e.g. GIoU of two zero-area boxes
            if _SCIPY_INVALID not in str(exc):
                raise
            raise NonFiniteMatchCost(f"non-finite matching cost ({exc}); degenerate target boxes? "
                                     "run `angioexp doctor --data COCO_DIR`") from exc
