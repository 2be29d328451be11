"""No command loses data or corrupts a run: outputs never land on inputs, a run has one writer,
SIGTERM is handled like Ctrl-C, finished/foreign runs are not written again, and bad input or an
unwritable output gets one line. Each test fails on the code before these guarantees."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from angioexp.checkpoints import read_checkpoint
from angioexp.cli import main
from angioexp.errors import InputError
from angioexp.fileio import refuse_output_over_inputs
from tests.helpers.vessel_coco import make_vessel_coco

BASE = ["--set", "scratch.resolution=64", "--set", "scratch.train_batch_size=2", "--set", "eval.overlays=0",
        "--set", "train.eval_every=100", "--set", "train.log_every=1", "--set", "data.max_val_images=2",
        "--set", "train.device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_vessel_coco(tmp_path_factory.mktemp("coco"), stage=1, size=64, n_train=4, n_val=2)


@pytest.fixture()
def study(synth_dir, tmp_path):
    """A private copy of the synthetic study (these tests try to make commands destroy it)."""
    return Path(shutil.copytree(synth_dir, tmp_path / "study"))


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def _train(args: list[str]) -> int:
    return main(["train", "--stage", "1", *args, *BASE])


def _run_id(out: Path) -> str:
    return json.loads((out / "mlflow_run.json").read_text())["run_id"]


# --- 1. outputs never land on inputs ---------------------------------------------------------


def test_guard_refuses_outputs_that_are_contain_or_lie_inside_inputs(tmp_path, monkeypatch):
    data = tmp_path / "inputs" / "data"
    data.mkdir(parents=True)
    (data / "index.csv").write_text("x")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out, inputs, words in (
        (data, [data / "index.csv"], "contains the input"),
        (data.parent, [data], "contains the input"),
        (data / "index.csv", [data / "index.csv"], "is the input"),
        (data / "new", [data], "lies inside the input"),
        (".", [], "is the current folder"),
        (tmp_path, [], "contains the current folder"),
    ):
        with pytest.raises(InputError, match=words):
            refuse_output_over_inputs(out, inputs)
    assert refuse_output_over_inputs(tmp_path / "elsewhere", [data]) == (tmp_path / "elsewhere").resolve()
    assert refuse_output_over_inputs("out", [data / "index.csv"]).name == "out"  # inside the cwd is normal


def test_convert_overwrite_never_deletes_the_study(study, tmp_path, capsys, monkeypatch):
    before = _snapshot(study)
    for out in (study, tmp_path, study / "cines"):
        code = main(["convert", "--index", str(study / "index.csv"), "--out", str(out), "--stage", "1", "--overwrite"])
        assert code == 2
        assert "choose a folder outside the inputs" in _last_error(capsys)
        assert _snapshot(study) == before
    monkeypatch.chdir(tmp_path)  # --out . used to leave the output in a hidden folder and a traceback
    assert main(["convert", "--index", str(study / "index.csv"), "--out", ".", "--stage", "1", "--overwrite"]) == 2
    assert "is the current folder" in _last_error(capsys)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _snapshot(study) == before


def test_evaluate_overwrite_never_deletes_the_dataset(coco, tmp_path, capsys):
    before = _snapshot(coco)
    for out in (coco, coco / "val", coco.parent):
        code = main(["evaluate", "--coco", str(coco), "--split", "val", "--ceiling", "--gt", "clean", "--out", str(out),
                     "--overwrite"])
        assert code == 2 and "choose a folder outside the inputs" in _last_error(capsys)
    assert _snapshot(coco) == before


def test_every_command_with_out_refuses_its_inputs_and_the_current_folder(tmp_path, capsys, monkeypatch):
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir(), masks.mkdir()
    (images / "a.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    commands = [
        (["import-masks", "--images", str(images), "--masks", str(masks), "--out", str(images), "--overwrite"], "is the input"),
        (["import-arcade", "--root", str(images), "--out", str(tmp_path), "--overwrite"], "is the current folder"),
        (["synth", "--out", ".", "--cases", "3", "--overwrite"], "is the current folder"),
        (["sweep-report", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--out", "."], "is the current folder"),
        (["dashboard", "--out", ".", "--no-log"], "is the current folder"),
        (["sweep", "--space", str(images / "a.png"), "--out", str(images)], "contains the input"),
    ]
    for argv, words in commands:
        assert main(argv) == 2, argv
        assert words in _last_error(capsys), argv
    assert (images / "a.png").read_bytes() == b"x"


# --- 2/3/4. a run has one writer; finished and foreign runs are not written again ---------------


def test_a_new_run_may_not_take_another_runs_folder(store_uri, coco, tmp_path, capsys):
    import mlflow

    out = tmp_path / "run"
    assert _train(["--coco-dir", str(coco), "--out", str(out), "--max-steps", "1"]) == 0
    before = {name: (out / name).read_bytes() for name in ("mlflow_run.json", "checkpoints/last.pt", "checkpoints/best.pt")}
    for extra in ([], ["--no-tracking"]):
        assert _train(["--coco-dir", str(coco), "--out", str(out), "--max-steps", "1", *extra]) == 2
        assert "holds another run" in _last_error(capsys)
    assert {name: (out / name).read_bytes() for name in before} == before
    client = mlflow.MlflowClient(store_uri)
    assert len(client.search_runs([client.get_experiment_by_name("angioexp-stage1").experiment_id])) == 1


def test_a_new_sweep_may_not_take_an_earlier_studys_trial_folders(coco, tmp_path, capsys):
    from tests.helpers.sweep_space import write_space

    space = write_space(tmp_path / "s.yaml", """
        study: again
        objective: val/AP75_tol
        pruner: none
        params:
          scratch.lr_scale: {type: categorical, choices: [0.1]}
    """, steps=1, eval_every=1)
    earlier = tmp_path / "trials" / "again" / "trial_0000"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.pt").write_bytes(b"an earlier study's weights")
    assert main(["sweep", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--out",
                 str(tmp_path / "trials"), "--coco-dir", str(coco), "--n-trials", "1", "--no-tracking"]) == 2
    assert "earlier study named 'again'" in _last_error(capsys)
    assert (earlier / "checkpoints" / "last.pt").read_bytes() == b"an earlier study's weights"


def test_runs_started_in_the_same_second_get_a_folder_each(tmp_path):
    from angioexp.train.runlock import claim_new_folder

    base = tmp_path / "runs" / "s1-core-abcd1234-1207-010203"
    assert [claim_new_folder(base).name for _ in range(3)] == [base.name, f"{base.name}-2", f"{base.name}-3"]


HOLD_LOCK = """
import sys, time
from angioexp.train.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_owner_and_a_dead_owner_is_stale(store_uri, coco, tmp_path, capsys):
    import mlflow

    out = tmp_path / "run"
    assert _train(["--coco-dir", str(coco), "--out", str(out), "--max-steps", "2"]) == 0
    run_id = _run_id(out)
    client = mlflow.MlflowClient(store_uri)
    client.set_terminated(run_id, "KILLED")  # as if it had been stopped: a resume would continue it
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (["--resume", run_id], ["--resume", str(out), "--no-tracking"]):
            assert main(["train", *argv, "--max-steps", "4"]) == 2
            line = _last_error(capsys)
            assert "being written by another process" in line and f"pid {holder.pid}" in line, line
    finally:
        holder.kill()  # SIGKILL: its record stays in run.lock, the kernel drops the lock
        holder.wait()
    assert str(holder.pid) in (out / "run.lock").read_text()
    assert main(["train", "--resume", run_id, "--max-steps", "4"]) == 0  # stale lock: taken over
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4


