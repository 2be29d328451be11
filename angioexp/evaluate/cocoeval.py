"""COCO segm AP with pycocotools, and the same AP with a boundary-tolerant mask IoU.

Both use pycocotools' own matching (greedy by score, per IoU threshold) and accumulation
(101-point interpolated precision); the tolerant variant changes only the IoU matrix
(:func:`angioexp.evaluate.masks.tolerant_iou_matrix`). Only the "all" area range and 100
detections per image are evaluated: those are the numbers reported (COCO's ``stats[0:3]``),
and the other area ranges would quadruple the matching work for nothing.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from angioexp.evaluate.masks import tolerant_iou_matrix

MAX_DETS = 100


def quiet_coco(dataset: dict) -> COCO:
    """A pycocotools COCO object built from a dict, without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def results_coco(gt: COCO, detections: list[dict]) -> COCO:
    """COCO object for detections already checked (RLE segmentations, scores, known ids).

    Like ``COCO.loadRes`` but without its deep copy of the ground truth, and it accepts an
    empty list (loadRes fails on one).
    """
    annotations = []
    if detections:
        rles = [d["segmentation"] for d in detections]
        # pycocotools 2.0.11's area() overflows on lists of 256 or more RLEs: go in chunks.
        areas = np.concatenate([mask_utils.area(rles[k : k + 255]) for k in range(0, len(rles), 255)])
        boxes = mask_utils.toBbox(rles)
        for k, det in enumerate(detections):
            annotations.append(
                {
                    "id": k + 1,
                    "image_id": det["image_id"],
                    "category_id": det["category_id"],
                    "segmentation": det["segmentation"],
                    "score": float(det["score"]),
                    "area": float(areas[k]),
                    "bbox": [float(v) for v in boxes[k]],
                    "iscrowd": 0,
                }
            )
    return quiet_coco(
        {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": annotations}
    )


def _decode(rles: list[dict]) -> list[np.ndarray]:
    """RLEs → list of bool (H, W) masks (Fortran-order views, no copies)."""
    if not rles:
        return []
    stack = mask_utils.decode(rles).view(bool)  # (H, W, N), Fortran order
    return [stack[..., k] for k in range(stack.shape[-1])]


class TolerantCOCOeval(COCOeval):
    """pycocotools COCOeval whose segm IoU forgives boundary errors of up to ``tolerance_px``."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, tolerance_px: int):
        super().__init__(coco_gt, coco_dt, iouType="segm")
        self.tolerance_px = int(tolerance_px)

    def computeIoU(self, imgId, catId):  # noqa: N802, N803 - pycocotools' names
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        if not gt or not dt:
            return []
        # Rows must follow evaluateImg's order: by descending score, stable, top maxDets.
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][: p.maxDets[-1]]
        return tolerant_iou_matrix(
            _decode([d["segmentation"] for d in dt]),
            _decode([g["segmentation"] for g in gt]),
            self.tolerance_px,
            [int(g["iscrowd"]) for g in gt],
        )


def run_cocoeval(coco_gt: COCO, coco_dt: COCO, tolerance_px: int | None = None) -> COCOeval:
    """Evaluate + accumulate quietly; ``tolerance_px`` None → plain pycocotools segm IoU."""
    if tolerance_px is None:
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
    else:
        evaluator = TolerantCOCOeval(coco_gt, coco_dt, tolerance_px)
    evaluator.params.imgIds = sorted(coco_gt.getImgIds())
    evaluator.params.catIds = sorted(coco_gt.getCatIds())
    evaluator.params.areaRng = [[0, 1e10]]
    evaluator.params.areaRngLbl = ["all"]
    evaluator.params.maxDets = [MAX_DETS]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def average_precision(evaluator: COCOeval, iou: float | None = None, category_index: int | None = None) -> float:
    """AP from an accumulated evaluator, as COCO's summarize computes it (area all, 100 dets).

    iou: None → mean over the thresholds 0.50:0.95, else one threshold (0.5, 0.75).
    category_index: None → mean over categories, else one index into params.catIds.
    Returns NaN where there is no ground truth to score against (COCO's −1).
    """
    precision = evaluator.eval["precision"]  # (T IoU thresholds, R recall points, K cats, A areas, M maxDets)
    if iou is not None:
        t = np.flatnonzero(np.isclose(evaluator.params.iouThrs, iou))
        precision = precision[t]
    precision = precision[:, :, :, 0, -1]
    if category_index is not None:
        precision = precision[:, :, category_index]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")
