"""evaluate_predictions on thin-vessel phantoms: the ±1 px signature of
docs/design.md#thin-vessel-metrics, Stage 2 per-segment metrics, conventions for empty images,
input checking, and agreement with plain pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.cocoeval import COCOeval

from angioexp.errors import InputError
from angioexp.evaluate import evaluate_predictions, label_noise_ceiling, load_ground_truth
from angioexp.evaluate.cocoeval import quiet_coco
from angioexp.evaluate.masks import dice as mask_dice
from angioexp.evaluate.phantoms import dilate, erode, random_vessel_tree, shift
from angioexp.evaluate.rle import encode
from angioexp.segments import BY_LABEL, stage2_categories

SIZE = 256
CASES = 24


def stage1_gt(trees: list[np.ndarray]) -> dict:
    return {
        "images": [
            {"id": i + 1, "width": t.shape[1], "height": t.shape[0], "file_name": f"images/c{i:03d}.png", "case_id": f"c{i:03d}"}
            for i, t in enumerate(trees)
        ],
        "categories": [{"id": 1, "name": "coronary artery", "supercategory": "vessel"}],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": encode(t), "iscrowd": 0}
            for i, t in enumerate(trees)
        ],
    }


def as_predictions(masks, scores=None, category_id=1):
    scores = scores if scores is not None else [1.0] * len(masks)
    return [
        {"image_id": i + 1, "category_id": category_id, "segmentation": encode(m), "score": float(s)}
        for i, (m, s) in enumerate(zip(masks, scores))
    ]


@pytest.fixture(scope="module")
def trees() -> list[np.ndarray]:
    return [random_vessel_tree(SIZE, seed) for seed in range(CASES)]


@pytest.fixture(scope="module")
def gt(trees):
    return load_ground_truth(stage1_gt(trees))


@pytest.fixture(scope="module")
def perturbed(gt, trees):
    """Metrics of every perturbation in docs/design.md#thin-vessel-metrics, scored against one truth."""
    kinds = {
        "perfect": lambda m: m,
        "shift1": lambda m: shift(m, 0, 1),
        "dilate1": lambda m: dilate(m, 1),
        "erode1": lambda m: erode(m, 1),
        "shift2": lambda m: shift(m, 0, 2),
    }
    return {name: evaluate_predictions(gt, as_predictions([f(t) for t in trees])).metrics for name, f in kinds.items()}


# --- what ±1 px does to thin-vessel metrics (docs/design.md#thin-vessel-metrics) ---------------------


def test_perfect_copy_scores_one_everywhere(perturbed):
    for key, value in perturbed["perfect"].items():
        assert value == pytest.approx(1.0), key


def test_one_pixel_shift_signature(perturbed):
    m = perturbed["shift1"]
    assert m["AP50"] >= 0.9  # every tree still found ...
    assert m["AP75"] <= 0.35  # ... but raw AP75 collapses (reference: 0.036)
    assert 0.75 <= m["dice"] <= 0.92  # reference: 0.84
    assert m["AP75_tol"] >= 0.9 and m["AP_tol"] >= 0.9  # the 1-px tolerance forgives it
    assert m["cldice"] >= 0.9  # centrelines still inside each other
    assert m["AP75_tol"] - m["AP75"] >= 0.5


def test_dilation_and_erosion(perturbed):
    grown, shrunk = perturbed["dilate1"], perturbed["erode1"]
    assert grown["AP75"] <= 0.35 and 0.75 <= grown["dice"] <= 0.92  # reference: AP75 0.046, Dice 0.85
    assert shrunk["AP75"] <= 0.2 and shrunk["dice"] < grown["dice"]  # reference: AP75 0.00, Dice 0.77
    assert grown["AP75_tol"] >= 0.9 and shrunk["AP75_tol"] >= 0.9
    # Boundary IoU at d = 1 sees that no boundary pixel is where it should be.
    assert grown["biou"] < 0.2 and shrunk["biou"] < 0.2


def test_two_pixel_shift_is_worse(perturbed):
    one, two = perturbed["shift1"], perturbed["shift2"]
    assert two["AP50"] <= one["AP50"] - 0.2  # reference: AP50 0.63
    assert two["AP75"] <= 0.05
    assert two["dice"] < one["dice"] - 0.05
    assert two["AP75_tol"] < one["AP75_tol"] - 0.2  # beyond the tolerance
    assert two["cldice"] < one["cldice"]


