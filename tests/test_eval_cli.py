"""`angioexp evaluate` end to end on a small COCO folder (the layout `angioexp convert` writes),
overlay PNGs, atomic outputs, and — when the data pipeline is present — the real synthetic data."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from angioexp.cli import main
from angioexp.evaluate.masks import dice as mask_dice
from angioexp.evaluate.overlays import FN_RGB, FP_RGB, TP_RGB
from angioexp.evaluate.phantoms import dilate, random_vessel_tree, shift
from angioexp.evaluate.rle import encode

SIZE = 128
CASES = 6


def coco_dict(masks):
    return {
        "images": [
            {"id": i + 1, "width": SIZE, "height": SIZE, "file_name": f"images/case{i:02d}.png", "case_id": f"case{i:02d}",
             "primary_angle": -30.0, "secondary_angle": 25.0}
            for i in range(len(masks))
        ],
        "categories": [{"id": 1, "name": "coronary artery", "supercategory": "vessel"}],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": encode(m), "iscrowd": 0}
            for i, m in enumerate(masks)
        ],
    }


@pytest.fixture()
def coco_dir(tmp_path):
    """val split: clean truth, noisy training labels (1-px errors, worse on later cases), frames."""
    trees = [random_vessel_tree(SIZE, 100 + i) for i in range(CASES)]
    noisy = [shift(t, 0, 1) if i < 3 else dilate(shift(t, 1, 1), 1) for i, t in enumerate(trees)]
    split = tmp_path / "coco" / "val"
    (split / "images").mkdir(parents=True)
    for i, tree in enumerate(trees):
        frame = np.where(tree, 60, 180).astype(np.uint8)
        Image.fromarray(frame).save(split / "images" / f"case{i:02d}.png")
    (split / "annotations_gt.json").write_text(json.dumps(coco_dict(trees)))
    (split / "annotations.json").write_text(json.dumps(coco_dict(noisy)))
    return tmp_path / "coco", trees, noisy


def test_ceiling_writes_everything(coco_dir, tmp_path, capsys):
    coco, trees, noisy = coco_dir
    out = tmp_path / "ceiling"
    assert main(["evaluate", "--coco", str(coco), "--ceiling", "--out", str(out), "--max-overlays", "4"]) == 0
    printed = capsys.readouterr().out
    assert "annotations_gt.json (clean)" in printed and "AP75_tol" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    expected_dice = np.mean([mask_dice(n, t) for n, t in zip(noisy, trees)])
    assert metrics["metrics"]["dice"] == pytest.approx(expected_dice)
    assert metrics["settings"]["mode"] == "ceiling"
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == CASES and per_image["primary_angle"].eq(-30.0).all()
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == 4
    # Worst Dice first: the first overlay is the lowest-Dice case.
    worst = per_image.sort_values("dice").iloc[0]["case_id"]
    assert overlays[0].name == f"01_{worst}.png"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_overlay_colours(coco_dir, tmp_path):
    coco, trees, noisy = coco_dir
    # One prediction: the truth of case 0 shifted right by 1 px, so a column of FP and FN each.
    predictions = [{"image_id": 1, "category_id": 1, "segmentation": encode(shift(trees[0], 0, 1)), "score": 0.9}]
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps(predictions))
    out = tmp_path / "eval"
    assert main(["evaluate", "--coco", str(coco), "--predictions", str(pred_file), "--out", str(out)]) == 0
    first = sorted((out / "overlays").iterdir())
    assert len(first) == CASES  # every image has truth; 5 score 0 and come first
    overlay = next(p for p in first if "case00" in p.name)
    image = np.asarray(Image.open(overlay).convert("RGB"))
    scale = image.shape[1] // SIZE
    body = image[-SIZE * scale :: scale, ::scale]  # undo the title strip and the enlargement
    predicted = shift(trees[0], 0, 1)
    tp, fp, fn = trees[0] & predicted, predicted & ~trees[0], trees[0] & ~predicted

    def dominant(pixels):
        return np.argmax(body[pixels].mean(axis=0))

    assert dominant(tp) == int(np.argmax(TP_RGB)) == 1  # green
    assert dominant(fp) == int(np.argmax(FP_RGB)) == 0  # red
    assert dominant(fn) == int(np.argmax(FN_RGB)) == 2  # blue
    background = body[~(trees[0] | predicted)]
    assert (background[:, 0] == background[:, 1]).all() and (background[:, 1] == background[:, 2]).all()


def test_gt_choice_and_existing_output(coco_dir, tmp_path, capsys):
    coco, trees, noisy = coco_dir
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps([
        {"image_id": i + 1, "category_id": 1, "segmentation": encode(m), "score": 1.0} for i, m in enumerate(noisy)
    ]))
    out = tmp_path / "train-gt"
    args = ["evaluate", "--coco", str(coco), "--predictions", str(pred_file), "--gt", "train", "--out", str(out), "--max-overlays", "0"]
    assert main(args) == 0
    assert "annotations.json (training labels)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["metrics"]["dice"] == pytest.approx(1.0)
    # A second run must not clobber the folder unless asked to.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_bad_predictions_write_nothing(coco_dir, tmp_path, capsys):
    coco, trees, _ = coco_dir
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps([{"image_id": 42, "category_id": 1, "segmentation": encode(trees[0]), "score": 1}]))
    out = tmp_path / "bad"
    assert main(["evaluate", "--coco", str(coco), "--predictions", str(pred_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "preds.json" in err and "prediction 0: image_id 42 is not in the ground truth" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]
    pred_file.write_text("[{")
    assert main(["evaluate", "--coco", str(coco), "--predictions", str(pred_file), "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_missing_frame_is_reported(coco_dir, tmp_path, capsys):
    coco, _, _ = coco_dir
    (coco / "val" / "images" / "case03.png").unlink()
    out = tmp_path / "x"
    assert main(["evaluate", "--coco", str(coco), "--ceiling", "--out", str(out)]) == 2
    assert "case03.png" in capsys.readouterr().err and not out.exists()


def test_ceiling_needs_clean_labels(coco_dir, tmp_path, capsys):
    coco, _, _ = coco_dir
    (coco / "val" / "annotations_gt.json").unlink()
    assert main(["evaluate", "--coco", str(coco), "--ceiling", "--out", str(tmp_path / "c")]) == 2
    assert "no clean labels" in capsys.readouterr().err
    assert main(["evaluate", "--coco", str(coco), "--split", "test", "--ceiling"]) == 2
    assert "no split 'test'" in capsys.readouterr().err


def test_checkpoint_mode(coco_dir, tmp_path, capsys):
    coco, _, _ = coco_dir
    missing = tmp_path / "nope.pt"
    code = main(["evaluate", "--coco", str(coco), "--checkpoint", str(missing), "--out", str(tmp_path / "k")])
    assert code == 2
    err = capsys.readouterr().err
    if importlib.util.find_spec("angioexp.train.inference") is None:
        assert "angioexp.train.inference" in err
    else:
        assert "checkpoint not found" in err


# --- the real pipeline (synthetic generator + converter), when present -------------------------


def _pipeline_available() -> bool:
    try:
        from angioexp.data.convert import convert  # noqa: F401
        from angioexp.data.synthetic import generate  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _pipeline_available(), reason="angioexp.data.synthetic / convert not in this tree yet")
def test_ceiling_on_synthetic_stage1(request, tmp_path):
    from angioexp.evaluate import label_noise_ceiling

    coco = request.getfixturevalue("coco_stage1")
    result = label_noise_ceiling(coco, "val", overlays_dir=tmp_path / "ov", max_overlays=2)
    m = result.metrics
    assert 0.3 < m["dice"] < 1.0  # pseudo-labels are noisy but related to the truth
    assert m["AP75_tol"] >= m["AP75"] and m["AP_tol"] >= m["AP"]
    assert len(list((tmp_path / "ov").iterdir())) == 2


@pytest.mark.skipif(not _pipeline_available(), reason="angioexp.data.synthetic / convert not in this tree yet")
def test_stage2_labels_against_themselves(request):
    from angioexp.evaluate import annotations_as_predictions, evaluate_predictions

    coco = request.getfixturevalue("coco_stage2")
    labels = coco / "val" / "annotations.json"
    result = evaluate_predictions(labels, annotations_as_predictions(labels))
    m = result.metrics
    assert m["AP75"] == pytest.approx(1.0) and m["dice_mean_segments"] == pytest.approx(1.0)
    assert any(k.startswith("AP75/") for k in m) and any(k.startswith("cldice/") for k in m)
