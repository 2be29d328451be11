"""Sweeps (issue 5): the 12-trial ``stage1_nan`` acceptance sweep on CPU, pruning vs no pruning,
and the sweep machinery's overhead per trial.

Two studies, both tracked in MLflow (a temporary SQLite store): ``sweeps/stage1_nan.yaml`` as
shipped (its sampler and pruner), then the counterfactual — the same trials, i.e. the pruned
study's parameters enqueued in order, each trained to the end (``pruner: none``). Pairing the
trials isolates what pruning costs: with two independent TPE studies the samplers' paths part
after the first pruned trial and "best AP75" compares different configurations. Trials per hour
= finished trials / sweep wall time; "equal best AP75" = the pruned study's best tolerant AP75
within ``AP_TOLERANCE`` of the best any of its trials reaches when none is stopped. The overhead per
trial is the trial's wall time in Optuna minus the training's own wall time (``TrainResult.
wall_seconds``): config building, MLflow runs, params, state tags, ask/tell. ``--quick`` shrinks
everything (tiny model, 4 trials) to check that the benchmark runs, not to measure.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from angioexp.bench import Figure

TITLE = "Sweeps (issue 5): stage1_nan on CPU, pruning speed-up, machinery overhead"

SPACE = Path(__file__).resolve().parents[2] / "sweeps" / "stage1_nan.yaml"
N_TRIALS = 12
AP_TOLERANCE = 0.02  # "equal best AP75": within 2 points of tolerant AP75
GOAL_SPEEDUP = 2.0
QUICK_SETS = [
    "scratch.resolution=64", "model.encoder_channels=[8,8,16,16]", "model.d_model=16", "model.num_queries=2",
    "model.decoder_layers=1", "model.num_heads=2", "train.max_steps=6", "train.eval_every=2",
    "train.checkpoint_every=6", "data.max_val_images=3", "data.synth_cases=9", "data.synth_size=128",
    "data.synth_frames=2",
]


def _space_without_pruner(text: str) -> str:
    return re.sub(r"(?m)^pruner:.*$", "pruner: none", text)


def _sweep(space: Path, study: str, workdir: Path, coco: Path, n_trials: int, sets: list[str]) -> dict:
    import optuna

    from angioexp.sweep.cli import main
    from angioexp.sweep.storage import open_storage

    storage = f"sqlite:///{workdir / 'optuna.db'}"
    argv = ["--space", str(space), "--study", study, "--storage", storage, "--n-trials", str(n_trials),
            "--coco-dir", str(coco), "--out", str(workdir / "runs"), "--no-register"]
    for s in sets:
        argv += ["--set", s]
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    trials = optuna.load_study(study_name=study, storage=open_storage(storage).storage).get_trials(deepcopy=False)
    outcomes: dict[str, int] = {}
    for t in trials:
        key = t.user_attrs.get("outcome", t.state.name.lower())
        outcomes[key] = outcomes.get(key, 0) + 1
    best = max((t.value for t in trials if t.state.name == "COMPLETE" and t.value is not None), default=float("nan"))
    overhead = [
        (t.datetime_complete - t.datetime_start).total_seconds() - float(t.user_attrs["wall_seconds"])
        for t in trials if t.datetime_complete and t.datetime_start and "wall_seconds" in t.user_attrs
    ]
    return {"rc": rc, "wall": wall, "trials": len(trials), "outcomes": outcomes, "best": best,
            "overhead": statistics.median(overhead) if overhead else float("nan"),
            "per_trial": wall / max(1, len(trials)),
            "nan_pruned": sum(1 for t in trials if t.user_attrs.get("failure") == "nan" and t.state.name == "PRUNED")}


def _enqueue_same_trials(workdir: Path, source: str, target: str) -> None:
    """Create study ``target`` holding ``source``'s trials' parameters as WAITING trials, in order."""
    import optuna

    from angioexp.sweep.storage import open_storage

    storage = open_storage(f"sqlite:///{workdir / 'optuna.db'}").storage
    done = optuna.load_study(study_name=source, storage=storage)
    paired = optuna.create_study(study_name=target, storage=storage, directions=done.directions)
    for trial in sorted(done.get_trials(deepcopy=False), key=lambda t: t.number):
        paired.enqueue_trial(dict(trial.params))


def run(quick: bool) -> list[Figure]:
    from angioexp.sweep.cli import prepare_data
    from angioexp.sweep.space import load_space

    n_trials = 4 if quick else N_TRIALS
    sets = QUICK_SETS if quick else []
    with tempfile.TemporaryDirectory(prefix="angioexp-bench-sweep-") as tmp:
        workdir = Path(tmp)
        old_uri = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.environ.setdefault("ANGIOEXP_ARTIFACT_ROOT", str(workdir / "mlartifacts"))
        try:
            space = load_space(SPACE)
            # The dataset is prepared (and cached under data/) before the clocks start.
            coco = prepare_data(space, space.backend, None, sets)
            unpruned_space = workdir / "stage1_nan_nopruning.yaml"
            unpruned_space.write_text(_space_without_pruner(SPACE.read_text()), encoding="utf-8")
            # Warm-up (MLflow schema, first-trial imports and caches) so neither timed study pays it.
            _sweep(unpruned_space, "bench_warmup", workdir, coco, 1, sets)
            pruned = _sweep(SPACE, "bench_pruned", workdir, coco, n_trials, sets)
            _enqueue_same_trials(workdir, "bench_pruned", "bench_unpruned")
            plain = _sweep(unpruned_space, "bench_unpruned", workdir, coco, n_trials, sets)
        finally:
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri

    per_hour_pruned = 3600 * pruned["trials"] / pruned["wall"]
    per_hour_plain = 3600 * plain["trials"] / plain["wall"]
    speedup = per_hour_pruned / per_hour_plain
    equal_best = pruned["best"] >= plain["best"] - AP_TOLERANCE
    how = f"{n_trials} trials of sweeps/stage1_nan.yaml (pruner {space.pruner.name} on {space.pruning_metric}), sampler seed {space.sampler.seed}" + (
        " — QUICK sizes, not a measurement" if quick else "")
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(pruned["outcomes"].items()))
    return [
        Figure("stage1_nan sweep: trials finished", pruned["trials"], "trials", goal=f"= {n_trials}",
               met=pruned["trials"] == n_trials and pruned["rc"] == 0, note=f"{how}; outcomes: {outcomes}"),
        Figure("stage1_nan sweep: NaN trials pruned (failure=nan, not lost)", pruned["nan_pruned"], "trials",
               note="PRUNED with step/lr/events attrs; the study goes on"),
        Figure("stage1_nan sweep: wall time", pruned["wall"] / 60, "min", note=f"{pruned['per_trial']:.0f} s per trial incl. MLflow"),
        Figure("trials per hour with pruning", per_hour_pruned, "trials/h", note=how),
        Figure("trials per hour without pruning", per_hour_plain, "trials/h",
               note="the same trials (parameters enqueued in order), each trained to the end"),
        Figure("pruning speed-up (trials/hour ratio)", speedup, "×", goal=f">= {GOAL_SPEEDUP:g}× at equal best AP75",
               met=(speedup >= GOAL_SPEEDUP and equal_best) if not quick else None,
               note=f"best val/AP75_tol {pruned['best']:.3f} pruned vs {plain['best']:.3f} with every trial run to the end "
                    f"({'equal' if equal_best else 'NOT equal'} within {AP_TOLERANCE})"),
        Figure("sweep machinery overhead per trial", pruned["overhead"], "s",
               note="median of (trial wall in Optuna − training wall): config, MLflow nested run, params, tags, tell"),
    ]
