"""A tracked run SIGKILLed mid-way continues as the same MLflow run: no duplicated or lost steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

mlflow = pytest.importorskip("mlflow")


from angioexp.errors import InputError  # noqa: E402

OVERRIDES = [
    "scratch.resolution=128", "scratch.train_batch_size=2", "scratch.val_batch_size=4",
    "train.max_steps=24", "train.eval_every=8", "train.checkpoint_every=8", "train.log_every=2",
    "data.max_val_images=3", "eval.overlays=1", "train.device=cpu",
]

# Trains with tracking and kills itself (SIGKILL: no cleanup, no atexit) once step KILL_AT is
# reported — after the checkpoint at step 8, before the one at 16.
KILLED_RUN = textwrap.dedent("""
    import argparse, json, os, signal, sys
    from angioexp.config import load_config
    from angioexp.tracking.session import tracked_train
    from angioexp.train.callbacks import Callback

    class KillAt(Callback):
        def __init__(self, step):
            self.step = step
        def on_step_end(self, step, metrics):
            if step >= self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        overrides, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
        tracked_train(load_config(overrides=overrides, stage=1), argparse.Namespace(), extra_callbacks=[KillAt(kill_at)])
""")


def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_killed_run_resumes_into_the_same_run(store_uri, coco_stage1, tmp_path):
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    overrides = [*OVERRIDES, f"data.coco_dir={coco_stage1}", f"train.out_dir={tmp_path / 'runs'}"]
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    killed = subprocess.run([sys.executable, str(script), json.dumps(overrides), "14"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    client = mlflow.MlflowClient(store_uri)
    experiment = client.get_experiment_by_name("angioexp-stage1")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"  # killed: nobody ended it
    assert run.data.tags["angioexp.checkpoint_step"] == "8"
    # steps after the checkpoint reached MLflow before the kill: the resume recomputes them
    assert max(_steps(client, run_id, "train/loss")) > 8
    assert client.search_registered_models() == []  # nothing registered by a killed run

    # resume through the CLI, as a user would
    resumed = subprocess.run([sys.executable, "-m", "angioexp", "train", "--resume", run_id], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["angioexp.resumed_from_step"] == "8" and run.data.tags["angioexp.resumes"] == "1"
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/loss_mask"):
        assert _steps(client, run_id, key) == list(range(2, 25, 2)), key
    for key in ("val/AP75", "val/AP75_tol", "val/dice"):
        assert _steps(client, run_id, key) == [8, 16, 24], key
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert system
    for key in system:
        steps = _steps(client, run_id, key)
        assert steps == sorted(set(steps)), key  # MLflow continues system-metric steps on resume
    versions = client.search_model_versions("name='angio-stage1'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run_id


def test_resume_handles(store_uri, tmp_path):
    """Run id or out_dir lead to the checkpoint; clear errors otherwise."""
    import torch

    from angioexp.config import load_config, to_dict
    from angioexp.tracking.callback import OUT_DIR_TAG
    from angioexp.tracking.resume import find_resume_point, write_run_file
    from angioexp.tracking.uri import ensure_experiment

    client = mlflow.MlflowClient(store_uri)
    run_id = client.create_run(ensure_experiment("angioexp-stage1")).info.run_id
    out = tmp_path / "out"
    with pytest.raises(InputError, match="has no 'angioexp.out_dir' tag"):
        find_resume_point(run_id, client=client)
    client.set_tag(run_id, OUT_DIR_TAG, str(out))
    out.mkdir()
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        find_resume_point(run_id, client=client)
    (out / "checkpoints").mkdir()
    torch.save({"model": {}, "step": 8, "config": to_dict(load_config(stage=2))}, out / "checkpoints" / "last.pt")
    write_run_file(out, run_id, store_uri, "1")
    by_id = find_resume_point(run_id, client=client)
    by_dir = find_resume_point(str(out), client=client)
    assert (by_id.run_id, by_id.step, by_id.config["stage"]) == (run_id, 8, 2)
    assert by_dir.run_id == run_id and by_dir.checkpoint == by_id.checkpoint
    with pytest.raises(InputError, match="no MLflow run"):
        find_resume_point("0" * 32, client=client)