def test_resuming_a_finished_run_does_nothing_unless_extended(store_uri, coco, tmp_path, capsys):
    import mlflow

    client = mlflow.MlflowClient(store_uri)
    out = tmp_path / "run"
    assert _train(["--coco-dir", str(coco), "--out", str(out), "--max-steps", "2"]) == 0
    run_id = _run_id(out)

    def logged():
        run = client.get_run(run_id)
        return {k: len(client.get_metric_history(run_id, k)) for k in run.data.metrics}, \
            len(client.search_model_versions("name='angio-stage1'"))

    metrics, versions = logged()
    assert versions == 1 and any(k.startswith("best/") or k.startswith("summary/") for k in metrics)
    capsys.readouterr()
    for argv in (["--resume", run_id], ["--resume", str(out), "--no-tracking"]):
        assert main(["train", *argv]) == 0
        assert "finished (step 2 of 2); nothing to do" in capsys.readouterr().out
    assert logged() == (metrics, versions)
    assert main(["train", "--resume", run_id, "--max-steps", "3"]) == 0  # extended: continues, registers once
    assert logged()[1] == 2
    assert client.get_run(run_id).info.status == "FINISHED"
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3


# --- 5. the stage/dataset check belongs to training, not to tracking ---------------------------


@pytest.mark.parametrize("stage, other", [(1, "coco_stage2"), (2, "coco_stage1")])
def test_untracked_training_refuses_data_of_the_other_stage(stage, other, request, tmp_path, capsys):
    coco_dir = request.getfixturevalue(other)
    code = main(["train", "--stage", str(stage), "--no-tracking", "--coco-dir", str(coco_dir), "--out", str(tmp_path / "r"),
                 "--init-from", "none", *BASE])
    assert code == 2
    line = _last_error(capsys)
    assert f"Stage {3 - stage}" in line or "expects one category" in line, line
    assert not (tmp_path / "r").exists()


