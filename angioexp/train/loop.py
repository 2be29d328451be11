"""``train(cfg)``: the core backend's training loop — flat and readable, nanoGPT-style.

    for step in range(start, max_steps):
        lr      = base_lr(group) · InverseSquareRoot(step) · guard.lr_factor
        batch   = data.batch(step)                      # keyed by (seed, step): exact resume
        loss    = criterion(model(batch))               # bf16 autocast on CUDA, losses in fp32
        if loss not finite or exploded: bad step
        backward, clip grad norm
        if grad norm not finite: bad step               # a bad step is skipped (K in a row:
        optimizer.step; guard.good_step; ema.update     #   restore + LR backoff); evaluations
        log / evaluate / checkpoint / stop on the time budget      # score the EMA weights

Everything the outside world sees goes through :mod:`angioexp.train.callbacks` (MLflow and
Optuna live elsewhere): the caller prepares the data (``coco_dir``) and resolves ``models:/``
URIs to a weights file (``init_checkpoint``); :mod:`angioexp.backends` is the caller's door.
Evaluations write ``out_dir/eval/step_N/`` (metrics.json, per_image.csv, per_category.csv,
predictions.json, overlays/); checkpoints go to ``out_dir/checkpoints/{last,best}.pt``
atomically (:mod:`angioexp.checkpoints`). With ``train.ema_decay`` set, a checkpoint's ``model``
holds the averaged weights (what was evaluated; what Stage 2, the registry and ``evaluate``
load) and ``raw_model`` the optimizer's own, which only ``--resume`` reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from angioexp.checkpoints import (extract_state_dict, load_state_with_report, load_training_checkpoint, read_checkpoint,
                                  resolve_resume, rng_state, save_checkpoint, set_rng_state)
from angioexp.config import dump_yaml, to_dict
from angioexp.errors import InputError, OutputError, TrainingDiverged
from angioexp.fileio import atomic_file
from angioexp.train import ddp
from angioexp.train.callbacks import CallbackList, RunInfo, TrainResult, is_better
from angioexp.train.device import amp_dtype, resolve_device
from angioexp.train.ema import WeightAverage
from angioexp.train.nan_guard import NanGuard
from angioexp.train.optim import build_optimizer, set_learning_rates
from angioexp.train.schedule import InverseSquareRoot
from angioexp.train.signals import step_boundary

log = logging.getLogger(__name__)
BUDGET_PACE_STEPS = 5  # steps timed before a time budget re-plans the LR schedule


def load_init_weights(model, cfg, init_checkpoint):
    """Initial weights from ``init_checkpoint`` or ``cfg.init_from`` — a weights file (the caller
    resolves ``models:/…`` URIs); the load report fails the run (CheckpointLoadError) before any
    step when too little fits."""
    source = init_checkpoint or cfg.init_from
    if not source:
        return None
    path = Path(str(source)).expanduser()
    if not path.is_file():
        raise InputError("init weights not found (a models:/ or runs:/ URI is resolved by the caller: "
                         "angioexp.tracking.models.resolve_model)", file=path, key="init_from")
    state = extract_state_dict(read_checkpoint(path))
    report = load_state_with_report(model, state, source=str(source), min_loaded_fraction=cfg.min_loaded_fraction,
                                    new_by_design=getattr(model, "is_optional_addition", lambda name: False))
    log.info("init weights: %s", report.summary())
    return report


def check_init_weights(cfg, init_checkpoint) -> None:
    """Load the starting weights into a throw-away model on the CPU: weights that do not fit
    raise :class:`CheckpointLoadError` before any run or folder is created for them."""
    from angioexp.model.build import build_model

    load_init_weights(build_model(cfg), cfg, init_checkpoint)


@dataclass
class RunState:
    """The pieces of one run and how far it got: what checkpoint, evaluate and the result read."""

    cfg: Any
    out_dir: Path
    coco_dir: Path
    device: torch.device
    dist: ddp.DistInfo
    callbacks: CallbackList
    model: torch.nn.Module  # the optimizer's weights (unwrapped)
    kept_model: torch.nn.Module  # what evaluations score and checkpoints hand on: the EMA or the model
    optimizer: torch.optim.Optimizer
    guard: NanGuard
    ema: WeightAverage | None
    val_available: bool
    wall_start: float
    steps_done: int = 0
    last_ckpt_step: int = 0  # the step last.pt holds
    last_ckpt: Path | None = None  # written by this call
    best: dict | None = None  # {"metric", "value", "step", "metrics"} of the best evaluation
    best_ckpt: Path | None = None
    best_metrics: dict = field(default_factory=dict)
    final_metrics: dict = field(default_factory=dict)
    val_gt: Any = None  # the val split's ground truth, loaded by the first evaluation


def checkpoint_payload(run: RunState, step: int, *, resumable: bool) -> dict:
    """What a checkpoint holds (see :mod:`angioexp.checkpoints`); best.pt is not ``resumable``:
    it keeps no optimizer state, RNG or raw weights."""
    payload = {"model": run.kept_model.state_dict(), "optimizer": run.optimizer.state_dict() if resumable else {},
               "step": step, "guard": run.guard.state_dict(), "best": run.best, "config": to_dict(run.cfg)}
    if resumable:
        payload["rng"] = rng_state()
        if run.ema is not None:
            payload.update(raw_model=run.model.state_dict(), ema_updates=run.ema.updates)
    return payload


def checkpoint(run: RunState) -> None:
    """Rank 0 writes ``last.pt`` for the steps done so far."""
    if run.dist.is_main:
        last = run.out_dir / "checkpoints" / "last.pt"
        try:
            run.last_ckpt = save_checkpoint(last, checkpoint_payload(run, run.steps_done, resumable=True))
        except OutputError as exc:
            if not last.is_file():
                raise
            raise OutputError(f"{exc}; the checkpoint of step {run.last_ckpt_step} is intact — free space, then "
                              f"`angioexp train --resume {run.out_dir}` continues from it") from None
        run.callbacks.on_checkpoint(run.steps_done, run.last_ckpt)
    run.last_ckpt_step = run.steps_done


def evaluate(run: RunState) -> None:
    """Rank 0 scores the val split; a better primary metric writes best.pt."""
    if not run.val_available:
        return
    cfg, step = run.cfg, run.steps_done
    if run.dist.is_main:
        from angioexp.train.inference import evaluate_split

        metrics, artifacts, run.val_gt = evaluate_split(
            run.kept_model, run.coco_dir, cfg.data.val_split, cfg=cfg, out_dir=run.out_dir / "eval" / f"step_{step}",
            device=str(run.device), gt=run.val_gt, max_images=cfg.data.max_val_images,
        )
        run.model.train()
        run.final_metrics = metrics
        primary = metrics.get(cfg.tracking.primary_metric)
        if is_better(primary, (run.best or {}).get("value"), cfg.tracking.primary_mode):
            run.best = {"metric": cfg.tracking.primary_metric, "value": float(primary), "step": step,
                        "metrics": {k: float(v) for k, v in metrics.items()}}
            run.best_metrics = metrics
            run.best_ckpt = save_checkpoint(run.out_dir / "checkpoints" / "best.pt", checkpoint_payload(run, step, resumable=False))
        log.info("step %d: %s", step, ", ".join(
            f"{k[4:]} {metrics[k]:.3f}" for k in ("val/AP75", "val/AP75_tol", "val/dice", "val/cldice") if k in metrics))
        run.callbacks.on_eval_end(step, metrics, artifacts)  # may raise optuna.TrialPruned
    ddp.barrier()


def result(run: RunState, reason: str, **flags) -> TrainResult:
    return TrainResult(
        out_dir=run.out_dir, steps=run.steps_done, final_metrics=run.final_metrics, best_metrics=run.best_metrics,
        checkpoint=run.last_ckpt, best_checkpoint=run.best_ckpt, nan_events=run.guard.events, restores=run.guard.restores,
        stopped_reason=reason, wall_seconds=time.perf_counter() - run.wall_start,
        history=[e.__dict__ for e in run.guard.history], **flags,
    )


def resume(resume_from, cfg, model, optimizer, guard: NanGuard) -> tuple[int, dict | None, WeightAverage | None]:
    """Load a run's ``last.pt`` (or the checkpoint given) for an exact continuation; returns the
    step to continue from, the best evaluation so far and the weight average (``train.ema_decay``)."""
    ckpt_path = resolve_resume(resume_from)
    payload = load_training_checkpoint(ckpt_path)
    try:
        model.load_state_dict(payload.get("raw_model", payload["model"]))
        optimizer.load_state_dict(payload["optimizer"])
        ema = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        if ema is not None and "raw_model" in payload:  # resuming an averaged run: its average goes on
            ema.restore(payload["model"], payload.get("ema_updates", 0))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"checkpoint does not fit this model/config: {exc}", file=ckpt_path, key="--resume") from None
    guard.load_state_dict(payload.get("guard", {}))
    set_rng_state(payload.get("rng", {}))
    log.info("resuming from %s at step %d", ckpt_path, int(payload["step"]))
    return int(payload["step"]), payload.get("best"), ema


def _restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)


def _nonfinite_terms(losses: dict) -> str:
    bad = sorted(k for k, v in losses.items() if k != "loss" and not torch.isfinite(torch.as_tensor(v)).all())
    return "non-finite: " + (", ".join(bad) or "loss")


def _is_pruned(exc: BaseException) -> bool:
    # optuna.TrialPruned without importing optuna into the training loop
    return type(exc).__name__ == "TrialPruned"


def _stopped(run: RunState, exc: BaseException) -> None:
    """A pruned run or a stop signal (Ctrl-C, SIGTERM) keeps its finished steps for ``--resume``."""
    if _is_pruned(exc) or isinstance(exc, KeyboardInterrupt):
        if run.last_ckpt_step != run.steps_done:
            checkpoint(run)
    if _is_pruned(exc):
        run.callbacks.on_train_end(result(run, "pruned", pruned=True))
    if isinstance(exc, KeyboardInterrupt) and run.dist.is_main and (run.out_dir / "checkpoints" / "last.pt").is_file():
        exc.args = (f"stopped after step {run.steps_done}, checkpoint kept; `angioexp train --resume {run.out_dir}` continues",)


def train(cfg, *, coco_dir, callbacks=(), resume_from=None, init_checkpoint=None, criterion=None) -> TrainResult:
    """Train the core model as configured on the prepared COCO folder ``coco_dir``; returns a
    :class:`TrainResult`.

    ``resume_from``: a run folder or checkpoint — continues exactly where it stopped (same
    batches, same RNG, same optimizer state). ``init_checkpoint``: starting weights file (Stage 2
    from Stage 1), loaded with a report. ``criterion``: ``(outputs, targets) -> {"loss", …}``;
    default :func:`angioexp.losses.build_criterion` (SAM3's objective).
    Raises TrainingDiverged when the NaN guard gives up, and re-raises a pruning exception
    from a callback after writing a checkpoint.
    """
    from angioexp.model.build import build_model, resolved_num_views
    from angioexp.train.data import TrainingSet

    # -- set-up: device, data, model, optimizer, guard, resume --------------------------------
    wall_start = time.perf_counter()
    device = torch.device(resolve_device(cfg.train.device))
    dist = ddp.setup(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed * 1000 + dist.rank)  # the losses' point sampling draws from it

    out_dir = Path(cfg.train.out_dir)
    coco_dir = Path(coco_dir)
    data = TrainingSet(coco_dir, cfg, num_views=resolved_num_views(cfg))
    val_available = (coco_dir / cfg.data.val_split / "annotations.json").is_file()
    if not val_available:
        log.warning("no %s split in %s: training without evaluation", cfg.data.val_split, coco_dir)

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    guard = NanGuard(cfg.nan_guard, model, optimizer)
    if criterion is None:
        from angioexp.losses import build_criterion

        criterion = build_criterion(cfg).to(device)

    start_step, best, init_report = 0, None, None
    if resume_from is not None:
        start_step, best, ema = resume(resume_from, cfg, model, optimizer, guard)
    else:
        init_report = load_init_weights(model, cfg, init_checkpoint)
        ema = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None

    train_model = model
    if dist.enabled:
        # Text-only prompts leave the point/box encoders unused in a step: DDP must know.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    use_amp = device.type == "cuda" and cfg.optim.amp.enabled
    dtype = amp_dtype(cfg.optim.amp.amp_dtype)
    max_steps = cfg.train.max_steps
    schedule = InverseSquareRoot.from_config(cfg.scratch, max_steps)
    max_norm = cfg.optim.gradient_clip.max_norm
    budget_s = cfg.train.budget_minutes * 60 if cfg.train.budget_minutes else None

    run = RunState(
        cfg=cfg, out_dir=out_dir, coco_dir=coco_dir, device=device, dist=dist,
        callbacks=CallbackList(callbacks if dist.is_main else ()), model=model,
        kept_model=ema.module if ema is not None else model, optimizer=optimizer, guard=guard, ema=ema,
        val_available=val_available, wall_start=wall_start, steps_done=start_step, last_ckpt_step=start_step,
        best=best, best_metrics=(best or {}).get("metrics", {}),
        best_ckpt=out_dir / "checkpoints" / "best.pt" if best else None,
    )
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_dir / "config.yaml", "w", encoding="utf-8") as handle:
            handle.write(dump_yaml(cfg))
    run.callbacks.on_train_start(RunInfo(
        config=cfg, out_dir=out_dir, start_step=start_step, max_steps=max_steps, model=model, coco_dir=coco_dir,
        extra={"init_report": init_report, "world_size": dist.world_size, "device": str(device)},
    ))

    # -- the loop ---------------------------------------------------------------------------
    window: dict[str, float] = defaultdict(float)  # train/* sums since the last log line
    window_steps, window_images, window_time = 0, 0, 0.0
    bar = tqdm(total=max_steps, initial=start_step, desc=f"stage {cfg.stage} core", disable=not dist.is_main, dynamic_ncols=True)
    model.train()
    reason = "max_steps"
    loop_start = time.perf_counter()
    try:
        for step in range(start_step, max_steps):
            # a stop signal (Ctrl-C, SIGTERM) waits for the step to complete: the checkpoint
            # written on the way out must hold the weights of a whole number of steps
            with step_boundary():
                t0 = time.perf_counter()
                if budget_s is not None and step - start_step >= BUDGET_PACE_STEPS:
                    # Plan warm-up/cool-down for the steps the budget allows, at the pace so far
                    # (evaluations included), not for max_steps the budget will never reach.
                    pace = (t0 - loop_start) / (step - start_step)
                    schedule = schedule.fitted(step, pace, budget_s - (t0 - wall_start), max_steps)
                set_learning_rates(optimizer, schedule.factor(step) * guard.lr_factor)
                batch = data.batch(step, dist.rank, dist.world_size).to(device)
                # BatchNorm updates its running statistics in the forward pass: keep them to undo a
                # bad step (a NaN batch would otherwise poison every later evaluation). A few KB.
                saved_buffers = [b.detach().clone() for b in model.buffers()]
                with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                    outputs = train_model(batch.images, batch.queries)
                losses = criterion(outputs, batch.targets)
                loss = losses["loss"]
                grad_norm = None
                problem = guard.check_loss(loss, device)  # None, or (kind, detail)
                if problem is None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        model.parameters(), max_norm if max_norm else float("inf"), norm_type=cfg.optim.gradient_clip.norm_type)
                    if not guard.finite(grad_norm, device):
                        problem, grad_norm = ("grad", f"grad norm {float(grad_norm)}"), None
                elif problem[0] == "loss":
                    problem = ("loss", _nonfinite_terms(losses))
                if problem is not None:  # the bad step: skipped (or, K in a row, restored)
                    _restore_buffers(model, saved_buffers)
                    event = guard.bad_step(step, problem[0], detail=problem[1])
                    run.callbacks.on_nan_event(step, event.__dict__)
                else:
                    optimizer.step()
                    guard.good_step(step)
                    if ema is not None:
                        ema.update(model)
                run.steps_done = step + 1
                bar.update(1)

            # -- bookkeeping (skipped steps still count: the data and schedule moved on) ---------
            steps_done = run.steps_done
            if grad_norm is not None:
                for k, v in losses.items():
                    window[k] += float(v.detach()) if torch.is_tensor(v) else float(v)
                window["grad_norm"] += float(grad_norm)
                window_steps += 1
                window_images += batch.images.shape[0] * dist.world_size
                window_time += time.perf_counter() - t0
            if (steps_done % cfg.train.log_every == 0 or steps_done == max_steps) and window_steps:
                metrics = {("train/loss" if k == "loss" else f"train/{k}"): v / window_steps for k, v in window.items()}
                metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                metrics["train/images_per_s"] = window_images / window_time if window_time > 0 else float("nan")
                metrics.update(guard.metrics())
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}")
                run.callbacks.on_step_end(steps_done, metrics)
                if dist.is_main:
                    with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"step": steps_done, **metrics}) + "\n")
                window.clear()
                window_steps, window_images, window_time = 0, 0, 0.0

            over_budget = budget_s is not None and (time.perf_counter() - wall_start) > budget_s
            if ddp.broadcast_flag(over_budget, device) and steps_done < max_steps:
                reason = "budget"
                log.info("time budget of %g min reached at step %d", cfg.train.budget_minutes, steps_done)
            final_step = steps_done == max_steps or reason == "budget"
            evaluate_now = steps_done % cfg.train.eval_every == 0 or final_step
            checkpoint_now = steps_done % cfg.train.checkpoint_every == 0 or final_step
            if evaluate_now or steps_done % cfg.train.checkpoint_every == 0:
                ddp.broadcast_buffers(model)  # all ranks hold rank 0's BatchNorm statistics
            if evaluate_now:
                evaluate(run)
            if checkpoint_now:
                checkpoint(run)
            if reason == "budget":
                break
    except TrainingDiverged:
        run.callbacks.on_train_end(result(run, "diverged", diverged=True))
        raise
    except BaseException as exc:
        _stopped(run, exc)
        raise
    else:
        final = result(run, reason)
        run.callbacks.on_train_end(final)
        return final
    finally:
        bar.close()
        dist.close()
