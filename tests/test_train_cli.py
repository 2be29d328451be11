"""``angioexp train`` (core backend, --no-tracking): a plain run, a resume, bad input."""

from __future__ import annotations

import pytest

from angioexp.checkpoints import read_checkpoint
from angioexp.cli import main
from tests.helpers.vessel_coco import make_vessel_coco

BASE = ["--set", "scratch.resolution=64", "--set", "scratch.train_batch_size=2", "--set", "eval.overlays=0",
        "--set", "train.eval_every=100", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_vessel_coco(tmp_path_factory.mktemp("coco"), stage=1, size=64, n_train=4, n_val=2)


def test_train_then_resume_without_tracking(tmp_path, coco, capsys):
    out = tmp_path / "run"
    code = main(["train", "--stage", "1", "--no-tracking", "--coco-dir", str(coco), "--out", str(out),
                 "--max-steps", "2", *BASE])
    assert code == 0
    assert "trained 2 steps (max_steps" in capsys.readouterr().out
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    assert (out / "config.yaml").is_file() and (out / "eval" / "step_2" / "metrics.json").is_file()

    assert main(["train", "--no-tracking", "--resume", str(out), "--max-steps", "3"]) == 0
    payload = read_checkpoint(out / "checkpoints" / "last.pt")
    assert payload["step"] == 3 and payload["config"]["train"]["max_steps"] == 3


def test_unknown_config_key_suggests_the_nearest(tmp_path, coco, capsys):
    code = main(["train", "--no-tracking", "--coco-dir", str(coco), "--out", str(tmp_path / "r"),
                 "--set", "scratch.lr_scal=0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "scratch.lr_scal" in err and "did you mean 'scratch.lr_scale'" in err
    assert not (tmp_path / "r").exists()


def test_out_of_range_values_are_rejected_before_training(tmp_path, coco, capsys):
    for bad, key in (("scratch.lr_scale=0", "scratch.lr_scale"), ("prompts.num_points=[3,1]", "prompts.num_points"),
                     ("scratch.hflip_prob=2", "scratch.hflip_prob"), ("model.context_layers=-1", "model.context_layers")):
        assert main(["train", "--no-tracking", "--coco-dir", str(coco), "--out", str(tmp_path / "r"), "--set", bad]) == 2
        assert key in capsys.readouterr().err


def test_resume_from_a_folder_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--no-tracking", "--resume", str(tmp_path / "empty")]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_stage_defaults_apply_only_where_nothing_was_said(tmp_path):
    from angioexp.config import load_config

    s1, s2 = load_config(stage=1), load_config(stage=2)
    assert (s1.scratch.resolution, s1.scratch.crop_size) == (512, 256)
    assert (s2.scratch.resolution, s2.scratch.crop_size) == (256, None)  # core Stage 2: whole frames
    assert (s1.model.context_layers, s1.model.region_masks) == (0, False)
    assert (s2.model.context_layers, s2.model.region_masks) == (2, True)
    # an explicit value wins, from an override or from the file (stage set in the file too)
    assert load_config(stage=2, overrides=["scratch.crop_size=128"]).scratch.crop_size == 128
    path = tmp_path / "s2.yaml"
    path.write_text("stage: 2\nscratch:\n  resolution: 512\n", encoding="utf-8")
    from_file = load_config(path)
    assert (from_file.scratch.resolution, from_file.scratch.crop_size) == (512, None)
    # the sam3 backend keeps its own (SAM3's) defaults in Stage 2
    assert load_config(stage=2, backend="sam3").scratch.resolution == 1008
