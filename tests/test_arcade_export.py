"""export-arcade: replica → import-arcade → convert → export the truth as predictions → ARCADE metric 1.0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from scipy import ndimage
from shapely.geometry import Polygon

from angioexp.cli import main
from angioexp.evaluate.arcade import arcade_mean_f1, score_submission
from angioexp.evaluate.arcade import main as arcade_main
from angioexp.evaluate.evaluator import annotations_as_predictions, load_ground_truth
from angioexp.evaluate.export_arcade import mask_polygons

from tests.helpers.arcade_replica import ARCADE_ID, ARCADE_NAMES, make_arcade, truth_json


def _truth_as_predictions(coco_split: Path, path: Path) -> Path:
    path.write_text(json.dumps(annotations_as_predictions(coco_split / "annotations.json")))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The replica imported and converted (Stage 2) at full size and at 256 px."""
    tmp = tmp_path_factory.mktemp("arcade")
    root = make_arcade(tmp / "in", images_per_split=2)
    assert main(["import-arcade", "--root", str(root), "--out", str(tmp / "study")]) == 0
    for size in ("512", "256"):
        assert main(["convert", "--index", str(tmp / "study" / "index.csv"), "--out", str(tmp / f"coco{size}"),
                     "--stage", "2", "--size", size, "--workers", "1"]) == 0
    return root, tmp


