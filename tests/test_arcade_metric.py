"""ARCADE's challenge metric on hand-built frames whose answer is known, its quirks included."""

from __future__ import annotations

import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from angioexp.errors import InputError
from angioexp.evaluate.arcade import arcade_f1_per_image, arcade_mean_f1, polygon_f1, score_submission
from angioexp.evaluate.evaluator import load_ground_truth

from tests.helpers.arcade_replica import rect


def test_polygon_f1_known_values():
    square = rect(0, 0, 10, 10)
    assert polygon_f1(square, square) == pytest.approx(1.0)
    assert polygon_f1(square, rect(5, 0, 15, 10)) == pytest.approx(0.5)  # TP 50, FP 50, FN 50
    assert polygon_f1(square, rect(20, 20, 30, 30)) == 0.0
    assert polygon_f1(square, rect(0, 0, 10, 5)) == pytest.approx(2 * 50 / (100 + 50))
    assert polygon_f1(square, [0, 0, 5, 5]) == 0.0  # two points: no polygon
    # a bow-tie (self-intersecting) prediction is repaired with buffer(0) like the official scorer
    assert 0.0 <= polygon_f1(square, [0, 0, 10, 10, 10, 0, 0, 10]) <= 1.0


def test_polygon_f1_counts_only_the_largest_overlapping_piece():
    # a U of area 250 and a bar of area 120 across its two arms: the overlap is two 40-px pieces
    u_shape = [0, 0, 30, 0, 30, 10, 20, 10, 20, 5, 10, 5, 10, 10, 0, 10]
    bar = rect(0, 6, 30, 10)
    tp, fp, fn = 40, 120 - 40, 250 - 40  # the second piece counts as FP and FN, not TP
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert polygon_f1(u_shape, bar) == pytest.approx(2 * precision * recall / (precision + recall))
    assert polygon_f1(u_shape, bar) == pytest.approx(0.2162, abs=1e-4)  # true pixel F1 would be 0.432


def _coco(images, annotations, n_categories=26):
    return {"images": [{"id": i, "file_name": f, "height": 64, "width": 64} for i, f in images],
            "categories": [{"id": c, "name": str(c)} for c in range(1, n_categories + 1)],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "segmentation": seg}
                            for k, (i, c, seg) in enumerate(annotations)]}


def _hand_built():
    a, b = rect(0, 0, 10, 10), rect(20, 20, 30, 40)
    truth = _coco([(1, "1.png"), (2, "2.png"), (3, "3.png"), (4, "4.png"), (5, "5.png")], [
        (1, 5, [a]), (1, 10, [b]),             # 1.png: both right → 1
        (2, 5, [a]),                           # 2.png: right, plus a category the truth lacks → 0 (quirk)
        (3, 5, [a]), (3, 10, [b]),             # 3.png: one of two categories missing → 0.5
        (4, 7, [a]), (4, 7, [b]),              # 4.png: only the first annotation of a category counts → 1
    ])                                         # 5.png: no truth → not scored (the official scorer fails)
    # the submission numbers its images differently and lists them in another order: matched by file_name
    submission = _coco([(50, "5.png"), (40, "4.png"), (30, "3.png"), (20, "2.png"), (10, "1.png")], [
        (10, 10, [b]), (10, 5, [a]),
        (20, 5, [a]), (20, 9, [rect(50, 50, 52, 52)]),
        (30, 5, [a]),
        (40, 7, [a]), (40, 7, [rect(40, 40, 60, 60)]),
        (50, 3, [a]),
    ])
    return truth, submission


def test_score_submission_official_semantics(tmp_path):
    truth, submission = _hand_built()
    score = score_submission(truth, submission)
    assert score.per_image.set_index("file_name")["mean_f1"].to_dict() == pytest.approx(
        {"1.png": 1.0, "2.png": 0.0, "3.png": 0.5, "4.png": 1.0})
    assert score.mean_f1 == pytest.approx(2.5 / 4) and score.unscored == ["5.png"]
    # the quirk in isolation: the extra category is what zeroes 2.png
    submission["annotations"] = [a for a in submission["annotations"] if a["category_id"] != 9]
    assert score_submission(truth, submission).per_image.set_index("file_name").loc["2.png", "mean_f1"] == 1.0
    # files work the same as dicts
    (tmp_path / "t.json").write_text(json.dumps(truth))
    (tmp_path / "s.json").write_text(json.dumps(submission))
    assert score_submission(tmp_path / "t.json", tmp_path / "s.json").mean_f1 == pytest.approx(3.5 / 4)


