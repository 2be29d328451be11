"""Vessel-grade evaluation: COCO segm AP (raw and boundary-tolerant), Dice, clDice, Boundary IoU,
per-segment metrics, the label-noise ceiling and prediction overlays (issue 3, item 5)."""

from angioexp.evaluate.evaluator import (
    EvalResult,
    GroundTruth,
    annotations_as_predictions,
    evaluate_predictions,
    label_noise_ceiling,
    load_ground_truth,
)

__all__ = [
    "EvalResult",
    "GroundTruth",
    "annotations_as_predictions",
    "evaluate_predictions",
    "label_noise_ceiling",
    "load_ground_truth",
]
