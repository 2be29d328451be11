"""Faults and load a run must survive: a full disk while writing a checkpoint, SIGTERM at a
random step (preemption), and several writers at once on one tracking store — the default
``sqlite:///mlflow.db`` and a shared ``mlflow server`` on PostgreSQL (CI provides it through
ANGIOEXP_TEST_POSTGRES_URL; locally that test skips). Tiny models, few steps: a few seconds of
CPU per run."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

from angioexp.checkpoints import read_checkpoint
from angioexp.cli import main
from angioexp.errors import OutputError
from tests.helpers.sweep_space import write_space
from tests.helpers.vessel_coco import make_vessel_coco

mlflow = pytest.importorskip("mlflow")

PG_URL = os.environ.get("ANGIOEXP_TEST_POSTGRES_URL")
TINY = ["scratch.resolution=64", "scratch.train_batch_size=2", "scratch.scheduler_warmup=0", "scratch.scheduler_timescale=4",
        "model.encoder_channels=[8,8,16,16]", "model.d_model=16", "model.num_queries=2", "model.decoder_layers=1",
        "model.num_heads=2", "train.log_every=1", "train.eval_every=100", "data.max_val_images=2", "eval.overlays=0",
        "train.device=cpu", "tracking.log_system_metrics=false"]
SETS = [arg for kv in TINY for arg in ("--set", kv)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_vessel_coco(tmp_path_factory.mktemp("coco"), stage=1, size=64, n_train=4, n_val=2)


def _train_argv(coco, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "angioexp", "train", "--stage", "1", "--coco-dir", str(coco), "--out", str(out),
            "--max-steps", str(steps), *SETS, *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


# --- a full disk while writing a checkpoint ------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes(store_uri, coco, tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through the step-4 checkpoint (on the real atomic write path): last.pt of step
    2 survives whole, no temp file is left, the run is FAILED saying why, and --resume finishes it."""
    import angioexp.checkpoints as checkpoint_module
    from angioexp.config import load_config
    from angioexp.fileio import atomic_file
    from angioexp.tracking.session import tracked_train
    from angioexp.train.callbacks import Callback

    real_write = checkpoint_module.write_bytes_atomic
    disk = {"full": False}

    def write_until_full(path, data):
        if not disk["full"]:
            return real_write(path, data)
        with atomic_file(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FillDiskAfterFirstCheckpoint(Callback):
        def on_checkpoint(self, step, path):
            disk["full"] = True

    monkeypatch.setattr(checkpoint_module, "write_bytes_atomic", write_until_full)
    out = tmp_path / "run"
    cfg = load_config(overrides=[*TINY, f"data.coco_dir={coco}", "train.max_steps=6", "train.checkpoint_every=2"], stage=1)
    with pytest.raises(OutputError) as info:
        tracked_train(cfg, argparse.Namespace(out=str(out)), extra_callbacks=[FillDiskAfterFirstCheckpoint()])
    message = str(info.value)
    assert "disk full" in message and "checkpoint of step 2 is intact" in message and "--resume" in message
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]  # no half-written temp file
    client = mlflow.MlflowClient(store_uri)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "disk full" in run.data.tags["angioexp.failure"]

    disk["full"] = False  # space freed
    assert main(["train", "--resume", run_id]) == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 6
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 6


# --- preemption: SIGTERM at a random step, then resume ------------------------------------------


