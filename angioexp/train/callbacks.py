"""The small interface through which a training run reports to the outside world.

Training code knows nothing of MLflow or Optuna: it calls these hooks, and
``angioexp.tracking`` (MLflow) and ``angioexp.sweep`` (Optuna pruning) implement them.
Metric names follow docs/design.md#metric-keys: ``train/loss``, ``train/<term>``, ``train/grad_norm``,
``train/lr``, ``train/nan_events``, ``train/images_per_s``, ``val/AP``, ``val/AP50``,
``val/AP75``, ``val/AP_tol``, ``val/AP75_tol``, ``val/dice``, ``val/cldice``, ``val/biou``,
``val/AP75/<segment slug>``, ``val/dice/<segment slug>``.

A hook may raise ``optuna.TrialPruned`` (from ``on_eval_end``) to stop the run; the loop
writes a checkpoint, calls ``on_train_end`` and re-raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunInfo:
    """Handed to ``on_train_start``."""

    config: Any  # angioexp.config.Config
    out_dir: Path
    start_step: int  # > 0 when resuming
    max_steps: int
    model: Any = None  # the nn.Module (unwrapped), for loggers that want its size
    coco_dir: Path | None = None
    extra: dict = field(default_factory=dict)  # e.g. {"init_report": LoadReport}


@dataclass
class EvalArtifacts:
    """Files an evaluation produced (all optional)."""

    metrics_json: Path | None = None
    per_image_csv: Path | None = None
    overlays_dir: Path | None = None
    predictions_json: Path | None = None
    segments_dir: Path | None = None  # Stage 2: segment metrics, per-segment table, confusion matrix


@dataclass
class TrainResult:
    out_dir: Path
    steps: int  # optimizer steps taken in total (including before a resume)
    final_metrics: dict[str, float]  # last evaluation (val/*)
    best_metrics: dict[str, float]  # evaluation with the best primary metric
    checkpoint: Path | None  # last checkpoint (model + optimizer + step)
    best_checkpoint: Path | None
    nan_events: int = 0
    restores: int = 0
    diverged: bool = False
    pruned: bool = False
    stopped_reason: str = "max_steps"  # max_steps | budget | pruned | diverged
    wall_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # NaN guard events


def is_better(value: float | None, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` on a metric where ``mode`` (max|min) is better; a missing or
    non-finite value never does, and any finite value beats no best at all."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class Callback:
    """No-op base; override what you need. Hooks run on rank 0 only under DDP."""

    def on_train_start(self, info: RunInfo) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``train.log_every`` steps: train/* metrics of that step (averaged over the window)."""

    def on_nan_event(self, step: int, event: dict) -> None:
        """Each non-finite step (``{"kind", "lr", "action", "detail"}``)."""

    def on_eval_end(self, step: int, metrics: dict[str, float], artifacts: EvalArtifacts) -> None:
        """After each evaluation: val/* metrics. May raise ``optuna.TrialPruned``."""

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks=()):
        self.callbacks = [c for c in callbacks if c is not None]

    def __getattribute__(self, name):
        if name.startswith("on_"):
            def fan_out(*args, **kwargs):
                for cb in object.__getattribute__(self, "callbacks"):
                    getattr(cb, name)(*args, **kwargs)
            return fan_out
        return object.__getattribute__(self, name)
