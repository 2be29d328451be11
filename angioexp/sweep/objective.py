"""The Optuna objective: suggest → train → report/prune → score (optuna-examples' shape).

One call = one trial = one training run of the chosen backend. Outcomes, each recorded as the
trial's user attr ``outcome`` (and ``failure`` for the last three), so a study keeps every trial
and says what happened to it:

=========  =========  ======================================================================
outcome    state      when
=========  =========  ======================================================================
complete   COMPLETE   the run finished; its value(s) are the objective metric(s)
pruned     PRUNED     the pruner stopped it after an evaluation (``pruned_at_step``)
nan        PRUNED     the NaN guard gave up (``TrainingDiverged``: NaN/Inf or exploding losses,
                      attr ``divergence``) or the score is not finite; attrs ``step``, ``lr``,
                      ``events`` — pruned, never scored as 0 or lost
oom        FAIL       out of (GPU or host) memory
crash      FAIL       any other exception (``error``, ``traceback``)
=========  =========  ======================================================================

The objective follows Optuna's conventions (returns values, raises ``TrialPruned`` or the
error), so it also works with a plain ``study.optimize(objective, ...)``.
"""

from __future__ import annotations

import csv
import gc
import logging
import math
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from angioexp.errors import AngioexpError, TrainingDiverged
from angioexp.sweep.space import SearchSpace
from angioexp.train.callbacks import Callback, EvalArtifacts, TrainResult

log = logging.getLogger(__name__)

# Effective values always stored on the trial (the NaN map plots these even when not searched).
EFFECTIVE_KEYS = ("scratch.lr_scale", "loss.masks.loss_mask", "loss.masks.loss_dice", "optim.gradient_clip.max_norm")
# Wilcoxon steps: evaluation k, image i → k * stride + i (pairs the same image at the same eval).
WILCOXON_STRIDE = 100_000
MAX_TEXT_ATTR = 2000


class PruningCallback(Callback):
    """Reports the objective metric after each evaluation and prunes when the pruner says so.

    With ``per_image=True`` (Wilcoxon) every image's Dice of the evaluation is reported as its
    own "instance" step instead of one scalar per training step.
    """

    def __init__(self, trial: optuna.Trial, metric: str, *, per_image: bool = False):
        self.trial = trial
        self.metric = metric
        self.per_image = per_image
        self.evals = 0
        self._warned = False

    def on_eval_end(self, step: int, metrics: dict[str, float], artifacts: EvalArtifacts) -> None:
        self.evals += 1
        value = metrics.get(self.metric)
        if self.per_image:
            dice = _per_image_dice(artifacts.per_image_csv if artifacts else None)
            if not dice and not self._warned:
                log.warning("Wilcoxon pruning needs per-image Dice (per_image.csv); none for this evaluation")
                self._warned = True
            for i, d in enumerate(dice):
                if math.isfinite(d):
                    self.trial.report(d, self.evals * WILCOXON_STRIDE + i)
        elif value is not None and math.isfinite(float(value)):
            self.trial.report(float(value), int(step))
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_step", int(step))
            shown = f"{float(value):.4g}" if value is not None else "n/a"
            raise optuna.TrialPruned(f"pruned at step {step} ({self.metric} = {shown})")


def _per_image_dice(path: Path | None) -> list[float]:
    """Per-image Dice from the evaluation's per_image.csv, ordered by image id."""
    if path is None or not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "dice" not in rows[0]:
        return []
    id_key = "image_id" if "image_id" in rows[0] else None
    if id_key:
        rows.sort(key=lambda r: _as_number(r[id_key]))
    out = []
    for r in rows:
        try:
            out.append(float(r["dice"]))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


def _as_number(text):
    try:
        return (0, float(text))
    except (TypeError, ValueError):
        return (1, str(text))


@dataclass
class TrialContext:
    """What every trial of one worker shares."""

    space: SearchSpace
    backend: str
    out_root: Path  # trials write under out_root/<study>/trial_NNNN
    study_name: str
    coco_dir: Path | None = None
    init_checkpoint: Path | None = None
    extra_overrides: list[str] = field(default_factory=list)  # --set key=value
    threads: int | None = None  # torch threads per trial (CPU share of this worker)
    tracker: Any = None  # angioexp.sweep.tracking.SweepTracker or None
    worker_index: int = 0