@pytest.mark.slow
def test_sigterm_at_a_random_step_then_resume_gives_the_uninterrupted_weights(coco, tmp_path):
    steps = 12
    stop_after = random.Random(time.time_ns()).randint(1, steps - 2)
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    common = ["--no-tracking", "--set", "train.checkpoint_every=5"]
    uninterrupted = subprocess.Popen(_train_argv(coco, reference, steps, *common), env=ENV, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_train_argv(coco, preempted, steps, *common), env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:  # SIGTERM as soon as step `stop_after` is logged (it may land a step or two later)
        assert proc.poll() is None and time.monotonic() < deadline, f"stop_after={stop_after}"
        log = preempted / "metrics.jsonl"
        if log.is_file() and any(json.loads(line)["step"] >= stop_after for line in log.read_text().splitlines()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    stopped = read_checkpoint(preempted / "checkpoints" / "last.pt")["step"]
    assert stop_after <= stopped < steps, (stop_after, stopped)

    resumed = subprocess.run([sys.executable, "-m", "angioexp", "train", "--no-tracking", "--resume", str(preempted)],
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final, expected = _weights(preempted / "checkpoints" / "last.pt"), _weights(reference / "checkpoints" / "last.pt")
    assert final.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(final[k], expected[k])]
    assert not different, f"stopped after step {stopped}: {different[:5]}"


# --- several writers on one tracking store -------------------------------------------------------


SPACE = """
study: {name}
objective: val/AP75_tol
pruner: none
sampler: {{name: random, seed: 0}}
params:
  scratch.lr_scale: {{type: float, low: 0.05, high: 0.5, log: true}}
"""


def _check_histories(client, run_id: str, out_dir: Path) -> int:
    """Every train metric the process wrote to metrics.jsonl is in MLflow at its step, value for
    value, and nothing else is; returns the number of values compared."""
    logged: dict[str, list[tuple[int, float]]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                logged.setdefault(key, []).append((record["step"], value))
    compared = 0
    for key, expected in logged.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [s for s, _ in expected], (run_id, key)
        for (_, got), (_, want) in zip(history, expected):
            assert got == pytest.approx(want, rel=1e-9, nan_ok=True), (run_id, key)
        compared += len(expected)
    return compared


def _concurrent_runs_and_sweep(cwd: Path, coco, env: dict, tracking_uri: str) -> None:
    """4 tracked training runs and a 2-worker sweep at once; then every history checked."""
    experiment = f"load-{uuid.uuid4().hex[:8]}"
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    space = write_space(cwd / "space.yaml", SPACE.format(name=name), steps=3, eval_every=3)
    runs = [cwd / f"run{i}" for i in range(4)]
    procs = [subprocess.Popen(_train_argv(coco, out, 4, "--set", f"tracking.experiment={experiment}",
                                          "--set", "tracking.register=false", "--set", "train.checkpoint_every=2"),
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in runs]
    procs.append(subprocess.Popen([sys.executable, "-m", "angioexp.sweep", "--space", str(space), "--workers", "2",
                                   "--n-trials", "2", "--coco-dir", str(coco), "--out", str(cwd / "trials"), "--no-register"],
                                  cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
        assert "database is locked" not in output, output[-4000:]

    client = mlflow.MlflowClient(tracking_uri)
    compared = 0
    for out in runs:
        run = client.get_run(json.loads((out / "mlflow_run.json").read_text())["run_id"])
        assert run.info.status == "FINISHED"
        compared += _check_histories(client, run.info.run_id, out)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(cwd / "optuna-journal.log")))
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        compared += _check_histories(client, run.info.run_id, Path(trial.user_attrs["out_dir"]))
    assert compared > 4 * 4 * 3  # every step of every run, several metrics each


@pytest.mark.slow
def test_concurrent_runs_and_a_sweep_on_the_default_sqlite_store(coco, tmp_path):
    env = {key: value for key, value in ENV.items() if key not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["ANGIOEXP_ARTIFACT_ROOT"] = str(tmp_path / "mlartifacts")
    _concurrent_runs_and_sweep(tmp_path, coco, env, f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default: ./mlflow.db


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="ANGIOEXP_TEST_POSTGRES_URL not set (CI starts a PostgreSQL server; see .ci/run)")
def test_concurrent_runs_and_a_sweep_on_a_tracking_server_over_postgresql(coco, tmp_path):
    from tests.helpers.tracking_store import mlflow_server

    from angioexp.sweep.storage import _with_available_driver  # SQLAlchemy 2.1 defaults to psycopg 3

    # A database of its own: MLflow's schema (its alembic_version table) in the shared test
    # database would make Optuna's RDB storage, which keeps its own alembic_version, refuse it.
    with _scratch_database(PG_URL) as url, mlflow_server(_with_available_driver(url)) as base:
        env = {**ENV, "MLFLOW_TRACKING_URI": base, "ANGIOEXP_ARTIFACT_ROOT": str(tmp_path / "mlartifacts")}
        env.pop("MLFLOW_RUN_ID", None)
        _concurrent_runs_and_sweep(tmp_path, coco, env, base)


@contextlib.contextmanager
def _scratch_database(url: str):
    """A new, empty database on the server of ``url`` (dropped afterwards): its URL."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg2

    name = f"angioexp_load_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
