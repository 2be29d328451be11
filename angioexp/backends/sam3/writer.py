"""A drop-in for SAM3's ``logging.tensorboard_writer`` that streams scalars into MLflow live.

SAM3's trainer logs through ``Logger`` → ``tensorboard_writer`` with ``log(name, value, step)``,
``log_dict(payload, step)`` and ``log_hparams(hparams, meters)``. :func:`make_mlflow_writer` is
the Hydra target the generated config puts there. It

* renames SAM3's keys to angioexp's metric names (docs/design.md#metric-keys) with
  :func:`map_key`, dropping bookkeeping keys;
* batches metrics and sends them with ``MlflowClient().log_batch(run_id, ...)`` every
  ``flush_secs`` (and on every evaluation), so the MLflow UI follows the run while it trains;
* appends each step's train metrics and each evaluation's val metrics to ``events.jsonl``, which
  the parent process tails to drive callbacks (Optuna pruning on ``val/AP75``).

SAM3 logs epoch-level dictionaries with the *epoch* as step; the trainer subclass sets
``step_for_epoch_logs`` to the optimizer step so every metric shares one x-axis.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# pycocotools stats order as SAM3's CocoEvaluatorOfflineWithPredFileEvaluators names them.
_COCO_STAT_NAMES = {
    "AP": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "AP_small", "AP_medium": "AP_medium",
    "AP_large": "AP_large", "AR_maxDets@1": "AR1", "AR_maxDets@10": "AR10", "AR_maxDets@100": "AR100",
    "AR_small": "AR_small", "AR_medium": "AR_medium", "AR_large": "AR_large",
}
_STEP_STATS = {
    "Batch Time": "batch_time_s", "Data Time": "data_time_s", "Mem (GB)": "mem_gb",
    "Time Elapsed": "time_elapsed_s", "Data Time Synced": None,
}

_STEP_LOSS = re.compile(r"^Step_Losses/Losses/(train|val)_[^/]+_loss(?:/(?P<term>.+))?$")
_EPOCH_LOSS = re.compile(r"^Losses/(?P<phase>train|val)_[^_/]+_(?P<term>.+)$")
_COCO = re.compile(r"^Meters_train/val_[^/]+/[^/]+/coco_eval_(?P<iou>segm|bbox)_(?P<stat>.+)$")
_STEP_STATS_KEY = re.compile(r"^Step_Stats/(?P<phase>train|val)/(?P<name>.+)$")


def map_key(name: str) -> str | None:
    """SAM3 scalar name → angioexp metric name (docs/design.md#metric-keys), or None to drop it.

    >>> map_key("Step_Losses/Losses/train_all_loss")
    'train/loss'
    >>> map_key("Step_Losses/Losses/train_all_loss/loss_mask")
    'train/loss_mask'
    >>> map_key("Meters_train/val_angio/segm/coco_eval_segm_AP_75")
    'val/AP75'
    """
    if name.startswith(("train/", "val/")):
        return name  # already ours (the trainer subclass logs nan events, grad norm, lr)
    m = _STEP_LOSS.match(name)
    if m:
        phase = m.group(1)
        return f"{phase}/{m.group('term') or 'loss'}"
    m = _COCO.match(name)
    if m:
        stat = _COCO_STAT_NAMES.get(m.group("stat"), m.group("stat"))
        return f"val/{stat}" if m.group("iou") == "segm" else f"val/bbox_{stat}"
    m = _EPOCH_LOSS.match(name)
    if m:
        term = m.group("term")
        if term == "core_loss":
            return None  # the same number as ..._loss
        return f"{m.group('phase')}/epoch_{term}"
    m = _STEP_STATS_KEY.match(name)
    if m:
        short = _STEP_STATS.get(m.group("name"), "skip")
        if short is None or short == "skip":
            return None
        return f"{m.group('phase')}/{short}"
    if name == "Trainer/epoch":
        return "trainer/epoch"
    return None  # Optim/* (one per layer-decay group; train/lr is logged instead), Trainer/*


def _scalar(value: Any) -> float | None:
    try:
        if hasattr(value, "item"):
            value = value.item()
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


class MlflowScalarWriter:
    """SAM3 ``tensorboard_writer`` interface → MLflow metrics + ``events.jsonl``.

    Args:
        run_id: MLflow run to log into; None → only ``events.jsonl`` is written.
        tracking_uri: the tracking server / SQLite URI (None: MLflow's default resolution).
        events_path: JSON lines read by the parent process (train steps and evaluations).
        batch_size: images per optimizer step, for ``train/images_per_s``.
        flush_secs: send buffered metrics at least this often.
    """

    def __init__(
        self,
        run_id: str | None,
        tracking_uri: str | None = None,
        events_path: str | None = None,
        batch_size: int = 1,
        flush_secs: float = 5.0,
        max_buffer: int = 500,
        resume: bool = False,
    ):
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.events_path = Path(events_path) if events_path else None
        self.batch_size = batch_size
        self.flush_secs = flush_secs
        self.max_buffer = max_buffer
        self.step_for_epoch_logs: int | None = None
        self._client = None
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._pending_step: int | None = None
        self._pending: dict[str, float] = {}
        self.logged: dict[str, list[tuple[int, float]]] = {}  # for tests and summaries
        # Resuming: SAM3 restarts from its last epoch checkpoint and recomputes the steps after it,
        # which are already in the run; drop them so every metric's steps stay unique.
        self.skip_until = -1
        if resume and self.client is not None:
            history = self.client.get_metric_history(run_id, "train/loss")
            self.skip_until = max((m.step for m in history), default=-1)

    @property
    def client(self):
        if self._client is None and self.run_id:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # --- SAM3's interface ---------------------------------------------------------------------

    def log(self, name: str, data: Any, step: int) -> None:
        key = map_key(name)
        value = _scalar(data)
        if key is None or value is None:
            return
        step = int(step)
        if name.startswith("Step_Stats/train/"):
            step -= 1  # SAM3 logs a step's timings after incrementing its step counter
        if step <= self.skip_until:
            return
        if self._pending_step is not None and step != self._pending_step:
            self._emit_train_event()
        self._pending_step = step
        self._pending[key] = value
        if key == "train/batch_time_s" and value > 0:
            self._pending["train/images_per_s"] = self.batch_size / value
            self._record("train/images_per_s", self.batch_size / value, step)
        self._record(key, value, step)
        self._maybe_flush()

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        self._emit_train_event()  # the last step's train metrics come first
        step = int(self.step_for_epoch_logs if self.step_for_epoch_logs is not None else step)
        if step <= self.skip_until:
            return
        mapped: dict[str, float] = {}
        for name, data in payload.items():
            key, value = map_key(name), _scalar(data)
            if key is not None and value is not None:
                mapped[key] = value
        for key, value in mapped.items():
            self._record(key, value, step)
        val = {k: v for k, v in mapped.items() if k.startswith("val/")}
        if val:
            self._write_event({"kind": "val", "step": step, "metrics": val})
        self.flush()

    def log_hparams(self, hparams: dict[str, Any], meters: dict[str, Any]) -> None:
        if self.client is not None:
            from mlflow.entities import Param

            params = [Param(str(k)[:250], str(v)[:6000]) for k, v in hparams.items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100], synchronous=True)
        self.log_dict(meters, self.step_for_epoch_logs or 0)

    def flush(self) -> None:
        """Send buffered metrics to MLflow and close the current step's train event."""
        self._emit_train_event()
        self._send()

    def _send(self) -> None:
        if self.client is not None and self._buffer:
            for i in range(0, len(self._buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000], synchronous=True)
        self._buffer = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - never let logging kill the end of a run
            log.exception("could not flush metrics to MLflow")

    # --- internals ----------------------------------------------------------------------------

    def _record(self, key: str, value: float, step: int) -> None:
        self.logged.setdefault(key, []).append((step, value))
        if self.run_id:
            from mlflow.entities import Metric

            self._buffer.append(Metric(key, value if math.isfinite(value) else float("nan"), int(time.time() * 1000), step))

    def _maybe_flush(self) -> None:
        # Time-based sends keep MLflow live; the step's event stays open until the step changes.
        if len(self._buffer) >= self.max_buffer or time.monotonic() - self._last_flush >= self.flush_secs:
            self._send()

    def _emit_train_event(self) -> None:
        train = {k: v for k, v in self._pending.items() if k.startswith("train/")}
        if train and self._pending_step is not None:
            self._write_event({"kind": "train", "step": self._pending_step, "metrics": train})
        self._pending = {}

    def _write_event(self, event: dict) -> None:
        if self.events_path is None:
            return
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, allow_nan=True) + "\n")
            handle.flush()


def make_mlflow_writer(
    run_id: str | None = None,
    tracking_uri: str | None = None,
    events_path: str | None = None,
    batch_size: int = 1,
    flush_secs: float = 5.0,
    resume: bool = False,
    **_ignored: Any,
) -> MlflowScalarWriter:
    """Hydra target for ``trainer.logging.tensorboard_writer`` (extra TensorBoard kwargs ignored)."""
    return MlflowScalarWriter(run_id, tracking_uri, events_path, batch_size, flush_secs, resume=resume)