# --- 6. SIGTERM is Ctrl-C: checkpoint, KILLED, one line, exit 143, resumable -----------------------


def _wait_for_step(out: Path, step: int, proc, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
        if lines and json.loads(lines[-1])["step"] >= step:
            return json.loads(lines[-1])["step"]
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def test_sigterm_checkpoints_marks_the_run_killed_and_resumes(store_uri, coco, tmp_path):
    import mlflow

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "angioexp", "train", "--stage", "1", "--coco-dir", str(coco),
                             "--out", str(out), "--max-steps", "200", "--set", "train.checkpoint_every=1000", *BASE],
                            env={**ENV, "MLFLOW_TRACKING_URI": store_uri}, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("angioexp train: terminated (SIGTERM): stopped after step") and "--resume" in last, last
    assert "Traceback" not in err
    step = read_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert 3 <= step < 200  # no checkpoint was due: the one written on the way out
    client = mlflow.MlflowClient(store_uri)
    run_id = _run_id(out)
    assert client.get_run(run_id).info.status == "KILLED"
    assert main(["train", "--resume", run_id, "--max-steps", str(step + 2)]) == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == step + 2


def test_a_run_that_died_before_its_first_checkpoint_does_not_stay_running(store_uri, tmp_path, capsys):
    import mlflow

    from angioexp.tracking.callback import OUT_DIR_TAG
    from angioexp.tracking.resume import write_run_file

    client = mlflow.MlflowClient(store_uri)
    out = tmp_path / "run"
    out.mkdir()
    run = client.create_run(client.create_experiment("x"), tags={OUT_DIR_TAG: str(out)})  # SIGKILLed at step 0
    write_run_file(out, run.info.run_id, store_uri, run.info.experiment_id)
    assert main(["train", "--resume", run.info.run_id]) == 2
    assert "no checkpoint to resume from" in _last_error(capsys)
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FAILED" and "before its first checkpoint" in after.data.tags["angioexp.failure"]


# --- 7. options that were ignored or unchecked ----------------------------------------------


