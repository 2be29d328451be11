"""Bad input fails before training, with a clear message, and leaves no half-created runs/versions."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest

mlflow = pytest.importorskip("mlflow")
torch = pytest.importorskip("torch")


from angioexp.config import load_config, to_dict  # noqa: E402
from angioexp.errors import CheckpointLoadError, ConfigError, InputError  # noqa: E402
from angioexp.tracking.session import tracked_train  # noqa: E402

TINY = ["scratch.resolution=128", "scratch.train_batch_size=2", "train.max_steps=4", "train.eval_every=4",
        "train.checkpoint_every=4", "train.log_every=2", "data.max_val_images=2", "train.device=cpu"]


def _cfg(coco_dir, stage, tmp_path, extra=()):
    return load_config(overrides=[*TINY, f"data.coco_dir={coco_dir}", f"train.out_dir={tmp_path / 'runs'}", *extra], stage=stage)


def _register_stage1(tmp_path, model_overrides=()):
    """A Stage 1 champion whose weights come from a real core model (of the given architecture)."""
    from angioexp.model.build import build_model
    from angioexp.tracking.models import log_trained_model, register_and_alias
    from angioexp.tracking.uri import ensure_experiment

    cfg = load_config(overrides=list(model_overrides), stage=1)
    checkpoint = tmp_path / "stage1.pt"
    torch.save({"model": build_model(cfg).state_dict(), "step": 4, "config": to_dict(cfg)}, checkpoint)
    with mlflow.start_run(experiment_id=ensure_experiment("angioexp-stage1")):
        mlflow.log_metric("val/AP75_tol", 0.3, step=4)
        info = log_trained_model(checkpoint, cfg)
        return register_and_alias(info, cfg, metrics={"val/AP75_tol": 0.3})


def _names(client):
    return {e.name for e in client.search_experiments()}


def test_unknown_stage(store_uri, tmp_path):
    cfg = load_config(stage=1)
    cfg.stage = 3  # bypassing validation on purpose
    with pytest.raises(InputError, match="unknown stage") as info:
        tracked_train(cfg, argparse.Namespace())
    assert info.value.key == "stage"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(stage=3)


def test_missing_registered_model_fails_before_anything_exists(store_uri, coco_stage2, tmp_path):
    client = mlflow.MlflowClient(store_uri)
    with pytest.raises(InputError, match="registered model 'angio-stage1' does not exist") as info:
        tracked_train(_cfg(coco_stage2, 2, tmp_path), argparse.Namespace())
    assert "train Stage 1 first" in str(info.value)
    assert "angioexp-stage2" not in _names(client)
    assert client.search_registered_models() == []
    assert not (tmp_path / "runs").exists()

    # the CLI: exit 2, one line naming the problem
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [arg for kv in [*TINY, f"data.coco_dir={coco_stage2}", f"train.out_dir={tmp_path / 'runs'}"] for arg in ("--set", kv)]
    cli = subprocess.run([sys.executable, "-m", "angioexp", "train", "--stage", "2", *sets],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert cli.returncode == 2
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("angioexp train: error:") and "angio-stage1" in last


def test_missing_alias_lists_versions_and_creates_no_run(store_uri, coco_stage2, tmp_path):
    client = mlflow.MlflowClient(store_uri)
    _register_stage1(tmp_path)
    client.delete_registered_model_alias("angio-stage1", "champion")
    with pytest.raises(InputError, match="alias 'champion' is not set") as info:
        tracked_train(_cfg(coco_stage2, 2, tmp_path), argparse.Namespace())
    assert "versions: 1" in str(info.value)
    assert "angioexp-stage2" not in _names(client)


def test_unreachable_tracking_server_fails_fast(monkeypatch, coco_stage1, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    cfg = _cfg(coco_stage1, 1, tmp_path)
    with pytest.raises(InputError, match="unreachable"):
        tracked_train(cfg, argparse.Namespace())
    assert not (tmp_path / "runs").exists()
    mlflow.set_tracking_uri(None)


def test_weights_that_do_not_fit_fail_before_training(store_uri, coco_stage2, tmp_path):
    """A Stage 1 model of another architecture: refused with the load report's numbers before any
    run or run folder exists (nothing FAILED is left behind), nothing registered."""
    client = mlflow.MlflowClient(store_uri)
    _register_stage1(tmp_path, ["model.d_model=64", "model.encoder_channels=[8,16,32,48]"])
    with pytest.raises(CheckpointLoadError, match="below the required 90%"):
        tracked_train(_cfg(coco_stage2, 2, tmp_path), argparse.Namespace())
    experiment = client.get_experiment_by_name("angioexp-stage2")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert not (tmp_path / "runs").exists()
    assert [m.name for m in client.search_registered_models()] == ["angio-stage1"]
