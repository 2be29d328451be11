"""Real sweeps: Optuna + the core backend on the synthetic COCO fixture + MLflow on a temp store.

NaN trials end PRUNED with their failure record and the study goes on; parent/nested MLflow runs
and the registered best model read back through the client; the exported config loads; a resumed
study keeps one parent run; crashes are classified; bad input is refused before any trial runs;
a 4-worker journal sweep ends with exactly the requested trial count after a worker is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers.sweep_space import write_space

from angioexp.config import load_config
from angioexp.sweep.cli import main
from angioexp.sweep.objective import is_oom
from angioexp.sweep.storage import open_storage
from angioexp.sweep.workers import counts_toward_budget

PG_URL = os.environ.get("ANGIOEXP_TEST_POSTGRES_URL")

# lr_scale 1e6 makes every step non-finite; with no restores allowed the guard gives up at once.
NAN_SPACE = """
study: nan_mix
objective: val/AP75_tol
pruner: none
sampler: {name: random, seed: 0}
params:
  scratch.lr_scale: {type: categorical, choices: [0.1, 1.0e6]}
  loss.masks.loss_mask: {type: float, low: 1.0, high: 400.0, log: true}
"""
NAN_GUARD = """
optim.gradient_clip.max_norm: null
nan_guard.max_consecutive: 2
nan_guard.max_restores: 0
"""


def _trials(storage_url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    handle = open_storage(storage_url, workers=2 if storage_url.startswith("journal") else 1)
    return optuna.load_study(study_name=name, storage=handle.storage).get_trials(deepcopy=False)


@pytest.mark.slow
def test_nan_trials_are_pruned_tracked_registered_exported_and_resumed(coco_stage1, store_uri, tmp_path):
    from mlflow import MlflowClient

    space = write_space(tmp_path / "nan.yaml", NAN_SPACE, steps=4, eval_every=2, extra_fixed=NAN_GUARD)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--space", str(space), "--storage", storage, "--coco-dir", str(coco_stage1), "--out", str(tmp_path / "runs")]
    assert main([*common, "--n-trials", "4", "--export", str(tmp_path / "best.yaml"), "--report",
                 "--report-out", str(tmp_path / "dash")]) == 0
    assert (tmp_path / "dash" / "nan_mix" / "index.html").is_file()

    trials = _trials(storage, "nan_mix")
    assert len(trials) == 4
    nan = [t for t in trials if t.user_attrs.get("failure") == "nan"]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert nan and done, [(t.params, t.state) for t in trials]
    for t in nan:  # pruned, not failed, not scored — with the guard's record
        assert t.state == TrialState.PRUNED and t.params["scratch.lr_scale"] == 1.0e6
        assert t.user_attrs["outcome"] == "nan" and t.user_attrs["events"] >= 1
        assert t.user_attrs["step"] >= 1 and t.user_attrs["lr"] > 1.0
    for t in done:  # raw AP75, Dice and clDice recorded beside the objective
        assert {"val/AP75_tol", "val/AP75", "val/dice", "val/cldice"} <= set(t.user_attrs["metrics"])
        assert t.params["scratch.lr_scale"] == 0.1

    client = MlflowClient()
    experiment = client.get_experiment_by_name("angioexp-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.data.tags["sweep.study"] == "nan_mix" and parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/outcome_nan"] == len(nan)
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["sweep.study"] == "nan_mix" and run.data.tags["stage"] == "1"
        assert run.data.tags["sweep.state"] == t.state.name
        assert float(run.data.params["scratch.lr_scale"]) == t.params["scratch.lr_scale"]
        assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
        if t.state == TrialState.COMPLETE:
            assert "final/val/AP75_tol" in run.data.metrics
        else:
            assert run.data.tags["sweep.failure"] == "nan"

    # the best trial's model is registered with alias challenger, from the best trial's run
    best = max(done, key=lambda t: t.value)
    version = client.get_model_version_by_alias("angio-stage1", "challenger")
    assert version.run_id == best.user_attrs["mlflow_run_id"]

    # the exported config runs as is: it loads, and it is the best trial's config
    cfg = load_config(tmp_path / "best.yaml")
    assert cfg.scratch.lr_scale == 0.1 and cfg.data.coco_dir == str(coco_stage1.resolve())
    assert cfg.loss.masks.loss_mask == pytest.approx(best.params["loss.masks.loss_mask"])

    # same study name again: resumes to the new TOTAL, under the same parent run
    assert main([*common, "--n-trials", "5"]) == 0
    assert len(_trials(storage, "nan_mix")) == 5
    runs = client.search_runs([experiment.experiment_id])
    assert len([r for r in runs if r.data.tags.get("sweep.role") == "parent"]) == 1
    assert len([r for r in runs if r.data.tags.get("sweep.role") == "trial"]) == 5
    # nothing more to do: no new trial
    assert main([*common, "--n-trials", "5", "--no-tracking"]) == 0
    assert len(_trials(storage, "nan_mix")) == 5


def test_crashing_trials_fail_with_their_error_and_the_study_goes_on(coco_stage1, tmp_path, capsys):
    # No such split: the runs train without evaluation, so the objective metric never appears.
    space = write_space(tmp_path / "crash.yaml", """
        study: crash
        objective: val/AP75_tol
        pruner: none
        params:
          scratch.lr_scale: {type: float, low: 0.01, high: 0.1, log: true}
    """, steps=2, eval_every=2, extra_fixed="data.val_split: nowhere")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    rc = main(["--space", str(space), "--storage", storage, "--coco-dir", str(coco_stage1),
               "--out", str(tmp_path / "runs"), "--n-trials", "2", "--no-tracking"])
    assert rc == 0
    trials = _trials(storage, "crash")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    for t in trials:
        assert t.user_attrs["failure"] == "crash" and "val/AP75_tol" in t.user_attrs["error"]
        assert counts_toward_budget(t)  # an answer, not a lost worker: no endless retries
        assert t.values is None


def test_the_pruner_can_watch_another_metric_than_the_objective(coco_stage1, tmp_path):
    # Tolerant AP75 is 0 for every trial early on (ties are never pruned); Dice moves at once.
    space = write_space(tmp_path / "watch.yaml", """
        study: watch
        objective: val/AP75_tol
        pruner: {name: median, n_startup_trials: 5, metric: val/dice}
        params:
          scratch.lr_scale: {type: float, low: 0.3, high: 3.0, log: true}
    """, steps=4, eval_every=2, extra_fixed="eval.score_threshold: 0.0\neval.mask_threshold: 0.02")  # Dice > 0 after 4 steps
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(["--space", str(space), "--storage", storage, "--coco-dir", str(coco_stage1),
                 "--out", str(tmp_path / "runs"), "--n-trials", "2", "--no-tracking"]) == 0
    trials = _trials(storage, "watch")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        final = t.user_attrs["metrics"]
        assert sorted(t.intermediate_values) == [2, 4]
        assert t.intermediate_values[4] == pytest.approx(final["val/dice"])  # what the pruner saw
        assert t.value == pytest.approx(final["val/AP75_tol"])  # what the study optimises
    assert any(t.intermediate_values[4] != t.value for t in trials), [t.intermediate_values for t in trials]


def test_oom_is_classified_apart_from_crashes():
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_bad_input_is_refused_before_any_trial(coco_stage1, tmp_path, capsys):
    space = write_space(tmp_path / "s.yaml", """
        study: dirs
        objective: val/AP75_tol
        params:
          scratch.lr_scale: {type: float, low: 0.01, high: 0.1, log: true}
    """, steps=2, eval_every=2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = ["--storage", storage, "--coco-dir", str(coco_stage1), "--out", str(tmp_path / "runs"), "--no-tracking"]
    assert main(["--space", str(space), *base, "--n-trials", "1"]) == 0
    before = [(t.number, t.state, t.values) for t in _trials(storage, "dirs")]

    # the same study asked to minimise: refused, stored trials untouched
    flipped = tmp_path / "flipped.yaml"
    flipped.write_text(space.read_text().replace("objective: val/AP75_tol", "objective: [{metric: val/AP75_tol, direction: minimize}]"))
    assert main(["--space", str(flipped), *base, "--n-trials", "3"]) == 2
    err = capsys.readouterr().err
    assert "optimises maximize" in err and "another --study" in err
    assert [(t.number, t.state, t.values) for t in _trials(storage, "dirs")] == before

    assert main(["--space", str(space), *base, "--n-trials", "3", "--set", "train.max_stesp=3"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert main(["--study", "nope", *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--space", str(space), "--storage", "postgresql://u:pw@127.0.0.1:1/x", "--n-trials", "1", "--no-tracking"]) == 2
    assert "cannot connect" in capsys.readouterr().err
    assert main(["--space", str(space), "--storage", storage, "--workers", "2", "--no-tracking"]) == 2
    assert "SQLite is not safe" in capsys.readouterr().err
    assert main(["--study", "dirs", *base, "--export", str(tmp_path / "x.yaml"), "--export-trial", "99"]) == 2
    assert "no trial 99" in capsys.readouterr().err
    assert [(t.number, t.state, t.values) for t in _trials(storage, "dirs")] == before


def _launch(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "angioexp.sweep", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_a_running_worker(storage: str, study: str, proc: subprocess.Popen, timeout: float = 300) -> int:
    """SIGKILL the worker of a trial that has just started; returns the trial's number."""
    handle = open_storage(storage, workers=2)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            trials = optuna.load_study(study_name=study, storage=handle.storage).get_trials(deepcopy=False)
        except KeyError:
            time.sleep(0.5)
            continue
        for t in trials:
            fresh = t.datetime_start is not None and (time.time() - t.datetime_start.timestamp()) < 1.5
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker_pid") and fresh:
                os.kill(int(t.user_attrs["worker_pid"]), signal.SIGKILL)
                return t.number
        time.sleep(0.1)
    raise AssertionError("no running trial to kill")


