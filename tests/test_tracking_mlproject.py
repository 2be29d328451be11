"""The MLproject file and its entry-point shim; `mlflow run . -e train --env-manager local` for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from angioexp.tracking.mlproject import main_job_steps, to_argv

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_mlproject_declares_every_entry_point():
    project = yaml.safe_load((REPO_ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) == {"main", "prepare", "train", "evaluate", "sweep", "promote", "dashboard"}
    train = project["entry_points"]["train"]["parameters"]
    assert {"stage", "backend", "config", "overrides", "init_from", "budget_minutes", "checkpoint", "max_steps"} <= set(train)
    assert all(p["type"] == "string" for p in train.values())
    assert (REPO_ROOT / project["conda_env"]).is_file()
    conda = yaml.safe_load((REPO_ROOT / project["conda_env"]).read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert any(p.startswith("torch>=2.5") for p in pip) and any(p.startswith("psutil") for p in pip)


def test_main_job_budgets_each_stage_and_lets_the_user_override():
    cap = ["--set", "data.max_val_images=120"]
    assert main_job_steps(["--overrides", "", "--stage1_minutes", "", "--stage2_minutes", ""]) == [
        ["train", "--stage", "1", "--budget-minutes", "8.0", *cap],
        ["train", "--stage", "2", "--budget-minutes", "14.0", *cap],
        ["dashboard"],
    ]
    steps = main_job_steps(["--overrides", "train.max_steps=50 data.max_val_images=10", "--stage1_minutes", "0",
                            "--stage2_minutes", "3"])
    assert steps[0] == ["train", "--stage", "1", *cap, "--set", "train.max_steps=50", "--set", "data.max_val_images=10"]
    assert steps[1][:5] == ["train", "--stage", "2", "--budget-minutes", "3"]
    with pytest.raises(SystemExit, match="unknown option '--stage3_minutes'"):
        main_job_steps(["--stage3_minutes", "1"])


def test_shim_drops_empty_parameters_and_expands_overrides():
    argv = ["--stage", "2", "--backend", "core", "--config", "", "--overrides", "scratch.lr_scale=0.1 prompts.num_points=[1,3]; train.max_steps=5",
            "--init_from", "models:/angio-stage1/3", "--budget_minutes", "", "--max_steps", "", "--checkpoint", "", "--resume", ""]
    assert to_argv("train", argv) == [
        "train", "--stage", "2", "--backend", "core", "--init-from", "models:/angio-stage1/3",
        "--set", "scratch.lr_scale=0.1", "--set", "prompts.num_points=[1,3]", "--set", "train.max_steps=5",
    ]
    assert to_argv("train", ["--stage", "1", "--checkpoint", "/w/sam3.pt"]) == ["train", "--stage", "1", "--set", "sam3.checkpoint=/w/sam3.pt"]
    assert to_argv("promote", ["--model", "angio-stage1", "--version", "", "--from_alias", "challenger", "--alias", "champion"]) == [
        "promote", "--model", "angio-stage1", "--from-alias", "challenger", "--alias", "champion"]
    assert to_argv("prepare", ["--stage", "1", "--index", "", "--register", "true"]) == ["prepare", "--stage", "1", "--register"]
    assert to_argv("evaluate", ["--extra", "--checkpoint runs/x/best.pt --split val"]) == [
        "evaluate", "--checkpoint", "runs/x/best.pt", "--split", "val"]
    with pytest.raises(SystemExit):
        to_argv("nope", [])


@pytest.mark.slow
def test_mlflow_run_train_logs_into_the_run_mlflow_created(coco_stage1, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ANGIOEXP_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    overrides = (f"data.coco_dir={coco_stage1} train.out_dir={tmp_path / 'runs'} scratch.resolution=128 "
                 "scratch.train_batch_size=2 train.max_steps=4 train.eval_every=4 train.checkpoint_every=4 "
                 "train.log_every=2 data.max_val_images=2 train.device=cpu tracking.log_system_metrics=false")
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO_ROOT), "-e", "train", "-P", "stage=1", "-P", f"overrides={overrides}",
         "--env-manager", "local", "--experiment-name", "angioexp-stage1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("angioexp-stage1")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # `mlflow run` made it; angioexp tagged it
    (run,) = client.search_runs([experiment.experiment_id])
    tags = run.data.tags
    assert tags["mlflow.project.entryPoint"] == "train"  # created by `mlflow run` …
    assert tags["stage"] == "1" and tags["backend"] == "core"  # … and logged into by angioexp
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("s1-core-")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    version = client.get_model_version_by_alias("angio-stage1", "champion")
    assert version.run_id == run.info.run_id