def test_resume_refuses_config_changes_and_bad_stopping_rules(coco, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(["--no-tracking", "--coco-dir", str(coco), "--out", str(out), "--max-steps", "1"]) == 0
    assert main(["train", "--no-tracking", "--resume", str(out), "--set", "scratch.lr_scale=0.5"]) == 2
    line = _last_error(capsys)
    assert "--set" in line and "--max-steps" in line and "--budget-minutes" in line
    assert main(["train", "--no-tracking", "--resume", str(out), "--stage", "2"]) == 2
    assert "--stage 2 (the run has 1)" in _last_error(capsys)
    for argv in (["--max-steps", "0"], ["--max-steps", "-5"], ["--budget-minutes", "-1"]):
        assert main(["train", "--no-tracking", "--resume", str(out), *argv]) == 2, argv
        assert "train.max_steps" in (line := _last_error(capsys)) or "train.budget_minutes" in line
        assert _train(["--no-tracking", "--coco-dir", str(coco), "--out", str(tmp_path / "new"), *argv]) == 2
        capsys.readouterr()
    assert not (tmp_path / "new").exists()
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 1


def test_negative_workers_are_refused(study, tmp_path, capsys):
    assert main(["convert", "--index", str(study / "index.csv"), "--out", str(tmp_path / "c"), "--stage", "1",
                 "--workers", "-3"]) == 2
    assert "workers" in _last_error(capsys)
    assert main(["prepare", "--index", str(study / "index.csv"), "--workers", "-3"]) == 2
    assert "--workers" in _last_error(capsys)


# --- 8. unwritable outputs and a tracking store that is no database: one line -----------------


def test_unwritable_outputs_are_one_line(study, coco, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for argv in (
        ["convert", "--index", str(study / "index.csv"), "--out", str(blocker / "coco"), "--stage", "1"],
        ["evaluate", "--coco", str(coco), "--ceiling", "--gt", "clean", "--out", str(blocker / "eval")],
        ["train", "--stage", "1", "--no-tracking", "--coco-dir", str(coco), "--out", str(blocker / "run"), *BASE],
    ):
        assert main(argv) == 2, argv
        assert "cannot write here" in _last_error(capsys)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}")
    assert _train(["--coco-dir", str(coco), "--out", str(tmp_path / "r")]) == 2
    assert "not an SQLite database" in _last_error(capsys)
    assert blocker.read_text() == "not a folder"


# --- 9. messages ------------------------------------------------------------------------------


def test_semicolon_index_is_read(study, tmp_path):
    from angioexp.data.index import read_table

    text = (study / "index.csv").read_text()
    (study / "semicolon.csv").write_text("\n".join(line.replace(",", ";") for line in text.splitlines()) + "\n")
    assert len(read_table(study / "semicolon.csv")) == len(read_table(study / "index.csv"))


def test_path_escape_quotes_the_whole_value(study):
    from angioexp.data.index import read_table

    lines = (study / "index.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index("cine_path")] = "../elsewhere/cine_x.npy"
    (study / "index.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    with pytest.raises(InputError, match=r"path '\.\./elsewhere/cine_x\.npy' escapes"):
        read_table(study / "index.csv")


def test_checkpoint_messages_speak_cli(coco, tmp_path, capsys):
    bare = tmp_path / "bare.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, bare)
    assert main(["evaluate", "--coco", str(coco), "--checkpoint", str(bare), "--gt", "train", "--out", str(tmp_path / "e")]) == 2
    line = _last_error(capsys)
    assert "cfg=" not in line and "angioexp train" in line
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": argparse.Namespace(x=1)}, unsafe)
    assert main(["evaluate", "--coco", str(coco), "--checkpoint", str(unsafe), "--gt", "train", "--out", str(tmp_path / "e")]) == 2
    line = _last_error(capsys)
    assert "refused as unsafe" in line and "weights_only=False" not in line
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")  # corrupt, not unsafe
    assert main(["evaluate", "--coco", str(coco), "--checkpoint", str(garbage), "--gt", "train", "--out", str(tmp_path / "e")]) == 2
    line = _last_error(capsys)
    assert "cannot read checkpoint" in line and "unsafe" not in line


# --- 10. predictions scored against another split ----------------------------------------------


def test_predictions_record_their_split_and_dataset_and_evaluate_checks_them(coco_stage1, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--stage", "1", "--no-tracking", "--coco-dir", str(coco_stage1), "--out", str(out),
                 "--max-steps", "1", *BASE]) == 0
    eval_dir = tmp_path / "eval"
    assert main(["evaluate", "--coco", str(coco_stage1), "--split", "val", "--checkpoint",
                 str(out / "checkpoints" / "last.pt"), "--out", str(eval_dir)]) == 0
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    digest = json.loads((coco_stage1 / "manifest.json").read_text())["dataset_digest"]
    assert predictions and {(p["split"], p["dataset_digest"]) for p in predictions} == {("val", digest)}
    capsys.readouterr()
    assert main(["evaluate", "--coco", str(coco_stage1), "--split", "test", "--predictions", str(eval_dir / "predictions.json"),
                 "--out", str(tmp_path / "wrong")]) == 2
    line = _last_error(capsys)
    assert "made on split 'val'" in line and "'test'" in line
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**p, "dataset_digest": "0" * len(digest)} for p in predictions]))
    assert main(["evaluate", "--coco", str(coco_stage1), "--split", "val", "--predictions", str(other),
                 "--out", str(tmp_path / "wrong")]) == 2
    assert "dataset (digest)" in _last_error(capsys)
    assert main(["evaluate", "--coco", str(coco_stage1), "--split", "val", "--predictions", str(eval_dir / "predictions.json"),
                 "--out", str(tmp_path / "right")]) == 0
