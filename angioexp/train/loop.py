"""``train(cfg)``: the core backend's training loop — flat and readable, nanoGPT-style.

    for step in range(start, max_steps):
        lr      = base_lr(group) · InverseSquareRoot(step) · guard.lr_factor
        batch   = data.batch(step)                      # keyed by (seed, step): exact resume
        loss    = criterion(model(batch))               # bf16 autocast on CUDA, losses in fp32
        if loss not finite or exploded: guard.bad_step → skip (K in a row: restore + LR backoff)
        backward, clip grad norm
        if grad norm not finite: guard.bad_step
        optimizer.step; guard.good_step; ema.update   # evaluations score the EMA weights
        log / evaluate / checkpoint / stop on the time budget

Everything the outside world sees goes through :mod:`angioexp.train.callbacks` (MLflow and
Optuna live elsewhere). Evaluations write ``out_dir/eval/step_N/`` (metrics.json,
per_image.csv, per_category.csv, predictions.json, overlays/); checkpoints go to
``out_dir/checkpoints/{last,best}.pt`` atomically. With ``train.ema_decay`` set, a checkpoint's
``model`` holds the averaged weights (what was evaluated; what Stage 2, the registry and
``evaluate`` load) and ``raw_model`` the optimizer's own, which only ``--resume`` reads.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from angioexp.config import dump_yaml, to_dict
from angioexp.errors import InputError, OutputError, TrainingDiverged
from angioexp.fileio import atomic_file
from angioexp.train import ddp
from angioexp.train.callbacks import CallbackList, RunInfo, TrainResult
from angioexp.train.checkpoint import load_training_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from angioexp.train.ema import WeightAverage
from angioexp.train.nan_guard import NanGuard
from angioexp.train.optim import build_optimizer, set_learning_rates
from angioexp.train.schedule import InverseSquareRoot
from angioexp.train.signals import step_boundary

log = logging.getLogger(__name__)
BUDGET_PACE_STEPS = 5  # steps timed before a time budget re-plans the LR schedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine", key="train.device")
    return device


def resolve_coco_dir(cfg, coco_dir) -> Path:
    """``coco_dir`` as given (the caller prepared and checked it), else the config's data through
    :func:`angioexp.pipeline.prepare`, which also refuses a folder converted for the other stage."""
    if coco_dir is not None:
        return Path(coco_dir)
    from angioexp.pipeline import prepare  # synthetic default (or an index.csv), cached by digest

    return Path(prepare(cfg.data, cfg.stage))


def load_init_weights(model, cfg, init_checkpoint):
    """Initial weights from ``init_checkpoint`` (a file) or ``cfg.init_from`` (file or URI);
    the load report fails the run (CheckpointLoadError) before any step when too little fits."""
    from angioexp.checkpoints import extract_state_dict, load_state_with_report, read_checkpoint

    source = init_checkpoint or cfg.init_from
    if not source:
        return None
    path = Path(str(source)).expanduser()
    if not path.is_file():
        from angioexp.tracking.models import resolve_model  # models:/…, runs:/…, run folders

        path = resolve_model(str(source)).weights
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


def _restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)


def _is_pruned(exc: BaseException) -> bool:
    # optuna.TrialPruned without importing optuna into the training loop
    return type(exc).__name__ == "TrialPruned"


def _better(value: float, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def train(cfg, *, callbacks=(), coco_dir=None, resume_from=None, init_checkpoint=None, criterion=None) -> TrainResult:
    """Train the core model as configured; returns a :class:`TrainResult`.

    ``resume_from``: a run folder or checkpoint — continues exactly where it stopped (same
    batches, same RNG, same optimizer state). ``init_checkpoint``: starting weights (Stage 2
    from Stage 1), loaded with a report. ``criterion``: ``(outputs, targets) -> {"loss", …}``;
    default :func:`angioexp.losses.build_criterion` (SAM3's objective).
    Raises TrainingDiverged when the NaN guard gives up, and re-raises a pruning exception
    from a callback after writing a checkpoint.
    """
    from angioexp.model.build import build_model, resolved_num_views
    from angioexp.train.data import TrainingSet

    wall_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
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
    cbs = CallbackList(callbacks if dist.is_main else ())
    coco_dir = resolve_coco_dir(cfg, coco_dir)
    num_views = resolved_num_views(cfg)
    data = TrainingSet(coco_dir, cfg, num_views=num_views)
    val_available = (coco_dir / cfg.data.val_split / "annotations.json").is_file()
    if not val_available:
        log.warning("no %s split in %s: training without evaluation", cfg.data.val_split, coco_dir)

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    guard = NanGuard(cfg.nan_guard, model, optimizer)
    if criterion is None:
        from angioexp.losses import build_criterion

        criterion = build_criterion(cfg).to(device)

    start_step, best, init_report, payload = 0, None, None, {}
    if resume_from is not None:
        ckpt_path = resolve_resume(resume_from)
        payload = load_training_checkpoint(ckpt_path)
        try:
            model.load_state_dict(payload.get("raw_model", payload["model"]))
            optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"checkpoint does not fit this model/config: {exc}", file=ckpt_path, key="--resume") from None
        guard.load_state_dict(payload.get("guard", {}))
        set_rng_state(payload.get("rng", {}))
        start_step = int(payload["step"])
        best = payload.get("best")
        log.info("resuming from %s at step %d", ckpt_path, start_step)
    else:
        init_report = load_init_weights(model, cfg, init_checkpoint)
    ema = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if ema is not None and "raw_model" in payload:  # resuming an averaged run: its average goes on
        try:
            ema.restore(payload["model"], payload.get("ema_updates", 0))
        except RuntimeError as exc:
            raise InputError(f"checkpoint does not fit this model/config: {exc}", file=ckpt_path, key="--resume") from None
    # The network evaluations score and checkpoints hand on.
    kept_model = ema.module if ema is not None else model

    train_model = model
    if dist.enabled:
        # Text-only prompts leave the point/box encoders unused in a step: DDP must know.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    use_amp = device.type == "cuda" and cfg.optim.amp.enabled
    amp_dtype = torch.bfloat16 if cfg.optim.amp.amp_dtype == "bfloat16" else torch.float16
    max_steps = cfg.train.max_steps
    schedule = InverseSquareRoot.from_config(cfg.scratch, max_steps)
    max_norm = cfg.optim.gradient_clip.max_norm
    budget_s = cfg.train.budget_minutes * 60 if cfg.train.budget_minutes else None

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_dir / "config.yaml", "w", encoding="utf-8") as handle:
            handle.write(dump_yaml(cfg))
    cbs.on_train_start(RunInfo(
        config=cfg, out_dir=out_dir, start_step=start_step, max_steps=max_steps, model=model, coco_dir=coco_dir,
        extra={"init_report": init_report, "world_size": dist.world_size, "device": str(device)},
    ))

    state = {"final": {}, "best_metrics": (best or {}).get("metrics", {}), "gt": None, "last_ckpt": None,
             "best_ckpt": out_dir / "checkpoints" / "best.pt" if best else None, "best": best}

    def checkpoint(step_done: int) -> Path | None:
        if not dist.is_main:
            return None
        payload = {
            "model": kept_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step_done,
            "guard": guard.state_dict(), "rng": rng_state(), "best": state["best"], "config": to_dict(cfg),
        }
        if ema is not None:
            payload.update(raw_model=model.state_dict(), ema_updates=ema.updates)
        try:
            path = save_checkpoint(out_dir / "checkpoints" / "last.pt", payload)
        except OutputError as exc:
            if not (out_dir / "checkpoints" / "last.pt").is_file():
                raise
            raise OutputError(f"{exc}; the checkpoint of step {last_ckpt} is intact — free space, then "
                              f"`angioexp train --resume {out_dir}` continues from it") from None
        cbs.on_checkpoint(step_done, path)
        return path

    def evaluate(step_done: int) -> None:
        """Rank 0 scores the val split; a better primary metric writes best.pt."""
        if not val_available:
            return
        if dist.is_main:
            from angioexp.train.inference import evaluate_split

            eval_dir = out_dir / "eval" / f"step_{step_done}"
            metrics, artifacts, state["gt"] = evaluate_split(
                kept_model, coco_dir, cfg.data.val_split, cfg=cfg, out_dir=eval_dir, device=str(device),
                gt=state["gt"], max_images=cfg.data.max_val_images,
            )
            model.train()
            state["final"] = metrics
            primary = metrics.get(cfg.tracking.primary_metric)
            if _better(primary, (state["best"] or {}).get("value"), cfg.tracking.primary_mode):
                state["best"] = {"metric": cfg.tracking.primary_metric, "value": float(primary), "step": step_done,
                                 "metrics": {k: float(v) for k, v in metrics.items()}}
                state["best_metrics"] = metrics
                state["best_ckpt"] = save_checkpoint(out_dir / "checkpoints" / "best.pt", {
                    "model": kept_model.state_dict(), "optimizer": {}, "step": step_done, "guard": guard.state_dict(),
                    "best": state["best"], "config": to_dict(cfg),
                })
            log.info("step %d: %s", step_done, ", ".join(
                f"{k[4:]} {metrics[k]:.3f}" for k in ("val/AP75", "val/AP75_tol", "val/dice", "val/cldice") if k in metrics))
            cbs.on_eval_end(step_done, metrics, artifacts)  # may raise optuna.TrialPruned
        ddp.barrier()

    def result(reason: str, steps: int, **flags) -> TrainResult:
        return TrainResult(
            out_dir=out_dir, steps=steps, final_metrics=state["final"], best_metrics=state["best_metrics"],
            checkpoint=state["last_ckpt"], best_checkpoint=state["best_ckpt"], nan_events=guard.events,
            restores=guard.restores, stopped_reason=reason, wall_seconds=time.perf_counter() - wall_start,
            history=[e.__dict__ for e in guard.history], **flags,
        )

    window: dict[str, float] = defaultdict(float)
    window_steps, window_images, window_time = 0, 0, 0.0
    bar = tqdm(total=max_steps, initial=start_step, desc=f"stage {cfg.stage} core", disable=not dist.is_main, dynamic_ncols=True)
    model.train()
    steps_done = start_step
    reason = "max_steps"
    last_ckpt = start_step
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
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    outputs = train_model(batch.images, batch.queries)
                losses = criterion(outputs, batch.targets)
                loss = losses["loss"]
                grad_norm = None
                problem = guard.check_loss(loss, device)
                if problem is not None:
                    kind, detail = problem
                    if kind == "loss":
                        bad = sorted(k for k, v in losses.items() if k != "loss" and not torch.isfinite(torch.as_tensor(v)).all())
                        detail = "non-finite: " + (", ".join(bad) or "loss")
                    _restore_buffers(model, saved_buffers)
                    event = guard.bad_step(step, kind, detail=detail)
                    cbs.on_nan_event(step, event.__dict__)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        model.parameters(), max_norm if max_norm else float("inf"), norm_type=cfg.optim.gradient_clip.norm_type)
                    if not guard.finite(grad_norm, device):
                        _restore_buffers(model, saved_buffers)
                        event = guard.bad_step(step, "grad", detail=f"grad norm {float(grad_norm)}")
                        cbs.on_nan_event(step, event.__dict__)
                        grad_norm = None
                    else:
                        optimizer.step()
                        guard.good_step(step)
                        if ema is not None:
                            ema.update(model)
                steps_done = step + 1
                bar.update(1)

            # -- bookkeeping (skipped steps still count: the data and schedule moved on) ---------
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
                cbs.on_step_end(steps_done, metrics)
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
            if evaluate_now or steps_done % cfg.train.checkpoint_every == 0:
                ddp.broadcast_buffers(model)  # all ranks hold rank 0's BatchNorm statistics
            if evaluate_now:
                evaluate(steps_done)
            if steps_done % cfg.train.checkpoint_every == 0 or final_step:
                state["last_ckpt"] = checkpoint(steps_done)
                last_ckpt = steps_done
            if reason == "budget":
                break
    except TrainingDiverged:
        bar.close()
        cbs.on_train_end(result("diverged", steps_done, diverged=True))
        dist.close()
        raise
    except BaseException as exc:
        bar.close()
        if _is_pruned(exc):
            if last_ckpt != steps_done:
                state["last_ckpt"] = checkpoint(steps_done)
            cbs.on_train_end(result("pruned", steps_done, pruned=True))
        elif isinstance(exc, KeyboardInterrupt) and last_ckpt != steps_done:
            # Ctrl-C / SIGTERM: keep the finished steps so that --resume continues from here
            checkpoint(steps_done)
        if isinstance(exc, KeyboardInterrupt) and dist.is_main and (out_dir / "checkpoints" / "last.pt").is_file():
            exc.args = (f"stopped after step {steps_done}, checkpoint kept; `angioexp train --resume {out_dir}` continues",)
        dist.close()
        raise
    bar.close()
    final = result(reason, steps_done)
    cbs.on_train_end(final)
    dist.close()
    return final
