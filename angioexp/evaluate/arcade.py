"""ARCADE's challenge metric: per-image mean F1 over the truth's categories (see docs/arcade.md).

The organisers' scorer (``evaluation/evaluate_segmentation.py`` of the ARCADE repository),
re-implemented with the same semantics:

* the submission lists as many images and as many categories as the truth (the scorer asserts
  both; submissions start from ARCADE's 26-category template);
* images are matched by ``file_name``, categories by raw integer ``category_id`` (names unread);
* for each category that the truth annotates in an image, F1 between the first truth annotation
  of that category and the first predicted one (file order), each read as its first polygon
  (``segmentation[0]``), over polygon areas: TP = the intersection — only its largest piece when
  it falls apart —, FP/FN = the rest of prediction/truth; a truth category without a prediction
  scores 0;
* **the quirk**: if the prediction for an image holds any category that the truth lacks in that
  image, *every* truth category of that image scores 0 — the image's mean F1 is 0, whatever else
  is right;
* an image's score is the mean over its truth categories; the result is the mean over images.
  An image without any truth annotation stops the official scorer (a mean of nothing); here it is
  left out and listed in ``unscored``.

:func:`score_submission` applies this to ARCADE-format JSON (polygons, shapely geometry like the
official script). :func:`arcade_f1_per_image` / :func:`arcade_mean_f1` apply the same rules to
angioexp's masks (a :class:`GroundTruth` and COCO results with RLE), for Stage 2 evaluation: there
a category's F1 is the pixel F1 of the union of its truth instances against the union of its
detections at ``score ≥ score_threshold`` (masks have no "first polygon"), and categories that are
not ARCADE's (the catheter) are left out of truth and detections.

``python -m angioexp.evaluate.arcade --truth test.json --submission submission.json`` prints the
score of a submission (e.g. from ``angioexp export-arcade``) as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Iterable

import pandas as pd
import pycocotools.mask as mask_utils

from angioexp.errors import AngioexpError, InputError
from angioexp.evaluate.evaluator import GroundTruth, _read_json, check_predictions
from angioexp.segments import BY_SLUG

# angioexp categories that ARCADE has no counterpart for: out of the metric by default
NON_ARCADE_LABELS = frozenset({BY_SLUG["catheter"].label})


# ---------------------------------------------------------------------------------------------
# Shared rule


def image_mean_f1(truth_categories: Iterable[int], predicted_categories: Iterable[int], f1_of) -> float:
    """One image's score under ARCADE's rules; ``f1_of(category)`` scores a category both have.

    NaN when the truth has no category (the official scorer cannot score such an image).
    """
    truth, predicted = set(truth_categories), set(predicted_categories)
    if not truth:
        return math.nan
    if predicted - truth:  # the quirk: one extra category zeroes the whole image
        return 0.0
    return mean(f1_of(c) if c in predicted else 0.0 for c in sorted(truth))


# ---------------------------------------------------------------------------------------------
# ARCADE-format JSON (official semantics)


def polygon_f1(truth: list, predicted: list) -> float:
    """F1 of two flat polygons [x1, y1, x2, y2, …] the way the official scorer measures it."""
    from shapely.errors import GEOSException
    from shapely.geometry import Polygon

    try:
        pred_polygon, truth_polygon = Polygon(_points(predicted)), Polygon(_points(truth))
    except (ValueError, TypeError):  # fewer than 3 points, odd length: the official scorer gives 0 or fails
        return 0.0
    try:
        intersection = pred_polygon.intersection(truth_polygon)
    except GEOSException:  # self-intersecting outline: repaired like the official scorer does
        intersection = pred_polygon.buffer(0).intersection(truth_polygon.buffer(0))
    if intersection.geom_type == "MultiPolygon":  # only the largest overlapping piece counts as TP
        intersection = max(intersection.geoms, key=lambda piece: piece.area)
    tp = intersection.area
    if tp == 0:
        return 0.0
    fp = (pred_polygon.buffer(0) - intersection).area
    fn = (truth_polygon.buffer(0) - intersection).area
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def _points(flat: list) -> list[tuple[float, float]]:
    if len(flat) % 2:
        raise ValueError("odd number of coordinates")
    return [(float(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]


@dataclass
class ArcadeScore:
    """:func:`score_submission`'s answer: the total and the per-image table."""

    mean_f1: float  # mean over scored images ("total mean" of the official scorer)
    per_image: pd.DataFrame  # file_name, image_id (truth's), mean_f1, truth_categories, predicted_categories
    unscored: list[str] = field(default_factory=list)  # truth images without any annotation

    def to_dict(self) -> dict:
        return {"mean_f1": self.mean_f1, "unscored": self.unscored,
                "per_image": self.per_image.to_dict(orient="records")}


def _read(source) -> tuple[dict, str | None]:
    if isinstance(source, dict):
        return source, None
    return _read_json(Path(source)), str(source)


def _check(data, file, what: str) -> None:
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a COCO JSON object", file=file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{what}: missing or non-list '{key}'", file=file, key=key)
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise InputError(f"{what}: images[{k}] needs 'id' and 'file_name'", file=file)
    ids = {image["id"] for image in data["images"]}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in ids or "category_id" not in ann:
            raise InputError(f"{what}: annotations[{k}] needs a known 'image_id' and a 'category_id'", file=file)
        segmentation = ann.get("segmentation")
        if not isinstance(segmentation, list) or not segmentation or not isinstance(segmentation[0], list):
            raise InputError(f"{what}: annotations[{k}] (id {ann.get('id')}) needs a polygon segmentation "
                             "[[x1, y1, …]]", file=file)


