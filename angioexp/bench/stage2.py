"""Stage 2 from the Stage 1 champion vs from scratch, paired over seeds (issue 13).

For each seed s (the Stage 1 seed varies with it): Stage 1 trains for ``STAGE1_MINUTES``; then
Stage 2 trains twice for ``STAGE2_MINUTES`` each — initialised from that Stage 1 model, and from
scratch — with the same data, seed and budget. Both Stage 2 runs keep a snapshot of their
(averaged) weights at every time mark in ``MARKS_MINUTES``; every snapshot and the final best
checkpoint are scored on the test split (clean truth). The figure per mark is the mean paired
difference init − scratch of ``dice_common`` with its 95 % t-interval over seeds — a claim only
when the interval excludes 0.

Data: ``CASES`` single-frame synthetic cases (Stage 2 labels), the test split ≥ 300 frames.
``--quick`` shrinks everything to check that the benchmark runs, not to measure.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from angioexp.bench import Figure
from angioexp.evaluate.paired import paired_interval
from angioexp.train.callbacks import Callback

TITLE = "Stage 2: segment identity, Stage 1 init vs scratch (paired seeds, test split, clean truth)"

SEEDS = (0, 1, 2)
CASES = 2200  # single-frame cases → 1524 train / 339 val / 337 test frames (patient-level split)
DATA_SEED = 0
STAGE1_MINUTES = 10.0
STAGE2_MINUTES = 10.0
MARKS_MINUTES = (2.5, 5.0, 10.0)
GOAL_GAIN_AT = 5.0  # minutes: the "≥ +0.05 dice_common at the 5-minute mark"
QUICK = {"seeds": (0, 1), "cases": 12, "stage1": 0.15, "stage2": 0.2, "marks": (0.1, 0.2),
         "sets": ["data.synth_size=128", "scratch.resolution=128", "scratch.crop_size=64",
                  "model.encoder_channels=[8,8,16,16]", "model.d_model=32", "model.num_queries=2",
                  "scratch.train_batch_size=2"]}

log = logging.getLogger(__name__)


class MarkSnapshots(Callback):
    """Training callback: at the first checkpoint after each time mark, keep a copy of it."""

    def __init__(self, marks_minutes: tuple[float, ...], out_dir: Path):
        self.marks = list(marks_minutes)
        self.out_dir = out_dir
        self.start = time.perf_counter()
        self.saved: dict[float, Path] = {}

    def on_checkpoint(self, step: int, path: Path) -> None:
        elapsed = (time.perf_counter() - self.start) / 60
        while self.marks and elapsed >= self.marks[0]:
            mark = self.marks.pop(0)
            target = self.out_dir / f"at_{mark:g}min.pt"
            self.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            self.saved[mark] = target


def _config(stage: int, seed: int, root: Path, cache: Path, minutes: float, extra: list[str], cases: int):
    from angioexp.config import load_config

    sets = [f"seed={seed}", f"data.synth_cases={cases}", f"data.synth_seed={DATA_SEED}", "data.synth_frames=1",
            f"data.cache_dir={cache}", f"train.out_dir={root}", "train.device=cpu", "train.threads=2",
            f"train.budget_minutes={minutes}", "train.max_steps=100000", "init_from=none", "eval.overlays=0",
            "data.max_val_images=40"]
    if stage == 2:
        sets += ["train.checkpoint_every=10", "train.eval_every=100000"]  # snapshots, one evaluation at the end
    return load_config(None, sets + extra, stage=stage)


def _score(checkpoint: Path, coco: Path, out_dir: Path, gt) -> tuple[dict, object]:
    from angioexp.train.inference import evaluate_split

    metrics, _, gt = evaluate_split(checkpoint, coco, "test", out_dir=out_dir, gt=gt)
    return metrics, gt


def run(quick: bool, track: bool = False) -> list[Figure]:
    """``track``: every Stage 2 run goes through MLflow tracking (experiment ``BENCH_EXPERIMENT``,
    nothing registered) with its test-split score logged as ``test/segments/*``, so the
    dashboards' overview shows the paired comparison."""
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="angioexp-bench-stage2-") as tmp:
        return _measure(Path(tmp), quick, track)


def _train_stage2(cfg, coco: Path, init: Path | None, snapshots: MarkSnapshots, track: bool):
    """(TrainResult, MLflow run id or None)."""
    if not track:
        from angioexp.train.loop import train

        return train(cfg, coco_dir=coco, init_checkpoint=init, callbacks=[snapshots]), None
    import json

    from angioexp.dashboard.init_vs_scratch import BENCH_EXPERIMENT
    from angioexp.tracking.resume import RUN_FILE
    from angioexp.tracking.session import tracked_train

    cfg.tracking.experiment, cfg.tracking.register = BENCH_EXPERIMENT, False
    cfg.init_from = str(init) if init is not None else None
    result = tracked_train(cfg, extra_callbacks=[snapshots])
    return result, json.loads((result.out_dir / RUN_FILE).read_text(encoding="utf-8"))["run_id"]


def _log_test_scores(run_id: str, metrics: dict[str, float], step: int) -> None:
    """The test split's Stage 2 scores (evaluate_split names them val/…) as ``test/segments/*``
    on the tracked run, beside its own validation evaluations."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from angioexp.tracking.uri import configure_mlflow

    now = int(time.time() * 1000)
    MlflowClient(configure_mlflow()).log_batch(run_id, metrics=[
        Metric(f"test/segments/{k.removeprefix('val/segments/')}", v, now, step)
        for k, v in metrics.items() if k.startswith("val/segments/") and math.isfinite(v)])


def _measure(root: Path, quick: bool, track: bool = False) -> list[Figure]:
    from angioexp.data.prepare import prepare
    from angioexp.train.loop import train

    seeds, cases = (QUICK["seeds"], QUICK["cases"]) if quick else (SEEDS, CASES)
    s1_min, s2_min = (QUICK["stage1"], QUICK["stage2"]) if quick else (STAGE1_MINUTES, STAGE2_MINUTES)
    marks = QUICK["marks"] if quick else MARKS_MINUTES
    extra = QUICK["sets"] if quick else []
    cache = Path(os.environ.get("ANGIOEXP_BENCH_CACHE", root / "data"))
    t_total = time.perf_counter()
    scores: dict[tuple[str, int], dict[str, float]] = {}  # (arm, seed) → {"2.5": dice_common, …, "end": …}
    steps: dict[tuple[str, int], int] = {}
    reference: dict[str, float] = {}
    gt = None
    coco = None
    for seed in seeds:
        s1_cfg = _config(1, seed, root / f"s1_{seed}", cache, s1_min, extra, cases)
        s1 = train(s1_cfg, coco_dir=prepare(s1_cfg.data, 1))
        s1_weights = s1.best_checkpoint or s1.checkpoint
        for arm, init in (("init", s1_weights), ("scratch", None)):
            cfg = _config(2, seed, root / f"s2_{arm}_{seed}", cache, s2_min, extra, cases)
            coco = Path(prepare(cfg.data, 2))
            snapshots = MarkSnapshots(marks, root / f"snap_{arm}_{seed}")
            result, run_id = _train_stage2(cfg, coco, init, snapshots, track)
            steps[arm, seed] = result.steps
            row = {}
            for mark, path in sorted(snapshots.saved.items()):
                metrics, gt = _score(path, coco, root / f"eval_{arm}_{seed}_{mark:g}", gt)
                row[f"{mark:g}"] = metrics["val/segments/dice_common"]
            metrics, gt = _score(result.best_checkpoint or result.checkpoint, coco, root / f"eval_{arm}_{seed}_end", gt)
            row["end"] = metrics["val/segments/dice_common"]
            if run_id is not None:
                _log_test_scores(run_id, metrics, result.steps)
            reference = {k: metrics[f"val/segments/{k}"] for k in ("floor_common", "ceiling_common", "n_frames", "n_common")}
            scores[arm, seed] = row
            log.info("stage2 bench seed %d %s: %s", seed, arm, row)

    figures = [Figure("test frames / common segments",
                      f"{reference.get('n_frames', float('nan')):.0f} / {reference.get('n_common', float('nan')):.0f}",
                      note=f"{cases} single-frame synthetic cases, data seed {DATA_SEED}; "
                           f"floor {reference.get('floor_common', float('nan')):.3f}, "
                           f"ceiling {reference.get('ceiling_common', float('nan')):.3f}")]
    for key in [f"{m:g}" for m in marks] + ["end"]:
        pairs = [(scores["init", s].get(key), scores["scratch", s].get(key)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        mean, low, high = paired_interval([a - b for a, b in pairs])
        label = "at the end" if key == "end" else f"at {key} min"
        init_mean = sum(a for a, _ in pairs) / len(pairs)
        scratch_mean = sum(b for _, b in pairs) / len(pairs)
        is_goal = key == f"{GOAL_GAIN_AT:g}"
        figures.append(Figure(
            f"dice_common {label}: init − scratch (mean, 95 % CI)", f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]",
            goal=">= +0.05, CI above 0" if is_goal else "",
            met=(mean >= 0.05 and low > 0) if is_goal else None,
            note=f"{len(pairs)} paired seeds; init {init_mean:.3f}, scratch {scratch_mean:.3f}",
        ))
    figures.append(Figure("Stage 2 steps per run (init / scratch)", " ".join(
        f"s{s}: {steps['init', s]}/{steps['scratch', s]}" for s in seeds),
        note=f"Stage 1 {s1_min:g} min, Stage 2 {s2_min:g} min per run, 2 threads"))
    figures.append(Figure("benchmark wall time", (time.perf_counter() - t_total) / 60, "min"))
    return figures