def test_score_submission_categories_by_raw_id():
    truth, submission = _hand_built()
    for category in submission["categories"]:  # names are never read: renaming changes nothing
        category["name"] = f"renamed {category['id']}"
    assert score_submission(truth, submission).mean_f1 == pytest.approx(2.5 / 4)


def test_score_submission_asserts_counts(tmp_path):
    truth, submission = _hand_built()
    short = dict(submission, categories=submission["categories"][:25])
    with pytest.raises(InputError, match="25 categories, the truth 26"):
        score_submission(truth, short)
    fewer = dict(submission, images=submission["images"][1:],
                 annotations=[a for a in submission["annotations"] if a["image_id"] != 50])
    with pytest.raises(InputError, match="4 images, the truth 5"):
        score_submission(truth, fewer)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="bad.json"):
        score_submission(truth, tmp_path / "bad.json")


# ---- the same rules on angioexp masks (Stage 2) -------------------------------------------------


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _box(y0, y1, x0, x1, shape=(32, 32)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _stage2_truth():
    lm, lad, cath = _box(0, 4, 0, 20), _box(10, 30, 10, 14), _box(28, 32, 0, 32)
    annotations = [(1, 5, lm), (1, 6, lad), (2, 5, lm), (4, 5, lm), (4, 26, cath)]
    gt = load_ground_truth({
        "images": [{"id": i, "file_name": f"{i}.png", "height": 32, "width": 32} for i in (1, 2, 3, 4)],
        "categories": [{"id": c, "name": str(c)} for c in (5, 6, 7, 26)],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "segmentation": _rle(m)}
                        for k, (i, c, m) in enumerate(annotations)],
    })
    return gt, lm, lad, cath


def test_arcade_f1_per_image_on_masks():
    gt, lm, lad, cath = _stage2_truth()
    half_lad = _box(10, 20, 10, 14)  # 40 of the truth's 80 px: F1 = 2·40 / (80 + 40)
    detections = [
        {"image_id": 1, "category_id": 5, "segmentation": _rle(lm), "score": 0.9},
        {"image_id": 1, "category_id": 6, "segmentation": _rle(half_lad), "score": 0.8},
        {"image_id": 1, "category_id": 7, "segmentation": _rle(lad), "score": 0.2},  # below the threshold
        {"image_id": 2, "category_id": 5, "segmentation": _rle(lm), "score": 0.9},
        {"image_id": 2, "category_id": 7, "segmentation": _rle(lad), "score": 0.6},  # the quirk: image 2 → 0
        {"image_id": 3, "category_id": 5, "segmentation": _rle(lm), "score": 0.9},  # no truth: NaN
        {"image_id": 4, "category_id": 5, "segmentation": _rle(lm), "score": 0.9},
        {"image_id": 4, "category_id": 26, "segmentation": _rle(cath), "score": 0.9},  # catheter: not ARCADE's
    ]
    per_image = arcade_f1_per_image(gt, detections)
    assert per_image.index.name == "image_id" and list(per_image.index) == [1, 2, 3, 4]
    assert per_image[1] == pytest.approx((1.0 + 2 * 40 / 120) / 2)
    assert per_image[2] == 0.0 and math.isnan(per_image[3]) and per_image[4] == pytest.approx(1.0)
    assert arcade_mean_f1(gt, detections) == pytest.approx((per_image[1] + 0.0 + 1.0) / 3)
    # a lower threshold lets image 1's stray category in: the quirk zeroes it too
    assert arcade_f1_per_image(gt, detections, score_threshold=0.1)[1] == 0.0
    # counting the catheter as a category: image 4 scores it like any other (its truth has it)
    assert arcade_f1_per_image(gt, detections, ignore_categories=())[4] == pytest.approx(1.0)
    without_catheter = [d for d in detections if d["category_id"] != 26]
    assert arcade_f1_per_image(gt, without_catheter, ignore_categories=())[4] == pytest.approx(0.5)


def test_arcade_f1_merges_instances_of_a_category():
    gt, lm, _, _ = _stage2_truth()
    pieces = [{"image_id": 2, "category_id": 5, "segmentation": _rle(part), "score": 0.9}
              for part in (lm & _box(0, 32, 0, 10), lm & _box(0, 32, 10, 32))]
    assert arcade_f1_per_image(gt, pieces)[2] == pytest.approx(1.0)
    assert arcade_f1_per_image(gt, pieces[:1])[2] == pytest.approx(2 * 40 / (80 + 40))


def test_arcade_f1_rejects_bad_detections():
    gt, lm, _, _ = _stage2_truth()
    with pytest.raises(InputError, match="category_id 99"):
        arcade_f1_per_image(gt, [{"image_id": 1, "category_id": 99, "segmentation": _rle(lm), "score": 0.9}])