def _assert_exact_budget(trials, n_trials: int, killed: int) -> None:
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in trials if counts_toward_budget(t)]
    assert len(counted) == n_trials, [(t.number, t.state.name, t.user_attrs.get("outcome")) for t in trials]
    dead = {t.number: t for t in trials}[killed]
    assert dead.state == TrialState.FAIL and "failure" not in dead.user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state.is_finished()
    # A worker killed mid-suggest leaves a partial parameter set; the retry re-uses every value the
    # dead trial had drawn (RetryFailedTrialCallback enqueues them) and samples the rest.
    assert {k: retry[0].params[k] for k in dead.params} == dead.params


@pytest.mark.slow
def test_four_worker_journal_sweep_survives_a_killed_worker_with_exact_trial_count(coco_stage1, store_uri, tmp_path):
    from mlflow import MlflowClient

    space = write_space(tmp_path / "w.yaml", """
        study: workers
        objective: val/AP75_tol
        sampler: {name: tpe, seed: 0, n_startup_trials: 4}
        pruner: none
        params:
          scratch.lr_scale: {type: float, low: 0.01, high: 0.3, log: true}
          prompts.num_points: {type: int_range, low: 0, high: 2}
    """, steps=8, eval_every=4)
    storage = f"journal:///{tmp_path / 'journal.log'}"
    n_trials = 8
    proc = _launch(["--space", str(space), "--storage", storage, "--workers", "4", "--n-trials", str(n_trials),
                    "--coco-dir", str(coco_stage1), "--out", str(tmp_path / "runs"),
                    "--heartbeat-interval", "1", "--grace-period", "5", "--no-register"], tmp_path)
    try:
        killed = _kill_a_running_worker(storage, "workers", proc)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "killed by SIGKILL" in out
    trials = _trials(storage, "workers")
    _assert_exact_budget(trials, n_trials, killed)
    print(out)
    # MLflow: every trial has its nested run; the killed one was closed as FAILED
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("angioexp-sweeps").experiment_id])
    children = {int(r.data.tags["optuna.trial_number"]): r for r in runs if r.data.tags.get("sweep.role") == "trial"}
    # (the killed trial may have died before it created its run; so may a trial that another
    # worker declared stale under load — neither counts, and each has a retry that does)
    assert set(children) >= {t.number for t in trials if counts_toward_budget(t)}, out
    if killed in children:
        assert children[killed].info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs), out


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="ANGIOEXP_TEST_POSTGRES_URL not set (CI starts a PostgreSQL server; see .ci/run)")
def test_postgresql_sweep_with_two_workers(coco_stage1, tmp_path):
    import uuid

    name = f"pg-{uuid.uuid4().hex[:8]}"
    space = write_space(tmp_path / "pg.yaml", f"""
        study: {name}
        objective: val/AP75_tol
        pruner: {{name: median, n_startup_trials: 1}}
        params:
          scratch.lr_scale: {{type: float, low: 0.01, high: 0.3, log: true}}
    """, steps=4, eval_every=2)
    proc = _launch(["--space", str(space), "--storage", PG_URL, "--workers", "2", "--n-trials", "3",
                    "--coco-dir", str(coco_stage1), "--out", str(tmp_path / "runs"), "--no-tracking"], tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    handle = open_storage(PG_URL, workers=2)
    trials = optuna.load_study(study_name=name, storage=handle.storage).get_trials(deepcopy=False)
    assert len([t for t in trials if counts_toward_budget(t) and t.state.is_finished()]) == 3
    assert len({t.user_attrs["worker_pid"] for t in trials}) >= 1
    optuna.delete_study(study_name=name, storage=handle.storage)


@pytest.mark.slow
def test_stage2_sweep_starts_from_the_stage1_champion(coco_stage1, coco_stage2, store_uri, tmp_path):
    """Stage 1 sweep → registered angio-stage1 (first version: champion) → a Stage 2 sweep whose
    trials start from models:/angio-stage1@champion (resolved once), with the load report logged."""
    from mlflow import MlflowClient

    body = """
        study: {name}
        stage: {stage}
        objective: val/AP75_tol
        pruner: none
        params:
          scratch.lr_scale: {{type: categorical, choices: [0.1]}}
    """
    s1 = write_space(tmp_path / "s1.yaml", body.format(name="s1", stage=1), steps=2, eval_every=2)
    s2 = write_space(tmp_path / "s2.yaml", body.format(name="s2", stage=2), steps=2, eval_every=2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--storage", storage, "--out", str(tmp_path / "runs"), "--n-trials", "1"]
    assert main(["--space", str(s1), "--coco-dir", str(coco_stage1), *common]) == 0
    client = MlflowClient()
    champion = client.get_model_version_by_alias("angio-stage1", "champion")
    assert main(["--space", str(s2), "--coco-dir", str(coco_stage2), *common]) == 0
    (trial,) = _trials(storage, "s2")
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert float(run.data.params["init.loaded_fraction"]) >= 0.9
    assert run.data.params["stage"] == "2" and run.data.tags["stage"] == "2"
    assert str(client.get_model_version_by_alias("angio-stage2", "challenger").version) == "1"
    assert str(champion.version) == "1"


def test_mlflow_project_run_becomes_the_parent(coco_stage1, store_uri, tmp_path, monkeypatch):
    """`mlflow run . -e sweep` hands its run over in MLFLOW_RUN_ID: it is adopted as the parent,
    and taken out of the environment so no trial logs into it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    project_run = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)
    space = write_space(tmp_path / "p.yaml", """
        study: proj
        objective: val/AP75_tol
        pruner: none
        params:
          scratch.lr_scale: {type: categorical, choices: [0.1]}
    """, steps=2, eval_every=2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(["--space", str(space), "--storage", storage, "--coco-dir", str(coco_stage1),
                 "--out", str(tmp_path / "runs"), "--n-trials", "1", "--no-register"]) == 0
    assert "MLFLOW_RUN_ID" not in os.environ
    (trial,) = _trials(storage, "proj")
    child = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == project_run
    assert client.get_run(project_run).data.tags["sweep.role"] == "parent"
