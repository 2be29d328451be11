"""``angioexp predict`` on a Stage 2 model writes ARCADE's submission format with export-arcade's
writer (ARCADE's 26 categories and ids, polygons, frames by file name); ARCADE's scorer reads it;
an existing ``--arcade`` file is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from angioexp.cli import main
from angioexp.data.importers.arcade import ARCADE_CATEGORIES
from angioexp.evaluate.arcade import score_submission
from angioexp.evaluate.export_arcade import export_arcade
from angioexp.segments import BY_LABEL
from tests.helpers.vessel_coco import make_vessel_coco

BASE = ["--set", "scratch.resolution=64", "--set", "scratch.train_batch_size=2", "--set", "eval.overlays=0",
        "--set", "train.eval_every=100", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> tuple[Path, Path]:
    """(a 2-step Stage 2 checkpoint, its COCO data)."""
    root = tmp_path_factory.mktemp("predict-arcade")
    coco = make_vessel_coco(root / "coco", stage=2, size=64, n_train=4, n_val=2, seed=3)
    assert main(["train", "--stage", "2", "--no-tracking", "--init-from", "none", "--coco-dir", str(coco),
                 "--out", str(root / "run"), "--max-steps", "2", *BASE]) == 0
    return root / "run" / "checkpoints" / "last.pt", coco


def _predict(ckpt: Path, frames: list[Path], out: Path, *extra: str) -> int:
    return main(["predict", "--model", str(ckpt), "--input", *map(str, frames), "--out", str(out),
                 "--threshold", "0", *extra])


def test_stage2_predict_writes_an_arcade_submission_that_the_scorer_reads(stage2, tmp_path, capsys):
    ckpt, coco = stage2
    frames = sorted((coco / "val" / "images").glob("*.png"))
    out = tmp_path / "out"
    assert _predict(ckpt, frames, out) == 0
    assert f"ARCADE submission {out / 'arcade.json'}" in capsys.readouterr().out
    submission = json.loads((out / "arcade.json").read_text())
    assert [(c["id"], c["name"]) for c in submission["categories"]] == list(ARCADE_CATEGORIES)
    assert sorted(image["file_name"] for image in submission["images"]) == sorted(f.name for f in frames)
    # each predicted segment under ARCADE's id for its SYNTAX name (not angioexp's label), as polygons
    predicted = {p["category_id"] for p in json.loads((out / "predictions.json").read_text())}
    arcade_id = {name: category_id for category_id, name in ARCADE_CATEGORIES}
    assert predicted and {a["category_id"] for a in submission["annotations"]} == {arcade_id[BY_LABEL[l].syntax] for l in predicted}
    assert all(isinstance(a["segmentation"][0], list) and len(a["segmentation"][0]) >= 6 for a in submission["annotations"])
    images = json.loads((out / "images.json").read_text())
    assert sorted(image["arcade_file_name"] for image in images) == sorted(f.name for f in frames)

    # the frames' own masks in ARCADE's format, by the same writer, are the truth it is scored against
    truth = json.loads((coco / "val" / "annotations.json").read_text())["annotations"]
    export_arcade(coco / "val", [{**a, "score": 1.0} for a in truth], tmp_path / "truth.json")
    score = score_submission(tmp_path / "truth.json", out / "arcade.json")
    assert sorted(score.per_image["file_name"]) == sorted(f.name for f in frames)
    assert 0.0 <= score.mean_f1 <= 1.0
    assert score_submission(tmp_path / "truth.json", tmp_path / "truth.json").mean_f1 == pytest.approx(1.0)


def test_an_existing_arcade_file_is_refused_and_nothing_is_written(stage2, tmp_path, capsys):
    ckpt, coco = stage2
    frame = next((coco / "val" / "images").glob("*.png"))
    mine = tmp_path / "submission.json"
    mine.write_text("my earlier submission")
    assert _predict(ckpt, [frame], tmp_path / "out", "--arcade", str(mine)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "ARCADE output already exists" in line and str(mine) in line
    assert mine.read_text() == "my earlier submission"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.json"]  # no out folder, no temporary files

    # inside --out is refused too (that folder is replaced whole); elsewhere it is written there
    assert _predict(ckpt, [frame], tmp_path / "out", "--arcade", str(tmp_path / "out" / "a.json")) == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert _predict(ckpt, [frame], tmp_path / "out", "--arcade", str(tmp_path / "new.json")) == 0
    assert json.loads((tmp_path / "new.json").read_text())["images"][0]["file_name"] == frame.name
    assert not (tmp_path / "out" / "arcade.json").exists()
    # a second run with the same --arcade is refused even with --overwrite (which is for --out)
    assert _predict(ckpt, [frame], tmp_path / "out", "--arcade", str(tmp_path / "new.json"), "--overwrite") == 2
    assert "ARCADE output already exists" in capsys.readouterr().err


def test_only_the_catheter_queried_writes_no_arcade_file(stage2, tmp_path):
    from angioexp.predict import predict

    ckpt, coco = stage2
    frame = next((coco / "val" / "images").glob("*.png"))
    summary = predict(str(ckpt), [frame], tmp_path / "out", prompts=["catheter"], threshold=0.0)
    assert summary["arcade"] is None and "ARCADE's 25" in summary["no_arcade"]
    assert not (tmp_path / "out" / "arcade.json").exists()