Runner = Callable[[Any, list, TrialContext], TrainResult]


def run_backend(cfg, callbacks: list, ctx: TrialContext) -> TrainResult:
    """One trial through :func:`angioexp.backends.get_backend`: the core backend trains in this
    process, sam3 in a subprocess whose evaluations reach the callbacks, so pruning and NaN
    handling are the same for both. No ``run_id``: a trial's metrics reach MLflow through the
    callbacks."""
    from angioexp.backends import get_backend

    return get_backend(cfg.backend).train(cfg, data=ctx.coco_dir, init=ctx.init_checkpoint, callbacks=callbacks)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # noqa: BLE001
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Objective:
    """``objective(trial) -> float | list[float]`` for a :class:`SearchSpace`."""

    def __init__(self, ctx: TrialContext, runner: Runner | None = None):
        self.ctx = ctx
        self.runner = runner or run_backend

    def trial_dir(self, trial: optuna.Trial) -> Path:
        return Path(self.ctx.out_root) / self.ctx.study_name / f"trial_{trial.number:04d}"

    def build_config(self, trial: optuna.Trial):
        space = self.ctx.space
        values = space.suggest(trial)
        runtime = [
            f"train.out_dir={self.trial_dir(trial)}",
            # best.pt and the loop's "best" metrics follow the (first) objective
            f"tracking.primary_metric={space.metrics[0]}",
            f"tracking.primary_mode={'max' if space.directions[0] == 'maximize' else 'min'}",
            "tracking.register=false",  # the sweep registers only its best trial
        ]
        if self.ctx.threads:
            runtime.append(f"train.threads={self.ctx.threads}")
        cfg = space.build_config(values, extra=runtime + list(self.ctx.extra_overrides), backend=self.ctx.backend)
        return cfg, values

    def __call__(self, trial: optuna.Trial):
        ctx, space = self.ctx, self.ctx.space
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr("worker_host", socket.gethostname())
        trial.set_user_attr("worker_index", ctx.worker_index)
        cfg, values = self.build_config(trial)
        trial.set_user_attr("out_dir", str(cfg.train.out_dir))
        flat_effective = {k: _get(cfg, k) for k in EFFECTIVE_KEYS}
        for k, v in flat_effective.items():
            trial.set_user_attr(f"cfg.{k}", v)

        callbacks: list[Callback] = []
        if not space.multi_objective and space.pruner.name != "none":
            callbacks.append(PruningCallback(trial, space.pruning_metric, per_image=space.pruner.name == "wilcoxon"))
        trial_run = ctx.tracker.start_trial(trial, cfg, values) if ctx.tracker is not None else None
        if trial_run is not None:
            callbacks.append(trial_run.callback)

        outcome, state, result, error = "crash", "FAIL", None, None
        try:
            result = self.runner(cfg, callbacks, ctx)
        except optuna.TrialPruned as exc:
            outcome, state, error = "pruned", "PRUNED", exc
            raise
        except TrainingDiverged as exc:
            outcome, state, error = "nan", "PRUNED", exc
            self._record_divergence(trial, exc.step, exc.lr, exc.events, exc.history)
            raise optuna.TrialPruned(f"diverged ({_divergence(exc.history)}) at step {exc.step}, lr {exc.lr:.3g}, "
                                     f"{exc.events} events") from None
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                outcome, error = "interrupted", exc
            else:
                outcome, error = ("oom" if is_oom(exc) else "crash"), exc
                trial.set_user_attr("failure", outcome)
                trial.set_user_attr("error", _clip(f"{type(exc).__name__}: {exc}"))
                if not isinstance(exc, AngioexpError):
                    trial.set_user_attr("traceback", _clip("".join(traceback.format_exception(exc))[-MAX_TEXT_ATTR:]))
                if outcome == "oom":
                    _release_memory()
            raise
        finally:
            if error is not None:
                trial.set_user_attr("outcome", outcome)
                if trial_run is not None:
                    ctx.tracker.finish_trial(trial_run, state=state, outcome=outcome, metrics={},
                                             attrs=_safe_attrs(trial), error=error)

        # The run returned: score it (or classify it as NaN if the loop reported divergence).
        trial.set_user_attr("nan_events", int(result.nan_events))
        trial.set_user_attr("steps", int(result.steps))
        trial.set_user_attr("wall_seconds", round(float(result.wall_seconds), 2))
        if result.checkpoint is not None:
            trial.set_user_attr("checkpoint", str(result.best_checkpoint if space.objective_from == "best" and result.best_checkpoint else result.checkpoint))
        metrics = dict(result.best_metrics if space.objective_from == "best" and result.best_metrics else result.final_metrics or {})
        recorded = {m: float(metrics[m]) for m in space.recorded_metrics() if m in metrics and _finite_number(metrics[m])}
        trial.set_user_attr("metrics", recorded)

        problem = None
        if result.diverged:
            last = (result.history or [{}])[-1]
            self._record_divergence(trial, last.get("step", result.steps), last.get("lr", float("nan")), result.nan_events, result.history)
            problem = ("nan", f"diverged ({_divergence(result.history)}) at step {last.get('step', result.steps)}")
        else:
            missing = [m for m in space.metrics if m not in metrics]
            if missing:
                have = ", ".join(sorted(metrics)) or "none"
                problem = ("crash", f"objective metric(s) {missing} not in the run's evaluation (have: {have})")
            elif not all(_finite_number(metrics[m]) for m in space.metrics):
                trial.set_user_attr("failure", "nan")
                problem = ("nan", f"objective not finite: {[metrics[m] for m in space.metrics]}")
        if problem is not None:
            outcome, message = problem
            trial.set_user_attr("outcome", outcome)
            trial.set_user_attr("failure", outcome)
            trial.set_user_attr("error", _clip(message))
            state = "PRUNED" if outcome == "nan" else "FAIL"
            if trial_run is not None:
                ctx.tracker.finish_trial(trial_run, state=state, outcome=outcome, metrics=recorded, attrs=_safe_attrs(trial), error=message)
            if outcome == "nan":
                raise optuna.TrialPruned(message)
            raise RuntimeError(message)

        values_out = [float(metrics[m]) for m in space.metrics]
        trial.set_user_attr("outcome", "complete")
        if trial_run is not None:
            ctx.tracker.finish_trial(trial_run, state="COMPLETE", outcome="complete", metrics=recorded,
                                     attrs=_safe_attrs(trial), error=None, checkpoint=result.checkpoint)
        return values_out if space.multi_objective else values_out[0]

    @staticmethod
    def _record_divergence(trial, step, lr, events, history) -> None:
        trial.set_user_attr("failure", "nan")
        trial.set_user_attr("step", int(step))
        trial.set_user_attr("lr", float(lr) if _finite_number(lr) else None)
        trial.set_user_attr("events", int(events))
        trial.set_user_attr("nan_history", [_jsonable(h) for h in list(history or [])[-10:]])
        trial.set_user_attr("divergence", _divergence(history))


def _divergence(history) -> str:
    """What the guard's bad steps were: "NaN/Inf", "loss explosion" or both."""
    kinds = {h.get("kind") for h in history or [] if isinstance(h, dict)}
    names = [name for name, hit in (("NaN/Inf", bool(kinds - {"explosion"})), ("loss explosion", "explosion" in kinds)) if hit]
    return " + ".join(names) or "NaN/Inf"


def _get(cfg, dotted: str):
    target = cfg
    for part in dotted.split("."):
        target = getattr(target, part)
    return list(target) if isinstance(target, tuple) else target


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_ATTR else text[: MAX_TEXT_ATTR - 1] + "…"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _safe_attrs(trial) -> dict:
    try:
        return dict(trial.user_attrs)
    except Exception:  # noqa: BLE001
        return {}


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
