"""Evaluation speed: the full ``evaluate_predictions`` (raw + tolerant AP, Dice, clDice, Boundary
IoU) against plain pycocotools COCOeval segm on the same single-instance 512² vessel trees.

Predictions are the truth perturbed as label noise is (shifts of 1–2 px, 1-px dilation or
erosion), one per image with a score in [0.5, 1], plus a low-score false alarm on 30% of the
images. Both timings are taken in the same run; the ratio is the cost of the extra metrics.
Times are CPU seconds of this single-threaded process (``time.process_time``), so that other
jobs on a shared machine do not distort them; on an idle machine they equal wall time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time

import numpy as np

from angioexp.bench import Figure

_clock = time.process_time

TITLE = "Evaluation (issue 3): vessel-grade metrics vs plain pycocotools"

GOAL_IMAGES_PER_S = 20.0  # ≤ 50 ms/image: evaluation stays cheaper than core-model inference


def _dataset(n_images: int, size: int, seed: int = 0):
    from angioexp.evaluate.phantoms import dilate, erode, random_vessel_tree, shift
    from angioexp.evaluate.rle import encode

    rng = np.random.default_rng(seed)
    # Trees are the slow part to draw: 8 dihedral views of each give distinct images.
    bases = [random_vessel_tree(size, rng) for _ in range(-(-n_images // 8))]
    truths = [np.rot90(b, k // 2)[:, ::-1] if k % 2 else np.rot90(b, k // 2) for b in bases for k in range(8)][:n_images]
    perturb = [
        lambda m: shift(m, 0, 1), lambda m: shift(m, 1, 0), lambda m: shift(m, 0, 2),
        lambda m: dilate(m, 1), lambda m: erode(m, 1), lambda m: shift(m, 1, 1),
    ]
    images, annotations, predictions = [], [], []
    for i, truth in enumerate(truths):
        truth = np.ascontiguousarray(truth)
        images.append({"id": i + 1, "width": size, "height": size, "file_name": f"images/{i:04d}.png", "case_id": f"b{i:04d}"})
        rle = encode(truth)
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": rle,
                            "area": int(truth.sum()), "bbox": [0, 0, size, size], "iscrowd": 0})
        guess = perturb[int(rng.integers(len(perturb)))](truth)
        predictions.append({"image_id": i + 1, "category_id": 1, "segmentation": encode(guess), "score": float(rng.uniform(0.5, 1))})
        if rng.random() < 0.3:
            other = np.ascontiguousarray(truths[(i + 1) % len(truths)])
            predictions.append({"image_id": i + 1, "category_id": 1, "segmentation": encode(other), "score": float(rng.uniform(0, 0.5))})
    gt = {"images": images, "categories": [{"id": 1, "name": "coronary artery", "supercategory": "vessel"}],
          "annotations": annotations}
    return gt, predictions


def _plain_pycocotools(gt: dict, predictions: list[dict]) -> tuple[float, list[float]]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, predictions = copy.deepcopy(gt), copy.deepcopy(predictions)
    t0 = _clock()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(predictions)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return _clock() - t0, list(evaluator.stats[:3])


def run(quick: bool) -> list[Figure]:
    from angioexp.evaluate import evaluate_predictions, load_ground_truth

    n_images, size = (40, 512) if quick else (300, 512)
    gt, predictions = _dataset(n_images, size)
    setup = f"{n_images} single-instance {size}² trees, {len(predictions)} predictions"

    plain_s, plain_stats = min((_plain_pycocotools(gt, predictions) for _ in range(3)), key=lambda r: r[0])

    t0 = _clock()
    cold = evaluate_predictions(copy.deepcopy(gt), predictions)
    cold_s = _clock() - t0
    reused = load_ground_truth(copy.deepcopy(gt))
    evaluate_predictions(reused, predictions)  # fills the ground-truth feature cache
    t0 = _clock()
    evaluate_predictions(reused, predictions)
    warm_s = _clock() - t0
    agree = np.allclose([cold.metrics[k] for k in ("AP", "AP50", "AP75")], plain_stats)

    total_phases = sum(cold.timings.values())  # wall-clock shares
    m = cold.metrics
    return [
        Figure("plain pycocotools COCOeval segm (loadRes + evaluate + accumulate + summarize)", n_images / plain_s,
               "images/s", note=f"{setup}; {1000 * plain_s:.0f} ms CPU in all; best of 3"),
        Figure("evaluate_predictions, all metrics, ground truth read fresh", n_images / cold_s, "images/s",
               goal=f">= {GOAL_IMAGES_PER_S:g} images/s", met=n_images / cold_s >= GOAL_IMAGES_PER_S,
               note=f"{setup}; checks inputs, AP + tolerant AP (d=1) + Dice/clDice/BIoU"),
        Figure("evaluate_predictions, GroundTruth reused (training-loop use)", n_images / warm_s, "images/s",
               goal=f">= {GOAL_IMAGES_PER_S:g} images/s", met=n_images / warm_s >= GOAL_IMAGES_PER_S,
               note="truth skeletons/bands cached by load_ground_truth's GroundTruth"),
        Figure("slowdown vs plain pycocotools (fresh / reused)", f"{cold_s / plain_s:.1f}× / {warm_s / plain_s:.1f}×",
               note="same run, same data"),
        Figure("share of the fresh evaluation by phase",
               ", ".join(f"{k} {100 * v / total_phases:.0f}%" for k, v in cold.timings.items()),
               note="load = checks + COCO index; ap = pycocotools; ap_tol = tolerant-IoU matching; "
                    "masks = Dice/clDice/BIoU (skeletonisation dominates)"),
        Figure("AP/AP50/AP75 equal pycocotools' stats[0:3]", "yes" if agree else "NO", met=agree,
               note=f"ours {m['AP']:.3f}/{m['AP50']:.3f}/{m['AP75']:.3f}; AP75_tol {m['AP75_tol']:.3f}, Dice {m['dice']:.3f}"),
    ]