def test_zero_tolerance_reproduces_raw_ap(gt, trees):
    rng = np.random.default_rng(3)
    masks = [shift(t, int(rng.integers(-1, 2)), int(rng.integers(-1, 2))) for t in trees]
    metrics = evaluate_predictions(gt, as_predictions(masks, rng.random(len(masks))), tolerance_px=0).metrics
    for key in ("AP", "AP50", "AP75"):
        assert metrics[f"{key}_tol"] == pytest.approx(metrics[key])


def test_raw_ap_equals_plain_pycocotools(trees):
    """Several predictions per image, random scores, false alarms and missed images."""
    rng = np.random.default_rng(11)
    raw_gt = stage1_gt(trees)
    predictions = []
    for i, tree in enumerate(trees):
        if i % 7 == 3:
            continue  # missed image
        for _ in range(int(rng.integers(1, 4))):
            mask = shift(tree, int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
            predictions.append({"image_id": i + 1, "category_id": 1, "segmentation": encode(mask), "score": float(rng.random())})
        if i % 5 == 0:  # a false alarm: another image's tree
            predictions.append({"image_id": i + 1, "category_id": 1, "segmentation": encode(trees[(i + 1) % len(trees)]),
                                "score": float(rng.random())})
    ours = evaluate_predictions(raw_gt, predictions).metrics

    reference_gt = copy.deepcopy(raw_gt)
    for ann in reference_gt["annotations"]:  # pycocotools wants what `convert` writes
        ann["area"] = float(mask_utils.area(ann["segmentation"]))
    coco_gt = quiet_coco(reference_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(predictions))
        reference = COCOeval(coco_gt, coco_dt, iouType="segm")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert ours["AP"] == pytest.approx(reference.stats[0])
    assert ours["AP50"] == pytest.approx(reference.stats[1])
    assert ours["AP75"] == pytest.approx(reference.stats[2])


# --- conventions --------------------------------------------------------------------------------


def test_score_threshold_affects_dice_not_ap(gt, trees):
    masks = [shift(t, 0, 1) for t in trees]
    high = evaluate_predictions(gt, as_predictions(masks, [0.9] * len(masks)), score_threshold=0.5)
    low = evaluate_predictions(gt, as_predictions(masks, [0.3] * len(masks)), score_threshold=0.5)
    assert high.metrics["AP50"] == low.metrics["AP50"] >= 0.9
    assert high.metrics["dice"] > 0.75
    assert low.metrics["dice"] == 0.0  # truth everywhere, nothing kept: each image scores 0
    assert (low.per_image["n_pred"] == 0).all()


def test_empty_images_and_per_image_table(trees):
    raw = stage1_gt(trees[:4])
    raw["images"].append({"id": 99, "width": SIZE, "height": SIZE, "case_id": "no_vessel"})
    raw["images"].append({"id": 100, "width": SIZE, "height": SIZE, "case_id": "false_alarm"})
    predictions = as_predictions(trees[:4]) + [
        {"image_id": 100, "category_id": 1, "segmentation": encode(trees[5]), "score": 0.9}
    ]
    result = evaluate_predictions(raw, predictions)
    table = result.per_image.set_index("case_id")
    assert len(result.per_image) == 6
    assert math.isnan(table.loc["no_vessel", "dice"])  # nothing to find, nothing found: not scored
    assert table.loc["false_alarm", "dice"] == 0.0  # a false alarm scores 0
    assert result.metrics["dice"] == pytest.approx(4 / 5)  # 4 perfect images, 1 false alarm
    assert set(result.per_image.columns) >= {"image_id", "case_id", "dice", "cldice", "biou", "n_gt", "n_pred"}


def test_ground_truth_cache_gives_identical_results(trees):
    raw = stage1_gt(trees[:6])
    cached = load_ground_truth(raw)
    predictions = as_predictions([dilate(t, 1) for t in trees[:6]])
    first = evaluate_predictions(cached, predictions).metrics
    again = evaluate_predictions(cached, predictions).metrics  # features now from the cache
    fresh = evaluate_predictions(raw, predictions).metrics
    assert first == again == fresh
    assert raw["annotations"][0]["segmentation"]["counts"] == encode(trees[0])["counts"]  # input untouched


def test_to_json_and_write(tmp_path, trees):
    raw = stage1_gt(trees[:3])
    raw["images"].append({"id": 50, "width": SIZE, "height": SIZE})
    result = evaluate_predictions(raw, as_predictions(trees[:3]))
    text = result.to_json(tmp_path / "m.json")
    payload = json.loads(text)
    assert payload["metrics"]["dice"] == 1.0
    assert payload["settings"]["n_images"] == 4 and payload["settings"]["tolerance_px"] == 1
    assert json.loads((tmp_path / "m.json").read_text()) == payload
    result.write(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"metrics.json", "per_image.csv", "per_category.csv"}


# --- Stage 2: segments ----------------------------------------------------------------------------


def stage2_case(tree: np.ndarray):
    """Split a tree into three 'segments' by row bands (labels 5, 6, 7)."""
    rows = np.flatnonzero(tree.any(axis=1))
    cuts = np.linspace(rows[0], rows[-1] + 1, 4).astype(int)
    pieces = {}
    for label, (top, bottom) in zip((5, 6, 7), zip(cuts[:-1], cuts[1:])):
        piece = np.zeros_like(tree)
        piece[top:bottom] = tree[top:bottom]
        pieces[label] = piece
    return pieces


def test_stage2_per_segment_metrics(trees):
    cases = [stage2_case(t) for t in trees[:6]]
    raw = {
        "images": [{"id": i + 1, "width": SIZE, "height": SIZE, "case_id": f"s{i}"} for i in range(len(cases))],
        "categories": stage2_categories([5, 6, 7, 8]),  # 8 never occurs in the truth
        "annotations": [
            {"id": 10 * i + label, "image_id": i + 1, "category_id": label, "segmentation": encode(mask)}
            for i, case in enumerate(cases)
            for label, mask in case.items()
        ],
    }
    predictions = []
    for i, case in enumerate(cases):
        predictions.append({"image_id": i + 1, "category_id": 5, "segmentation": encode(case[5]), "score": 0.9})
        predictions.append({"image_id": i + 1, "category_id": 6, "segmentation": encode(shift(case[6], 0, 1)), "score": 0.9})
        # Segment 7 predicted under the wrong label (8): a miss for 7, a false alarm for 8.
        predictions.append({"image_id": i + 1, "category_id": 8, "segmentation": encode(case[7]), "score": 0.9})
    result = evaluate_predictions(raw, predictions)
    m = result.metrics
    left_main, lad_prox, lad_mid = (BY_LABEL[k].slug for k in (5, 6, 7))
    assert m[f"dice/{left_main}"] == pytest.approx(1.0) and m[f"AP75/{left_main}"] == pytest.approx(1.0)
    assert 0.6 < m[f"dice/{lad_prox}"] < 0.95 and m[f"AP75_tol/{lad_prox}"] > m[f"AP75/{lad_prox}"]
    assert m[f"dice/{lad_mid}"] == 0.0 and m[f"AP75/{lad_mid}"] == 0.0
    assert f"dice/{BY_LABEL[8].slug}" not in m  # no truth for segment 8: no per-segment key
    assert m["dice_mean_segments"] == pytest.approx(np.mean([m[f"dice/{s}"] for s in (left_main, lad_prox, lad_mid)]))
    # Per image: categories 5, 6, 7 (truth) and 8 (false alarm) are scored, mean of the four.
    assert (result.per_image["n_categories_scored"] == 4).all()
    pair = result.per_pair
    assert set(pair["category_id"]) == {5, 6, 7, 8}
    assert (pair.loc[pair["category_id"] == 8, "dice"] == 0).all()


def test_stage1_has_no_per_category_keys(gt, trees):
    metrics = evaluate_predictions(gt, as_predictions(trees)).metrics
    assert not [k for k in metrics if "/" in k] and "dice_mean_segments" not in metrics


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p[0].update(image_id=777), "prediction 0: image_id 777 is not in the ground truth"),
        (lambda p: p[1].update(category_id=3), r"prediction 1 \(image_id 2\): category_id 3 is not in the ground truth"),
        (lambda p: p[2].update(score=1.5), r"prediction 2 \(image_id 3\): score must be a number in \[0, 1\]"),
        (lambda p: p[2].update(score=float("nan")), "score must be a number"),
        (lambda p: p[0]["segmentation"].update(counts="0000"), "prediction 0 .*malformed RLE"),
        (lambda p: p[0]["segmentation"].update(size=[10, 10]), "does not match the image"),
        (lambda p: p.append("oops"), "prediction 3: not an object"),
    ],
)
def test_bad_predictions_name_the_item(trees, change, message):
    raw = stage1_gt(trees[:3])
    predictions = as_predictions(trees[:3])
    change(predictions)
    with pytest.raises(InputError, match=message):
        evaluate_predictions(raw, predictions)


