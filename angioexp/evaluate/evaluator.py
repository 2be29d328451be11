"""Vessel-grade evaluation of COCO segmentation results: :func:`evaluate_predictions`.

Why more than COCO AP: on vessels 3–8 px wide, a mask 1 px off scores AP75 ≈ 0.04 while its
Dice is 0.84 (docs/design.md#thin-vessel-metrics), so raw AP75 measures label noise more than the model. Every
evaluation therefore reports, beside AP/AP50/AP75, the same AP with a d-px boundary tolerance,
Dice, clDice and Boundary IoU; :func:`label_noise_ceiling` says what the labels themselves allow.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

from angioexp.errors import InputError
from angioexp.evaluate.cocoeval import average_precision, quiet_coco, results_coco, run_cocoeval
from angioexp.evaluate.masks import MaskFeatures, pair_scores
from angioexp.evaluate.rle import check_rle, decode, polygon_to_rle
from angioexp.fileio import atomic_file, write_json_atomic
from angioexp.segments import BY_LABEL, STAGE1_CATEGORY

log = logging.getLogger(__name__)

PAIR_METRICS = ("dice", "cldice", "biou")


# ---------------------------------------------------------------------------------------------
# Ground truth


@dataclass
class GroundTruth:
    """A checked COCO ground truth plus a cache of per-(image, category) mask features.

    Build it once with :func:`load_ground_truth` and pass it to every
    :func:`evaluate_predictions` call of a training run: the truth is then decoded and
    skeletonised only on the first evaluation.
    """

    coco: COCO
    images: dict[int, dict]  # image id → image entry
    categories: dict[int, dict]  # category id → category entry
    slugs: dict[int, str]  # category id → metric-name slug
    multi_category: bool  # Stage 2 (segments): per-category metrics are reported
    source: str  # file path or "<dict>"
    # (image id, category id) → union RLE of the truth's instances
    unions: dict[tuple[int, int], dict] = field(default_factory=dict)
    _features: dict[tuple[int, int, int], MaskFeatures] = field(default_factory=dict, repr=False)

    def features(self, image_id: int, category_id: int, band_px: int, mask: np.ndarray) -> MaskFeatures:
        key = (image_id, category_id, band_px)
        if key not in self._features:
            self._features[key] = MaskFeatures.of(mask, band_px)
        return self._features[key]

    def union_mask(self, image_id: int, category_id: int) -> np.ndarray:
        image = self.images[image_id]
        rle = self.unions.get((image_id, category_id))
        if rle is None:
            return np.zeros((image["height"], image["width"]), dtype=bool)
        return decode(rle)


def _slug(category: dict) -> str:
    """Metric-name slug of a category: its name if it is a segment slug, else a cleaned name."""
    known = BY_LABEL.get(category["id"])
    if known is not None and category.get("name") in (known.slug, known.syntax):
        return known.slug
    return re.sub(r"[^a-z0-9_]+", "_", str(category.get("name", category["id"])).lower()).strip("_") or str(category["id"])


def _read_json(path: Path):
    if not path.is_file():
        raise InputError("file not found", file=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", file=path) from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def load_ground_truth(source: str | Path | dict | GroundTruth) -> GroundTruth:
    """Read and check a COCO ground truth (file or dict); a GroundTruth passes through.

    Checks ids, sizes and segmentations (RLE or polygons, converted to compressed RLE); the
    caller's dict is not modified.
    """
    if isinstance(source, GroundTruth):
        return source
    if isinstance(source, dict):
        data, where_file = source, None
    else:
        where_file = Path(source)
        data = _read_json(where_file)
    if not isinstance(data, dict):
        raise InputError("ground truth must be a COCO JSON object", file=where_file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"missing or non-list '{key}'", file=where_file, key=key)
    if not data["images"]:
        raise InputError("no images to evaluate", file=where_file, key="images")

    images: dict[int, dict] = {}
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int):
            raise InputError(f"images[{k}]: needs an integer 'id'", file=where_file, key="images")
        if not (_positive_int(image.get("height")) and _positive_int(image.get("width"))):
            raise InputError(f"images[{k}] (id {image['id']}): needs positive integer height and width", file=where_file)
        if image["id"] in images:
            raise InputError(f"images[{k}]: duplicate image id {image['id']}", file=where_file)
        images[image["id"]] = dict(image)
    categories: dict[int, dict] = {}
    for k, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise InputError(f"categories[{k}]: needs an integer 'id'", file=where_file, key="categories")
        if category["id"] in categories:
            raise InputError(f"categories[{k}]: duplicate category id {category['id']}", file=where_file)
        categories[category["id"]] = dict(category)
    if not categories:
        raise InputError("no categories", file=where_file, key="categories")

    annotations = []
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        if not isinstance(ann, dict):
            raise InputError(f"{where}: not an object", file=where_file)
        image = images.get(ann.get("image_id"))
        if image is None:
            raise InputError(f"{where}: unknown image_id {ann.get('image_id')!r}", file=where_file)
        if ann.get("category_id") not in categories:
            raise InputError(f"{where}: unknown category_id {ann.get('category_id')!r}", file=where_file)
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            rle = polygon_to_rle(segmentation, image["height"], image["width"], where=where, file=where_file)
        else:
            rle = check_rle(segmentation, image["height"], image["width"], where=where, file=where_file)
        iscrowd = int(ann.get("iscrowd", 0) or 0)
        annotations.append(
            {
                "id": k + 1,  # renumbered: pycocotools needs unique ids, files do not always have them
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": iscrowd,
            }
        )

    grouped: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for ann in annotations:
        grouped[ann["image_id"], ann["category_id"]].append(ann["segmentation"])
    unions = {key: _merge(rles) for key, rles in grouped.items()}

    dataset = {"images": list(images.values()), "categories": list(categories.values()), "annotations": annotations}
    stage1 = list(categories) == [STAGE1_CATEGORY["id"]] and categories[1].get("name") == STAGE1_CATEGORY["name"]
    return GroundTruth(
        coco=quiet_coco(dataset),
        images=images,
        categories=categories,
        slugs={cid: _slug(c) for cid, c in categories.items()},
        multi_category=not stage1,
        source=str(where_file) if where_file else "<dict>",
        unions=unions,
    )


def _merge(rles: list[dict]) -> dict:
    merged = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
    counts = merged["counts"]
    return {"size": merged["size"], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


# ---------------------------------------------------------------------------------------------
# Predictions


def check_predictions(gt: GroundTruth, predictions: list[dict], *, file=None) -> list[dict]:
    """Validate a COCO results list against the truth; returns clean copies (compressed RLE)."""
    if not isinstance(predictions, list):
        raise InputError("predictions must be a JSON list of COCO results", file=file)
    clean = []
    for k, pred in enumerate(predictions):
        where = f"prediction {k}"
        if not isinstance(pred, dict):
            raise InputError(f"{where}: not an object", file=file)
        image = gt.images.get(pred.get("image_id"))
        if image is None:
            raise InputError(f"{where}: image_id {pred.get('image_id')!r} is not in the ground truth", file=file)
        where = f"prediction {k} (image_id {pred['image_id']})"
        if pred.get("category_id") not in gt.categories:
            raise InputError(
                f"{where}: category_id {pred.get('category_id')!r} is not in the ground truth "
                f"(known: {sorted(gt.categories)})",
                file=file,
            )
        score = pred.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not (0.0 <= score <= 1.0):
            raise InputError(f"{where}: score must be a number in [0, 1], got {score!r}", file=file)
        rle = check_rle(pred.get("segmentation"), image["height"], image["width"], where=where, file=file)
        clean.append(
            {"image_id": pred["image_id"], "category_id": pred["category_id"], "segmentation": rle, "score": float(score)}
        )
    return clean


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class EvalResult:
    """Metrics (no "val/" prefix), per-image and per-category tables, and what produced them."""

    metrics: dict[str, float]
    per_image: pd.DataFrame  # image_id, case_id, file_name, dice, cldice, biou, n_gt, n_pred, …
    per_category: pd.DataFrame  # category_id, slug, n_gt, n_images, AP…, dice, cldice, biou
    per_pair: pd.DataFrame  # image_id, category_id, slug, dice, cldice, biou, gt_px, pred_px
    settings: dict  # tolerance_px, score_threshold, gt, n_images, n_predictions, stage
    overlays: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def to_dict(self) -> dict:
        def clean(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "settings": self.settings,
            "per_category": [
                {k: clean(v) for k, v in row.items()} for row in self.per_category.to_dict(orient="records")
            ],
            "timings": self.timings,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of :meth:`to_dict` (NaN → null); written atomically to ``path`` if given."""
        payload = self.to_dict()
        if path is not None:
            write_json_atomic(path, payload)
        return json.dumps(payload, indent=2, allow_nan=False)

    def write(self, out_dir: str | Path) -> None:
        """metrics.json, per_image.csv, per_category.csv into ``out_dir`` (each atomically)."""
        out_dir = Path(out_dir)
        self.to_json(out_dir / "metrics.json")
        for name, table in (("per_image.csv", self.per_image), ("per_category.csv", self.per_category)):
            with atomic_file(out_dir / name, "w", encoding="utf-8", newline="") as handle:
                table.to_csv(handle, index=False)


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_predictions(
    gt_json: str | Path | dict | GroundTruth,
    predictions: list[dict],
    *,
    tolerance_px: int = 1,
    score_threshold: float = 0.5,
    per_category: bool = True,
    overlays_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    max_overlays: int = 8,
    predictions_file: str | Path | None = None,
) -> EvalResult:
    """Score COCO segmentation results against a COCO ground truth.

    AP, AP50, AP75: pycocotools segm AP (area "all", 100 detections per image), every
    prediction ranked by score. AP_tol, AP50_tol, AP75_tol: the same matching with the
    boundary-tolerant IoU of :func:`angioexp.evaluate.masks.tolerant_iou_matrix`
    (d = ``tolerance_px``).

    dice, cldice, biou (Boundary IoU with a band of max(d, 1) px): per image and category,
    the union of the predictions with score ≥ ``score_threshold`` against the union of the
    truth's instances. A pair is scored when the truth or the prediction is non-empty:
    a category the truth has but nothing was predicted for scores 0, a category predicted
    where the truth has none scores 0 (a false alarm), and a category absent from both is
    not scored (it would only inflate the mean). An image's value is the mean over its scored
    categories (Stage 1: its one category); ``dice`` etc. average images that have a scored
    pair (an image with no truth and no prediction is left out, NaN in ``per_image``).

    Stage 2 (categories other than Stage 1's single "coronary artery"), with ``per_category``:
    ``AP75/<slug>``, ``AP75_tol/<slug>``, ``dice/<slug>``, ``cldice/<slug>`` for each
    category with truth in these images (its Dice: mean over the images where it is scored),
    and ``dice_mean_segments``, the unweighted mean of those per-category Dice values.

    Overlays (``overlays_dir``): the ``max_overlays`` images with the lowest Dice, see
    :mod:`angioexp.evaluate.overlays`; grayscale frames are read from ``images_dir``
    (default: ``images/`` beside a ground-truth file).

    Metrics that cannot be computed (no truth at all for AP) are NaN.
    """
    if tolerance_px < 0:
        raise InputError(f"tolerance must be >= 0 px, got {tolerance_px}", key="eval.tolerance_px")
    if not 0.0 <= score_threshold <= 1.0:
        raise InputError(f"score threshold must be in [0, 1], got {score_threshold}", key="eval.score_threshold")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    gt = load_ground_truth(gt_json)
    detections = check_predictions(gt, predictions, file=predictions_file)
    coco_dt = results_coco(gt.coco, detections)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    raw = run_cocoeval(gt.coco, coco_dt)
    timings["ap"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tolerant = run_cocoeval(gt.coco, coco_dt, tolerance_px=tolerance_px)
    timings["ap_tol"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    band_px = max(int(tolerance_px), 1)
    pairs = _score_pairs(gt, detections, score_threshold, band_px)
    timings["masks"] = time.perf_counter() - t0

    per_pair = pd.DataFrame(pairs, columns=["image_id", "category_id", "slug", *PAIR_METRICS, "gt_px", "pred_px"])
    per_image = _per_image_table(gt, per_pair, detections, score_threshold)
    categories = _per_category_table(gt, raw, tolerant, per_pair)

    metrics: dict[str, float] = {}
    for suffix, evaluator in (("", raw), ("_tol", tolerant)):
        metrics[f"AP{suffix}"] = average_precision(evaluator)
        metrics[f"AP50{suffix}"] = average_precision(evaluator, 0.5)
        metrics[f"AP75{suffix}"] = average_precision(evaluator, 0.75)
    for name in PAIR_METRICS:
        values = per_image[name].dropna()
        metrics[name] = float(values.mean()) if len(values) else float("nan")
    if per_category and gt.multi_category:
        scored = categories[categories["n_gt"] > 0]
        for row in scored.itertuples(index=False):
            metrics[f"AP75/{row.slug}"] = row.AP75
            metrics[f"AP75_tol/{row.slug}"] = row.AP75_tol
            metrics[f"dice/{row.slug}"] = row.dice
            metrics[f"cldice/{row.slug}"] = row.cldice
        dice_values = scored["dice"].dropna()
        metrics["dice_mean_segments"] = float(dice_values.mean()) if len(dice_values) else float("nan")

    overlays: list[Path] = []
    if overlays_dir is not None and max_overlays > 0:
        from angioexp.evaluate.overlays import write_overlays

        t0 = time.perf_counter()
        if images_dir is None and gt.source != "<dict>":
            images_dir = Path(gt.source).parent / "images"
        overlays = write_overlays(
            gt, detections, per_image, Path(overlays_dir), images_dir=images_dir,
            score_threshold=score_threshold, max_overlays=max_overlays,
        )
        timings["overlays"] = time.perf_counter() - t0

    settings = {
        "gt": gt.source,
        "stage": 2 if gt.multi_category else 1,
        "tolerance_px": int(tolerance_px),
        "boundary_band_px": band_px,
        "score_threshold": float(score_threshold),
        "n_images": len(gt.images),
        "n_gt_instances": len(gt.coco.anns),
        "n_predictions": len(detections),
    }
    log.info(
        "evaluated %d images, %d predictions: AP75 %.3f, AP75_tol %.3f, Dice %.3f (%.2f s)",
        len(gt.images), len(detections), metrics["AP75"], metrics["AP75_tol"], metrics["dice"], sum(timings.values()),
    )
    return EvalResult(metrics, per_image, categories, per_pair, settings, overlays, timings)


def _score_pairs(gt: GroundTruth, detections: list[dict], score_threshold: float, band_px: int) -> list[tuple]:
    """Dice / clDice / Boundary IoU per (image, category) that has truth or a kept prediction."""
    kept: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for det in detections:
        if det["score"] >= score_threshold:
            kept[det["image_id"], det["category_id"]].append(det["segmentation"])
    rows = []
    for image_id, category_id in sorted(set(gt.unions) | set(kept)):
        gt_mask = gt.union_mask(image_id, category_id)
        gt_features = gt.features(image_id, category_id, band_px, gt_mask)
        rles = kept.get((image_id, category_id))
        if rles:
            pred_mask = decode(_merge(rles))
        else:
            pred_mask = np.zeros_like(gt_mask)
        pred_features = MaskFeatures.of(pred_mask, band_px)
        scores = pair_scores(pred_mask, pred_features, gt_mask, gt_features)
        rows.append(
            (image_id, category_id, gt.slugs[category_id], *(scores[m] for m in PAIR_METRICS),
             gt_features.area, pred_features.area)
        )
    return rows


def _per_image_table(gt: GroundTruth, per_pair: pd.DataFrame, detections: list[dict], score_threshold: float) -> pd.DataFrame:
    n_pred = defaultdict(int)
    for det in detections:
        if det["score"] >= score_threshold:
            n_pred[det["image_id"]] += 1
    n_gt = defaultdict(int)
    for ann in gt.coco.anns.values():
        n_gt[ann["image_id"]] += 1
    means = per_pair.groupby("image_id")[list(PAIR_METRICS)].mean() if len(per_pair) else None
    scored = per_pair.dropna(subset=["dice"]).groupby("image_id").size() if len(per_pair) else None
    rows = []
    for image_id, image in gt.images.items():
        row = {
            "image_id": image_id,
            "case_id": image.get("case_id", ""),
            "file_name": image.get("file_name", ""),
        }
        for name in PAIR_METRICS:
            row[name] = float(means.at[image_id, name]) if means is not None and image_id in means.index else float("nan")
        row["n_gt"] = n_gt[image_id]
        row["n_pred"] = n_pred[image_id]
        row["n_categories_scored"] = int(scored.get(image_id, 0)) if scored is not None else 0
        for key in ("patient_id", "frame_index", "primary_angle", "secondary_angle", "view"):
            if key in image:
                row[key] = image[key]
        rows.append(row)
    return pd.DataFrame(rows)


def _per_category_table(gt: GroundTruth, raw, tolerant, per_pair: pd.DataFrame) -> pd.DataFrame:
    cat_ids = list(raw.params.catIds)
    n_gt = defaultdict(int)
    gt_images = defaultdict(set)
    for ann in gt.coco.anns.values():
        n_gt[ann["category_id"]] += 1
        gt_images[ann["category_id"]].add(ann["image_id"])
    rows = []
    for index, category_id in enumerate(cat_ids):
        row = {"category_id": category_id, "slug": gt.slugs[category_id], "n_gt": n_gt[category_id],
               "n_images": len(gt_images[category_id])}
        for suffix, evaluator in (("", raw), ("_tol", tolerant)):
            row[f"AP{suffix}"] = average_precision(evaluator, None, index)
            row[f"AP50{suffix}"] = average_precision(evaluator, 0.5, index)
            row[f"AP75{suffix}"] = average_precision(evaluator, 0.75, index)
        scores = per_pair[per_pair["category_id"] == category_id]
        for name in PAIR_METRICS:
            values = scores[name].dropna()
            row[name] = float(values.mean()) if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Label-noise ceiling


def annotations_as_predictions(coco_json: str | Path | dict) -> list[dict]:
    """The annotations of a COCO file as a results list, every one with score 1."""
    data = coco_json if isinstance(coco_json, dict) else _read_json(Path(coco_json))
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError("missing or non-list 'annotations'", file=None if isinstance(coco_json, dict) else coco_json)
    return [
        {"image_id": a.get("image_id"), "category_id": a.get("category_id"), "segmentation": a.get("segmentation"),
         "score": 1.0}
        for a in data["annotations"]
    ]


def label_noise_ceiling(coco_dir: str | Path, split: str = "val", **kwargs) -> EvalResult:
    """Score the training labels (``annotations.json``) against the clean truth
    (``annotations_gt.json``) of ``<coco_dir>/<split>``.

    The result is what a model that reproduced its training labels perfectly would score on
    clean truth: read every AP75 next to this one. Keyword arguments go to
    :func:`evaluate_predictions` (tolerance_px, score_threshold, overlays_dir, …).
    """
    split_dir = Path(coco_dir) / split
    labels = split_dir / "annotations.json"
    clean = split_dir / "annotations_gt.json"
    if not clean.is_file():
        raise InputError(
            "no clean labels (annotations_gt.json) for this split: the ceiling compares the training "
            "labels with clean truth, which only synthetic or doubly-annotated data have",
            file=clean,
        )
    predictions = annotations_as_predictions(labels)
    kwargs.setdefault("images_dir", split_dir / "images")
    result = evaluate_predictions(clean, predictions, predictions_file=labels, **kwargs)
    result.settings["predictions"] = str(labels)
    result.settings["mode"] = "ceiling"
    return result