def test_export_round_trip_scores_one(converted, tmp_path, capsys):
    root, tmp = converted
    split = tmp / "coco512" / "test"
    predictions = _truth_as_predictions(split, tmp_path / "predictions.json")
    out = tmp_path / "submission.json"
    assert main(["export-arcade", "--coco", str(split), "--predictions", str(predictions), "--out", str(out)]) == 0
    submission = json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in submission["categories"]] == list(enumerate(ARCADE_NAMES, start=1))
    assert [(i["id"], i["file_name"]) for i in submission["images"]] == [(1, "1.png"), (2, "2.png")]
    # ARCADE's ids by name: "9a" is 10 (angioexp 17), "16c" 23 (angioexp 25), "12b" 24 (angioexp 20)
    assert sorted({a["category_id"] for a in submission["annotations"]}) == sorted(
        ARCADE_ID[n] for n in ("5", "6", "9a", "16c", "12b"))
    two_pieces = next(a for a in submission["annotations"] if a["category_id"] == ARCADE_ID["12b"])
    # one polygon per piece, largest first (the scorer reads [0]); 8 corners, each cut 0.5 px back
    assert [len(p) for p in two_pieces["segmentation"]] == [16, 16]
    assert two_pieces["area"] == 8 * 80 + 6 * 40 - 8 * 0.125

    score = score_submission(truth_json(root, "test"), out)
    assert score.mean_f1 == pytest.approx(1.0, abs=1e-12) and score.unscored == []
    assert arcade_main(["--truth", str(truth_json(root, "test")), "--submission", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean_f1"] == pytest.approx(1.0)
    assert arcade_main(["--truth", str(out), "--submission", str(truth_json(root, "test")) + "x"]) == 2
    assert "file not found" in capsys.readouterr().err
    gt = load_ground_truth(split / "annotations.json")
    assert arcade_mean_f1(gt, json.loads(predictions.read_text())) == pytest.approx(1.0)


def test_export_with_template_rescales_to_arcade_size(converted, tmp_path):
    root, tmp = converted
    split = tmp / "coco256" / "test"
    template = json.loads(truth_json(root, "test").read_text())
    template["annotations"] = []
    template["images"].append({"id": 3, "width": 512, "height": 512, "file_name": "3.png"})  # not imported
    (tmp_path / "template.json").write_text(json.dumps(template))
    predictions = _truth_as_predictions(split, tmp_path / "predictions.json")
    out = tmp_path / "submission.json"
    assert main(["export-arcade", "--coco", str(split / "annotations.json"), "--predictions", str(predictions),
                 "--out", str(out), "--template", str(tmp_path / "template.json")]) == 0
    submission = json.loads(out.read_text())
    assert submission["images"] == template["images"] and submission["categories"] == template["categories"]
    truth = json.loads(truth_json(root, "test").read_text())
    truth["images"].append(template["images"][-1])  # same count as the submission; 3.png has no truth
    score = score_submission(truth, submission)
    # outlines traced at 256 px cut corners 1 px deep once doubled: ~0.0006 below the full-size 1.0
    assert score.mean_f1 == pytest.approx(1.0, abs=1e-3) and score.unscored == ["3.png"]
    assert score.mean_f1 < 1.0


def test_export_refuses_existing_output_and_bad_predictions(converted, tmp_path, capsys):
    _, tmp = converted
    split = tmp / "coco512" / "test"
    predictions = _truth_as_predictions(split, tmp_path / "predictions.json")
    out = tmp_path / "submission.json"
    out.write_text("keep me")
    args = ["export-arcade", "--coco", str(split), "--predictions", str(predictions)]
    assert main([*args, "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert "already exists" in message and str(out) in message and "\n" not in message
    assert out.read_text() == "keep me"

    bad = json.loads(predictions.read_text())
    bad[0]["category_id"] = 99
    predictions.write_text(json.dumps(bad))
    fresh = tmp_path / "fresh.json"
    assert main([*args, "--out", str(fresh)]) == 2
    assert "category_id 99" in capsys.readouterr().err
    assert not fresh.exists() and not list(tmp_path.glob(".fresh.json*"))


def test_mask_polygons_rasterise_back_to_the_mask():
    rng = np.random.default_rng(0)
    exact = 0
    for _ in range(20):
        mask = ndimage.binary_opening(rng.random((40, 48)) > 0.55)
        mask[3, 3] = mask[4, 4] = True  # pieces touching only at a corner
        mask[3, 4] = mask[4, 3] = False
        polygons = mask_polygons(mask)
        flat = [list(p.ravel()) for p in polygons]
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, 40, 48))).astype(bool)
        filled = ndimage.binary_fill_holes(mask)
        assert (back >= mask).all() and (back <= filled).all()  # holes may be filled, nothing else moves
        if np.array_equal(filled, mask):
            exact += 1
            assert np.array_equal(back, mask)
        areas = [Polygon(p).area for p in polygons]
        assert areas == sorted(areas, reverse=True)
    assert exact >= 5
    assert mask_polygons(np.zeros((5, 5), bool)) == []


def test_imported_replica_trains(converted, tmp_path, capsys):
    """A replica of the official release imports, converts and trains (Stage 2, a few steps)."""
    _, tmp = converted
    out = tmp_path / "run"
    assert main(["train", "--stage", "2", "--no-tracking", "--coco-dir", str(tmp / "coco256"), "--out", str(out),
                 "--max-steps", "2", "--set", "init_from=none", "--set", "scratch.resolution=64",
                 "--set", "scratch.train_batch_size=2", "--set", "eval.overlays=0",
                 "--set", "train.eval_every=100"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    evaluation = json.loads((out / "eval" / "step_2" / "metrics.json").read_text())
    assert evaluation["settings"]["stage"] == 2 and evaluation["settings"]["n_images"] == 2  # the val split
    assert {row["slug"] for row in evaluation["per_category"]} >= {"left_main", "diagonal_1a", "om_2", "rplb_c"}


def test_export_refuses_a_split_that_mixes_arcade_splits(converted, tmp_path, capsys):
    root, _ = converted
    study, coco = tmp_path / "study", tmp_path / "coco"
    assert main(["import-arcade", "--root", str(root), "--out", str(study), "--split-map", "val=test"]) == 0
    assert main(["convert", "--index", str(study / "index.csv"), "--out", str(coco), "--stage", "2",
                 "--workers", "1"]) == 0
    predictions = _truth_as_predictions(coco / "test", tmp_path / "predictions.json")
    out = tmp_path / "submission.json"
    assert main(["export-arcade", "--coco", str(coco / "test"), "--predictions", str(predictions),
                 "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "both come from ARCADE's '1.png'" in message and "arcade_val_1" in message and not out.exists()
