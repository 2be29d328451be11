"""Tracking overhead: the same short core training with MLflow tracking on vs off.

Both arms run in this process on the same prepared synthetic data and config, interleaved
(off, on, off, on, …) so that load from other processes hits both alike; the headline is the
ratio of median wall times (goal ≤ 1.02). "on" is what ``tracked_train`` adds inside the loop:
an active run with system metrics and :class:`MlflowCallback` (async batched metrics, eval
artifacts, the learning-curve PNG at each evaluation).

A wall-time ratio of two trainings is noisy on a shared machine, so two steadier figures sit
beside it: the time the training thread spends inside the tracking hooks, as a fraction of the
training's wall time (what async logging is meant to keep small), and the same ratio with
synchronous logging. Last, the fixed cost per tracked run outside the loop (run creation,
dataset inputs, LoggedModel, registry), in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from angioexp.bench import Figure
from angioexp.train.callbacks import Callback

TITLE = "MLflow tracking overhead"
GOAL_RATIO = 1.02


def _sizes(quick: bool) -> dict:
    # full: the default working resolution (256 px) and a realistic logging cadence
    return {"resolution": 128 if quick else 256, "batch": 2 if quick else 4, "steps": 20 if quick else 60, "repeats": 2}


def _config(coco_dir: Path, out_dir: Path, quick: bool, steps: int | None = None):
    from angioexp.config import load_config

    s = _sizes(quick)
    steps = steps or s["steps"]
    return load_config(overrides=[
        f"data.coco_dir={coco_dir}", f"train.out_dir={out_dir}", f"scratch.resolution={s['resolution']}",
        f"scratch.train_batch_size={s['batch']}", f"train.max_steps={steps}", "train.log_every=10",
        f"train.eval_every={max(steps // 2, 1)}", f"train.checkpoint_every={max(steps // 2, 1)}", "data.max_val_images=4",
        "eval.overlays=2", "train.device=cpu", "train.threads=2",
    ], stage=1)


class TimedHooks(Callback):
    """Forwards every hook to ``inner`` and adds up the wall time spent in it."""

    def __init__(self, inner: Callback):
        self.inner = inner
        self.seconds = 0.0

    def _call(self, name, *args):
        t0 = time.perf_counter()
        try:
            getattr(self.inner, name)(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def on_train_start(self, info):
        self._call("on_train_start", info)

    def on_step_end(self, step, metrics):
        self._call("on_step_end", step, metrics)

    def on_nan_event(self, step, event):
        self._call("on_nan_event", step, event)

    def on_eval_end(self, step, metrics, artifacts):
        self._call("on_eval_end", step, metrics, artifacts)

    def on_checkpoint(self, step, path):
        self._call("on_checkpoint", step, path)

    def on_train_end(self, result):
        self._call("on_train_end", result)


def _timed_train(cfg, callbacks=()) -> float:
    from angioexp.train.loop import train

    t0 = time.perf_counter()
    train(cfg, coco_dir=cfg.data.coco_dir, callbacks=callbacks)
    return time.perf_counter() - t0


def run(quick: bool) -> list[Figure]:
    import mlflow

    from angioexp.config import load_config
    from angioexp.data.prepare import prepare
    from angioexp.tracking.callback import MlflowCallback
    from angioexp.tracking.session import tracked_train
    from angioexp.tracking.uri import ensure_experiment

    s = _sizes(quick)
    with tempfile.TemporaryDirectory(prefix="angioexp-bench-tracking-") as tmp:
        root = Path(tmp)
        data_cfg = load_config(overrides=[f"data.cache_dir={root / 'data'}", "data.synth_cases=12",
                                          f"data.synth_size={s['resolution']}", "data.synth_frames=2"]).data
        coco_dir = prepare(data_cfg, 1)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "ANGIOEXP_ARTIFACT_ROOT", "MLFLOW_RUN_ID")}
        os.environ.update(MLFLOW_TRACKING_URI=uri, ANGIOEXP_ARTIFACT_ROOT=str(root / "mlartifacts"))
        os.environ.pop("MLFLOW_RUN_ID", None)
        mlflow.set_tracking_uri(uri)
        try:
            experiment = ensure_experiment("bench-tracking")
            times: dict[str, list[float]] = {"off": [], "async": [], "sync": []}
            hook_fraction: dict[str, list[float]] = {"async": [], "sync": []}
            _timed_train(_config(coco_dir, root / "warmup", quick, steps=2))  # imports, caches, allocator
            for i in range(s["repeats"]):
                for arm in ("off", "async", "sync"):
                    cfg = _config(coco_dir, root / f"{arm}-{i}", quick)
                    if arm == "off":
                        times[arm].append(_timed_train(cfg))
                        continue
                    with mlflow.start_run(experiment_id=experiment, log_system_metrics=True) as active:
                        hooks = TimedHooks(MlflowCallback(active.info.run_id, synchronous=(arm == "sync")))
                        wall = _timed_train(cfg, [hooks])
                    times[arm].append(wall)
                    hook_fraction[arm].append(hooks.seconds / wall)
            off = statistics.median(times["off"])
            ratio = statistics.median(times["async"]) / off
            ratio_sync = statistics.median(times["sync"]) / off
            in_hooks = statistics.median(hook_fraction["async"])
            in_hooks_sync = statistics.median(hook_fraction["sync"])

            # fixed cost outside the loop: the whole tracked_train minus a plain train() of the same run
            t0 = time.perf_counter()
            tracked_train(_config(coco_dir, root / "e2e", quick, steps=10), argparse.Namespace())
            tracked = time.perf_counter() - t0
            plain = _timed_train(_config(coco_dir, root / "e2e-off", quick, steps=10))
        finally:
            mlflow.set_tracking_uri(None)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    how = (f"core, {s['resolution']} px, batch {s['batch']}, {s['steps']} steps, log every 10, 2 evals + 2 checkpoints; "
           f"{s['repeats']} interleaved repeats per arm, medians; off = {off:.1f} s; runs: "
           + ", ".join(f"{arm} " + "/".join(f"{t:.1f}" for t in ts) for arm, ts in times.items()))
    return [
        Figure("wall time, tracking on (async) / off", round(ratio, 4), "×", f"<= {GOAL_RATIO}", ratio <= GOAL_RATIO, how),
        Figure("training-thread time inside tracking hooks (async)", round(100 * in_hooks, 2), "% of wall", "<= 2 %",
               in_hooks <= 0.02, "TimedHooks around MlflowCallback; includes eval artifacts + PNG redraw"),
        Figure("wall time, tracking on (synchronous logging) / off", round(ratio_sync, 4), "×", "", None,
               f"same runs; {100 * in_hooks_sync:.2f} % of wall inside the hooks"),
        Figure("fixed cost per tracked run (run, inputs, LoggedModel, registry)", round(tracked - plain, 1), "s", "", None,
               "tracked_train minus plain train() of the same 10-step run, fresh SQLite store"),
    ]
