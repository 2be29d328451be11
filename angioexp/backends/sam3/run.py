"""``angioexp train --backend sam3``: SAM3's own trainer, driven by the angioexp config.

    result = train_sam3(cfg, args, callbacks=[...], run_id=mlflow_run_id)

1. resolve the data (``cfg.data`` → COCO folder) and the init weights (``init_from`` or
   ``sam3.checkpoint``; ``models:/…`` is downloaded here, so a missing model fails before any
   training);
2. write the SAM3 Hydra config (:mod:`.config_gen`) under ``<out>/sam3_config/``;
3. run SAM3's trainer in a subprocess (:mod:`.launch`); its scalars stream into the MLflow run
   ``run_id`` while it trains (:mod:`.writer`);
4. forward its events to the callbacks: ``on_train_start`` (with the init load report),
   ``on_step_end``, ``on_nan_event``, ``on_eval_end`` (val metrics = SAM3's COCO AP + angioexp's
   vessel metrics on the same predictions; a callback may raise ``optuna.TrialPruned``, which
   stops the trainer), ``on_checkpoint``, ``on_train_end``;
5. return a :class:`~angioexp.train.callbacks.TrainResult` whose ``checkpoint`` is SAM3's
   ``checkpoints/checkpoint.pt`` (model state under ``"model"``, plus optimizer: ~10 GB) and
   whose ``best_checkpoint`` is the exported model-only weights (``model_weights.pt``) a
   LoggedModel should carry. SAM3's trainer keeps only its last checkpoint, so "best" is the
   last state and ``best_metrics`` are the last evaluation's.

``RunInfo.extra["metrics_logged_by_backend"]`` is True when ``run_id`` is given: metrics are
already in MLflow, so an MLflow callback should log artifacts/params only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from angioexp.config import Config
from angioexp.errors import CheckpointLoadError, ConfigError, InputError, TrainingDiverged
from angioexp.train.callbacks import Callback, CallbackList, EvalArtifacts, RunInfo, TrainResult
from angioexp.train.device import resolve_device

log = logging.getLogger(__name__)

# Computed by SAM3's own evaluator (logged as val/AP, val/AP50, val/AP75 by the writer).
_SAM3_COCO_KEYS = ("AP", "AP50", "AP75")


def init_source(cfg: Config, args) -> str | None:
    """The weights to start from: --init-from, else ``init_from``, else ``sam3.checkpoint``."""
    source = getattr(args, "init_from", None) or cfg.init_from or cfg.sam3.checkpoint
    if source and str(source).strip().lower() in ("none", "scratch", ""):
        return None
    return source


def local_checkpoint(source: str | None) -> str | None:
    """A local file for ``source`` (``models:/`` and ``runs:/`` URIs downloaded via MLflow)."""
    if source is None:
        return None
    from angioexp.backends.sam3.weights import resolve_checkpoint

    path = resolve_checkpoint(source)
    if not path.is_file():
        raise InputError("checkpoint not found", file=path, key="sam3.checkpoint")
    return str(path)


def output_dir(cfg: Config, args) -> Path:
    resume = getattr(args, "resume", None)
    if resume:
        if not Path(resume).is_dir():
            raise InputError(f"--resume {resume}: the sam3 backend resumes from a run folder "
                             "(<out> with sam3/checkpoints/checkpoint.pt); MLflow run ids are resolved by tracking")
        return Path(resume)  # SAM3's trainer resumes from <out>/sam3/checkpoints/checkpoint.pt
    out = getattr(args, "out", None)
    if out:
        return Path(out)
    name = cfg.tracking.run_name or f"sam3-stage{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name


def train_sam3(
    cfg: Config,
    args=None,
    *,
    callbacks: Iterable[Callback] = (),
    run_id: str | None = None,
    coco_dir: str | Path | None = None,
    loss_hook: str | None = None,
    timeout_seconds: float | None = None,
    save_checkpoints: bool = True,
) -> TrainResult:
    """Train with SAM3's trainer; see the module docstring. ``args`` may be None or an argparse
    namespace with any of ``out``, ``resume``, ``init_from``, ``coco_dir``, ``max_steps``.
    ``loss_hook`` (tests: NaN injection) and ``save_checkpoints=False`` (timing runs) are for tools."""
    from angioexp.backends.sam3 import SAM3_MISSING, check_sam3_version, sam3_available

    if not sam3_available():
        raise InputError(SAM3_MISSING, key="backend")
    check_sam3_version()
    from angioexp.backends.sam3 import config_gen
    from angioexp.backends.sam3.launch import launch

    started = time.monotonic()
    callbacks = CallbackList(list(callbacks) + list(getattr(args, "callbacks", None) or []))
    if getattr(args, "max_steps", None):
        cfg.train.max_steps = int(args.max_steps)
    run_id = run_id or getattr(args, "run_id", None) or os.environ.get("MLFLOW_RUN_ID")
    device = resolve_device(cfg.train.device)
    coco_dir = Path(coco_dir or getattr(args, "coco_dir", None) or _prepare(cfg))
    out_dir = output_dir(cfg, args).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = local_checkpoint(init_source(cfg, args))
    tracking_uri = None
    if run_id:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    config_path = config_gen.generate(
        cfg, coco_dir=coco_dir, out_dir=out_dir, device=device, run_id=run_id,
        tracking_uri=tracking_uri, checkpoint=checkpoint, loss_hook=loss_hook, save_checkpoints=save_checkpoints,
    )
    composed = config_gen.compose(config_path)  # fail here, not in the child, on a bad config
    steps_per_epoch = int(composed.scratch.steps_per_epoch)
    max_steps = steps_per_epoch * int(composed.trainer.max_epochs)
    val_ann = Path(composed.trainer.data.val.dataset.ann_file)
    val_images = val_ann.parent / "images"  # angioexp.evaluate resolves file_name under it
    log.info("SAM3 config: %s (%d epochs × %d steps, %s)", config_path, composed.trainer.max_epochs, steps_per_epoch, device)

    state = _RunState(cfg, out_dir, coco_dir, max_steps, config_path, run_id, tracking_uri, val_ann, val_images)

    def on_event(event: dict) -> None:
        state.handle(event, callbacks)

    threads = {"OMP_NUM_THREADS": str(cfg.train.threads)} if cfg.train.threads else None  # torch reads it at start
    result = launch(config_path, out_dir, on_event=on_event, num_gpus=cfg.sam3.num_gpus if device.startswith("cuda") else 1,
                    timeout_seconds=timeout_seconds, env=threads)
    status = result.status
    if status.get("status") == "error" and not state.started:
        raise _child_error(status, result)  # e.g. a checkpoint that does not fit: nothing started
    if not state.started:
        state.start(callbacks, None)
    ckpt = out_dir / "sam3" / "checkpoints" / "checkpoint.pt"
    last_step = state.last_step
    weights = None
    if ckpt.exists() and status.get("status") == "ok":
        from angioexp.backends.sam3.weights import export_model_state

        weights = export_model_state(ckpt, out_dir / "model_weights.pt")
        callbacks.on_checkpoint(last_step, ckpt)
    train_result = TrainResult(
        out_dir=out_dir,
        steps=last_step,
        final_metrics=state.final_metrics,
        # SAM3's trainer keeps the last checkpoint only, so the weights handed on are the last
        # ones and their metrics are the last evaluation's.
        best_metrics=state.final_metrics,
        checkpoint=ckpt if ckpt.exists() else None,
        best_checkpoint=weights,
        nan_events=state.nan_events,
        restores=state.restores,
        diverged=status.get("status") == "diverged",
        pruned=_is_pruned(result.stopped_by_callback),
        stopped_reason=_reason(status, result.stopped_by_callback),
        wall_seconds=time.monotonic() - started,
        history=state.nan_history,
    )
    if result.stopped_by_callback is not None:
        callbacks.on_train_end(train_result)
        raise result.stopped_by_callback
    if status.get("status") == "diverged":
        callbacks.on_train_end(train_result)
        raise TrainingDiverged(status.get("message", "training diverged"), step=int(status.get("step", last_step)),
                               lr=float(status.get("lr", math.nan)), events=int(status.get("events", 0)),
                               history=status.get("history"))
    if status.get("status") != "ok":
        raise _child_error(status, result)
    callbacks.on_train_end(train_result)
    return train_result


class _RunState:
    """What the parent learns from the child's events."""

    def __init__(self, cfg, out_dir, coco_dir, max_steps, config_path, run_id, tracking_uri, val_ann, val_images):
        self.cfg, self.out_dir, self.coco_dir = cfg, out_dir, coco_dir
        self.max_steps, self.config_path = max_steps, config_path
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.val_ann, self.val_images = val_ann, val_images
        self.started = False
        self.last_step = 0
        self.final_metrics: dict[str, float] = {}
        self.nan_events = 0
        self.restores = 0
        self.nan_history: list[dict] = []
        self._gt = None

    def start(self, callbacks, event: dict | None) -> None:
        self.started = True
        extra = {"backend": "sam3", "sam3_config": str(self.config_path),
                 "metrics_logged_by_backend": self.run_id is not None}
        if event and event.get("report"):
            from angioexp.checkpoints import LoadReport

            fields = {k: v for k, v in event["report"].items() if k != "loaded_fraction"}
            extra["init_report"] = LoadReport(**fields)
        if event:
            extra["parameters"] = event.get("parameters")
        callbacks.on_train_start(RunInfo(config=self.cfg, out_dir=self.out_dir, start_step=0,
                                         max_steps=self.max_steps, coco_dir=self.coco_dir, extra=extra))

    def handle(self, event: dict, callbacks) -> None:
        kind = event.get("kind")
        if kind == "init":
            self.start(callbacks, event)
            return
        if not self.started:
            self.start(callbacks, None)
        step = int(event.get("step", self.last_step))
        if kind == "end":
            self.last_step = step
        elif kind == "train":
            self.last_step = max(self.last_step, step + 1)
            callbacks.on_step_end(step, event["metrics"])
        elif kind == "nan":
            info = event.get("event", {})
            self.nan_events += 1
            self.restores += info.get("action") == "restore"
            self.nan_history.append(info)
            callbacks.on_nan_event(step, info)
        elif kind == "val":
            metrics = dict(event["metrics"])
            artifacts = EvalArtifacts()
            metrics.update(self._vessel_metrics(step, artifacts))
            self.final_metrics = metrics
            callbacks.on_eval_end(step, metrics, artifacts)

    def _vessel_metrics(self, step: int, artifacts: EvalArtifacts) -> dict[str, float]:
        """angioexp's vessel metrics (tolerant AP, Dice, clDice, BIoU) on SAM3's val predictions."""
        source = self.out_dir / "predictions" / "coco_predictions_segm.json"
        if not source.exists():
            return {}
        from angioexp.evaluate.evaluator import evaluate_predictions, load_ground_truth

        eval_dir = self.out_dir / "eval" / f"step_{step}"
        eval_dir.mkdir(parents=True, exist_ok=True)
        predictions_json = eval_dir / "predictions.json"
        shutil.copyfile(source, predictions_json)
        try:
            if self._gt is None:
                self._gt = load_ground_truth(self.val_ann)
            predictions = json.loads(predictions_json.read_text(encoding="utf-8"))
            result = evaluate_predictions(
                self._gt, predictions, tolerance_px=self.cfg.eval.tolerance_px,
                score_threshold=self.cfg.eval.score_threshold, overlays_dir=eval_dir / "overlays",
                images_dir=self.val_images, max_overlays=self.cfg.eval.overlays, predictions_file=predictions_json,
            )
            result.write(eval_dir)
        except Exception:  # noqa: BLE001 - SAM3's own AP is still reported
            log.exception("angioexp evaluation of step %d failed", step)
            return {}
        artifacts.metrics_json = eval_dir / "metrics.json"
        artifacts.per_image_csv = eval_dir / "per_image.csv"
        artifacts.overlays_dir = eval_dir / "overlays"
        artifacts.predictions_json = predictions_json
        metrics = {f"val/{k}": float(v) for k, v in result.metrics.items()
                   if k not in _SAM3_COCO_KEYS and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.run_id and metrics:
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            MlflowClient(tracking_uri=self.tracking_uri).log_batch(
                self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], synchronous=True)
        return metrics


def _prepare(cfg: Config) -> Path:
    from angioexp.data.prepare import prepare

    return prepare(cfg.data, cfg.stage)


def _is_pruned(exc: BaseException | None) -> bool:
    return exc is not None and type(exc).__name__ == "TrialPruned"


def _reason(status: dict, stopped: BaseException | None) -> str:
    if _is_pruned(stopped):
        return "pruned"
    if status.get("status") == "diverged":
        return "diverged"
    return "max_steps"


def _child_error(status: dict, result) -> Exception:
    kind, message = status.get("error_type", "Error"), status.get("message", "")
    if kind == "CheckpointLoadError":
        from angioexp.checkpoints import LoadReport

        report = status.get("report")
        if report:
            report = LoadReport(**{k: v for k, v in report.items() if k != "loaded_fraction"})
        return CheckpointLoadError(message, report)
    if kind in ("ConfigError", "InputError"):
        return (ConfigError if kind == "ConfigError" else InputError)(message)
    tail = result.log_tail(30)
    return RuntimeError(f"SAM3 training failed ({kind}: {message})\n--- last lines of {result.log_path} ---\n{tail}")
