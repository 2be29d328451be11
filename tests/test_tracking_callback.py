"""MlflowCallback against a real SQLite MLflow store, hooks driven directly (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")


from angioexp.config import flatten, load_config  # noqa: E402
from angioexp.tracking.callback import (  # noqa: E402
    CHECKPOINT_STEP_TAG,
    LEARNING_CURVE,
    OUT_DIR_TAG,
    MlflowCallback,
    config_params,
    param_value,
)
from angioexp.train.callbacks import EvalArtifacts, RunInfo, TrainResult  # noqa: E402


def _new_run(client) -> str:
    from angioexp.tracking.uri import ensure_experiment

    return client.create_run(ensure_experiment("angioexp-test")).info.run_id


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _eval_files(tmp_path: Path, step: int) -> EvalArtifacts:
    folder = tmp_path / f"eval_{step}"
    (folder / "overlays").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"AP75": 0.1 * step}))
    (folder / "per_image.csv").write_text("image_id,dice\n1,0.5\n")
    (folder / "overlays" / "img1.png").write_bytes(b"\x89PNG fake")
    return EvalArtifacts(metrics_json=folder / "metrics.json", per_image_csv=folder / "per_image.csv", overlays_dir=folder / "overlays")


def _train_metrics(step: int) -> dict[str, float]:
    return {"train/loss": 10.0 / step, "train/loss_mask": 1.0 / step, "train/lr": 1e-3, "train/grad_norm": 0.5,
            "train/nan_events": 0.0, "train/images_per_s": 3.0}


def test_callback_logs_params_metrics_artifacts_live(store_uri, tmp_path):
    client = mlflow.MlflowClient(store_uri)
    run_id = _new_run(client)
    cfg = load_config(overrides=["scratch.lr_scale=0.5"])
    cb = MlflowCallback(run_id, client=client)
    cb.on_train_start(RunInfo(config=cfg, out_dir=tmp_path / "out", start_step=0, max_steps=40))

    for step in (10, 20):
        cb.on_step_end(step, _train_metrics(step))
    cb.on_nan_event(15, {"kind": "loss", "lr": 1e-3, "action": "skip", "detail": "nan"})
    cb.on_eval_end(20, {"val/AP75": 0.2, "val/AP75_tol": 0.5, "val/dice": 0.7, "val/AP75/rca_proximal": 0.1}, _eval_files(tmp_path, 20))
    cb.on_checkpoint(20, tmp_path / "out" / "checkpoints" / "last.pt")

    # live: after the checkpoint flush, everything so far is readable before training ends
    run = client.get_run(run_id)
    assert run.data.metrics["train/loss"] == pytest.approx(0.5)
    assert run.data.metrics["val/AP75_tol"] == pytest.approx(0.5)
    assert run.data.tags[CHECKPOINT_STEP_TAG] == "20"
    assert run.data.tags[OUT_DIR_TAG] == str((tmp_path / "out").resolve())
    assert run.data.tags["angioexp.nan_events"] == "1"
    params = run.data.params
    assert params["scratch.lr_scale"] == "0.5"
    assert float(params["scratch.lr_transformer"]) == pytest.approx(8e-4 * 0.5)
    assert float(params["scratch.lr_vision_backbone"]) == pytest.approx(2.5e-4 * 0.5)
    assert float(params["scratch.lr_language_backbone"]) == pytest.approx(5e-5 * 0.5)
    assert set(flatten(cfg)) <= set(params)
    cb.flush()  # artifacts are copied by a worker thread; they may trail the checkpoint
    files = _artifact_paths(client, run_id)
    assert {"config/config.yaml", "config/resolved_with_sources.yaml", "eval/step_000020/metrics.json",
            "eval/step_000020/per_image.csv", "eval/step_000020/overlays/img1.png", LEARNING_CURVE} <= files
    view = mlflow.artifacts.load_text(f"runs:/{run_id}/config/resolved_with_sources.yaml")
    assert "lr_scale: 0.5" in view and "# --set" in view.split("lr_scale: 0.5")[1].splitlines()[0]

    cb.on_step_end(30, _train_metrics(30))
    cb.on_train_end(TrainResult(out_dir=tmp_path, steps=30, final_metrics={"val/AP75": 0.2}, best_metrics={"val/AP75_tol": 0.5},
                                checkpoint=None, best_checkpoint=None, nan_events=1, wall_seconds=3.0))
    run = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [10, 20, 30]
    assert run.data.metrics["summary/nan_events"] == 1
    assert run.data.metrics["best/val/AP75_tol"] == 0.5
    assert run.data.tags["angioexp.stopped_reason"] == "max_steps"
    assert "nan_events.json" in _artifact_paths(client, run_id)
    png = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=LEARNING_CURVE, dst_path=str(tmp_path / "dl")))
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_resumed_callback_neither_duplicates_nor_loses_steps(store_uri, tmp_path):
    """Killed at step 50 after a checkpoint at 30: the resume recomputes 40, 50 and goes on."""
    client = mlflow.MlflowClient(store_uri)
    run_id = _new_run(client)
    cfg = load_config()
    first = MlflowCallback(run_id, client=client, plot=False)
    first.on_train_start(RunInfo(config=cfg, out_dir=tmp_path, start_step=0, max_steps=80))
    for step in range(10, 60, 10):
        first.on_step_end(step, _train_metrics(step))
        if step == 30:
            first.on_checkpoint(step, tmp_path / "last.pt")
    first.on_eval_end(40, {"val/AP75": 0.3}, None)
    first.flush()  # (a SIGKILL here loses nothing that the resume will not recompute)

    second = MlflowCallback(run_id, client=client, plot=False)
    second.on_train_start(RunInfo(config=cfg, out_dir=tmp_path, start_step=30, max_steps=80))
    for step in range(40, 90, 10):
        second.on_step_end(step, _train_metrics(step))
        if step in (40, 80):
            second.on_eval_end(step, {"val/AP75": 0.01 * step}, None)
    second.on_train_end(TrainResult(out_dir=tmp_path, steps=80, final_metrics={}, best_metrics={}, checkpoint=None, best_checkpoint=None))

    for key in ("train/loss", "train/lr", "train/grad_norm"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == list(range(10, 90, 10)), key
    assert [m.step for m in client.get_metric_history(run_id, "val/AP75")] == [40, 80]
    assert second.dropped_duplicates > 0
    assert client.get_run(run_id).data.tags["angioexp.resumed_from_step"] == "30"


def test_param_values_respect_mlflow_limits():
    assert param_value(None) == "None"
    assert param_value([1, 2]) == "[1, 2]"
    long = param_value("x" * 10_000)
    assert len(long) == 6000 and long.endswith("[truncated]")
    params = config_params(load_config())
    assert all(len(k) <= 250 and len(v) <= 6000 for k, v in params.items())


def test_logging_failure_does_not_stop_training(store_uri, caplog):
    """A tracking store that breaks mid-run costs one warning, not the training."""
    client = mlflow.MlflowClient(store_uri)
    run_id = _new_run(client)
    cb = MlflowCallback(run_id, client=client, synchronous=True, plot=False)
    client.delete_run(run_id)  # logging into a deleted run raises inside MLflow
    with caplog.at_level("WARNING"):
        cb.on_step_end(10, _train_metrics(10))
        cb.on_step_end(20, _train_metrics(20))
    assert sum("MLflow logging failed" in r.message for r in caplog.records) == 1