def _first_polygons(data: dict) -> dict[str, dict[int, list]]:
    """file_name → {category id → segmentation[0] of that category's first annotation}."""
    file_of = {image["id"]: image["file_name"] for image in data["images"]}
    first: dict[str, dict[int, list]] = defaultdict(dict)
    for ann in data["annotations"]:
        first[file_of[ann["image_id"]]].setdefault(ann["category_id"], ann["segmentation"][0])
    return first


def score_submission(truth, submission) -> ArcadeScore:
    """Score an ARCADE-format submission (file or dict) against an ARCADE-format truth."""
    truth, truth_file = _read(truth)
    submission, submission_file = _read(submission)
    _check(truth, truth_file, "truth")
    _check(submission, submission_file, "submission")
    if len(truth["images"]) != len(submission["images"]):
        raise InputError(f"the submission lists {len(submission['images'])} images, the truth "
                         f"{len(truth['images'])} (ARCADE's scorer asserts they are equal)", file=submission_file)
    if len(truth["categories"]) != len(submission["categories"]):
        raise InputError(f"the submission lists {len(submission['categories'])} categories, the truth "
                         f"{len(truth['categories'])} (ARCADE's scorer asserts they are equal: start from its "
                         "26-category template)", file=submission_file)
    names = [image["file_name"] for image in truth["images"]]
    if len(set(names)) != len(names):
        raise InputError("the truth lists a file_name twice (images are matched by file_name)", file=truth_file)
    truth_first, predicted_first = _first_polygons(truth), _first_polygons(submission)
    rows, unscored = [], []
    for image in truth["images"]:
        truth_polygons = truth_first.get(image["file_name"], {})
        predicted_polygons = predicted_first.get(image["file_name"], {})
        score = image_mean_f1(truth_polygons, predicted_polygons,
                              lambda c: polygon_f1(truth_polygons[c], predicted_polygons[c]))
        if math.isnan(score):
            unscored.append(image["file_name"])
            continue
        rows.append({"file_name": image["file_name"], "image_id": image["id"], "mean_f1": score,
                     "truth_categories": sorted(truth_polygons), "predicted_categories": sorted(predicted_polygons)})
    if not rows:
        raise InputError("no truth image has an annotation: nothing to score", file=truth_file)
    per_image = pd.DataFrame(rows)
    return ArcadeScore(mean_f1=float(per_image["mean_f1"].mean()), per_image=per_image, unscored=unscored)


# ---------------------------------------------------------------------------------------------
# angioexp masks (Stage 2 evaluation)


def _pixel_f1(truth: dict, predicted: dict) -> float:
    overlap = float(mask_utils.area(mask_utils.merge([truth, predicted], intersect=True)))
    total = float(mask_utils.area(truth)) + float(mask_utils.area(predicted))
    return 2 * overlap / total if total else 0.0


def arcade_f1_per_image(gt: GroundTruth, detections: list[dict], score_threshold: float = 0.5, *,
                        ignore_categories: Iterable[int] = NON_ARCADE_LABELS) -> pd.Series:
    """Per-image mean F1 under ARCADE's rules (index: image_id; NaN where the truth is empty).

    ``detections`` are COCO results (RLE ``segmentation``, ``category_id``, ``image_id``,
    ``score``) on ``gt``'s ids, as :func:`angioexp.evaluate.evaluator.evaluate_predictions` takes.
    """
    ignored = set(ignore_categories)
    predicted: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for det in check_predictions(gt, detections):
        if det["score"] >= score_threshold and det["category_id"] not in ignored:
            predicted[det["image_id"], det["category_id"]].append(det["segmentation"])
    truth_of: dict[int, set[int]] = defaultdict(set)
    for image_id, category_id in gt.unions:
        if category_id not in ignored:
            truth_of[image_id].add(category_id)
    predicted_of: dict[int, set[int]] = defaultdict(set)
    for image_id, category_id in predicted:
        predicted_of[image_id].add(category_id)

    scores = {}
    for image_id in gt.images:
        def f1_of(category_id: int, image_id=image_id) -> float:
            rles = predicted[image_id, category_id]
            union = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
            return _pixel_f1(gt.unions[image_id, category_id], union)

        scores[image_id] = image_mean_f1(truth_of[image_id], predicted_of[image_id], f1_of)
    return pd.Series(scores, name="arcade_f1", dtype=float).rename_axis("image_id")


def arcade_mean_f1(gt: GroundTruth, detections: list[dict], score_threshold: float = 0.5, *,
                   ignore_categories: Iterable[int] = NON_ARCADE_LABELS) -> float:
    """Mean over images (those with truth) of :func:`arcade_f1_per_image`; NaN if none has truth."""
    per_image = arcade_f1_per_image(gt, detections, score_threshold, ignore_categories=ignore_categories).dropna()
    return float(per_image.mean()) if len(per_image) else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m angioexp.evaluate.arcade",
                                     description="ARCADE's mean F1 of a submission JSON against a truth JSON")
    parser.add_argument("--truth", required=True, help="ARCADE-format truth (e.g. syntax/test/annotations/test.json)")
    parser.add_argument("--submission", required=True, help="ARCADE-format submission")
    args = parser.parse_args(argv)
    try:
        score = score_submission(args.truth, args.submission)
    except AngioexpError as exc:
        print(f"arcade score: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"mean_f1": score.mean_f1, "images": len(score.per_image), "unscored": score.unscored}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