def test_bad_ground_truth(tmp_path, trees):
    with pytest.raises(InputError, match="file not found"):
        load_ground_truth(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(InputError, match=r"broken.json: not valid JSON"):
        load_ground_truth(broken)
    raw = stage1_gt(trees[:2])
    raw["annotations"][1]["image_id"] = 5
    with pytest.raises(InputError, match=r"annotations\[1\]: unknown image_id 5"):
        load_ground_truth(raw)
    raw = stage1_gt(trees[:2])
    raw["annotations"][0]["segmentation"]["counts"] = "zz"
    with pytest.raises(InputError, match=r"annotations\[0\]: malformed RLE"):
        load_ground_truth(raw)
    with pytest.raises(InputError, match="no images"):
        load_ground_truth({"images": [], "annotations": [], "categories": [{"id": 1}]})
    with pytest.raises(InputError, match="tolerance"):
        evaluate_predictions(stage1_gt(trees[:1]), [], tolerance_px=-1)


def test_polygon_ground_truth_is_accepted():
    raw = {
        "images": [{"id": 1, "width": 40, "height": 30}],
        "categories": [{"id": 1, "name": "coronary artery"}],
        "annotations": [{"image_id": 1, "category_id": 1, "segmentation": [[5, 5, 30, 5, 30, 12, 5, 12]]}],
    }
    square = np.zeros((30, 40), bool)
    square[5:13, 5:31] = True
    result = evaluate_predictions(raw, as_predictions([square]))
    assert result.metrics["dice"] > 0.9


def test_many_predictions_per_split():
    """More than 255 results (pycocotools' area() overflows on such lists)."""
    square = np.zeros((16, 16), bool)
    square[4:12, 4:12] = True
    raw = stage1_gt([square] * 100)
    predictions = as_predictions([square] * 100) * 3
    assert evaluate_predictions(raw, predictions).metrics["AP50"] < 1.0  # duplicates are false positives


def test_empty_predictions(trees):
    result = evaluate_predictions(stage1_gt(trees[:3]), [])
    assert result.metrics["AP"] == 0.0 and result.metrics["dice"] == 0.0


# --- label-noise ceiling ----------------------------------------------------------------------------


def test_label_noise_ceiling(tmp_path, trees):
    split = tmp_path / "coco" / "val"
    split.mkdir(parents=True)
    clean = stage1_gt(trees[:5])
    noisy = copy.deepcopy(clean)
    noisy_masks = [dilate(t, 1) if i % 2 else shift(t, 1, 0) for i, t in enumerate(trees[:5])]
    for ann, mask in zip(noisy["annotations"], noisy_masks):
        ann["segmentation"] = encode(mask)
    (split / "annotations.json").write_text(json.dumps(noisy))
    (split / "annotations_gt.json").write_text(json.dumps(clean))
    result = label_noise_ceiling(tmp_path / "coco", "val")
    expected = np.mean([mask_dice(m, t) for m, t in zip(noisy_masks, trees[:5])])
    assert result.metrics["dice"] == pytest.approx(expected)
    assert result.metrics["AP75_tol"] >= result.metrics["AP75"]
    assert result.settings["mode"] == "ceiling"

    (split / "annotations_gt.json").unlink()
    with pytest.raises(InputError, match="no clean labels"):
        label_noise_ceiling(tmp_path / "coco", "val")
