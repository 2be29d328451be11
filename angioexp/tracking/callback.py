"""``MlflowCallback``: streams one training run into one MLflow run while it trains.

Metrics, params and tags go out in batches through MLflow's asynchronous queue
(``log_batch(synchronous=False)``); artifacts (evaluation files, the learning-curve PNG) are
copied by one background worker thread. The training thread only enqueues. Every metric up to
a checkpoint's step is flushed when that checkpoint is announced, so a killed run never loses a
step that its resume will not recompute.

Resume without duplicates: when the loop restarts from step S of a run that was killed at
step K > S, steps S+1..K are already in MLflow. The callback reads each metric's highest
logged step first and drops re-logged steps up to it (the loop resumes deterministically, so
the recomputed values are the ones already stored), so every metric's step sequence stays
strictly increasing and complete.

The callback never starts or ends the run: the caller owns it (``tracked_train`` or a sweep's
nested trial run), so the same class serves both.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from angioexp.train.callbacks import Callback, EvalArtifacts, RunInfo, TrainResult

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): keep params within them instead of failing a run.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")

LEARNING_CURVE = "plots/learning_curves.png"
OUT_DIR_TAG = "angioexp.out_dir"
CHECKPOINT_STEP_TAG = "angioexp.checkpoint_step"
CHECKPOINT_PATH_TAG = "angioexp.checkpoint"


def metric_key(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_-. /:``), at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_KEY]


def param_value(value: Any) -> str:
    """MLflow param text: lists as JSON, None as 'None', cut to MLflow's 6000-character limit."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    if len(text) > MAX_PARAM_VALUE:
        marker = "…[truncated]"
        text = text[: MAX_PARAM_VALUE - len(marker)] + marker
    return text


def config_params(cfg) -> dict[str, str]:
    """The flattened config (incl. the effective LRs) as MLflow params."""
    from angioexp.config import flatten

    return {metric_key(k): param_value(v) for k, v in flatten(cfg).items()}


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in MLflow-sized batches (100 per call), synchronously."""
    from mlflow.entities import Param

    items = [Param(metric_key(k), param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH], synchronous=True)


def log_load_report(client, run_id: str, report, artifact_path: str = "init", *, source: str | None = None) -> None:
    """A checkpoint :class:`~angioexp.checkpoints.LoadReport` → params ``init.*`` + JSON artifact.

    ``source``: what the user asked for (e.g. ``models:/angio-stage1@champion``) when the
    report only knows the downloaded file.
    """
    params = report.as_params()
    if source:
        params["init.source"] = source
    existing = client.get_run(run_id).data.params
    fresh = {k: v for k, v in params.items() if metric_key(k) not in existing}
    if fresh:
        log_params(client, run_id, fresh)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "load_report.json"
        path.write_text(json.dumps({**report.as_dict(), "requested": source or report.source}, indent=2), encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path)


class MlflowCallback(Callback):
    """Logs params, per-step/per-eval metrics, evaluation files and a learning-curve plot.

    Args:
        run_id: the MLflow run to log into (already started by the caller).
        client: an ``MlflowClient`` (default: one on the current tracking URI).
        log_config: log the flattened config as params and the resolved YAML (skipped on resume).
        synchronous: write metrics and artifacts in the training thread (debugging); default async.
        plot: redraw ``plots/learning_curves.png`` after each evaluation and at the end.
        init_source: the ``init_from`` URI, logged as ``init.source`` instead of the local file.

    ``on_train_end`` waits for everything queued; a caller whose run ends without it (a crash)
    calls :meth:`close` before ending the MLflow run.
    """

    def __init__(self, run_id: str, *, client=None, log_config: bool = True, synchronous: bool = False, plot: bool = True,
                 init_source: str | None = None):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = client or MlflowClient()
        self.log_config = log_config
        self.synchronous = synchronous
        self.plot = plot
        self.init_source = init_source  # the init_from URI, for the load report's params
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.nan_events: list[dict] = []
        self.high_water: dict[str, int] = {}  # metric → last step already in MLflow (resume)
        self.dropped_duplicates = 0
        self.backend_logs_metrics = False  # RunInfo.extra["metrics_logged_by_backend"]
        self._pending: list = []  # RunOperations futures of async batches
        self._artifact_jobs: list = []  # futures of the artifact worker
        self._worker: ThreadPoolExecutor | None = None  # created on first use, closed at train end
        self._plot_request = None  # latest (history, nan_steps, title) waiting to be drawn
        self._drawn_signature = None
        self._warned = False
        self._title = ""

    # -- plumbing ---------------------------------------------------------------------------

    def _log_metrics(self, metrics: Mapping[str, float], step: int, *, own: bool = False) -> None:
        """Queue metrics at ``step``; ``own``: ours even when the backend logs its metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for name, value in metrics.items():
            if value is None or isinstance(value, str):
                continue
            key = metric_key(name)
            if step <= self.high_water.get(key, -1):
                self.dropped_duplicates += 1
                continue
            value = float(value)
            batch.append(Metric(key, value, now, int(step)))
            if key.startswith(("train/", "val/")):
                self.history.setdefault(key, []).append((int(step), value))
        if self.backend_logs_metrics and not own:
            return  # already in MLflow (sam3 backend's writer); kept above for the plot only
        for i in range(0, len(batch), METRICS_PER_BATCH):
            self._submit(metrics=batch[i : i + METRICS_PER_BATCH])

    def _submit(self, **entities) -> None:
        try:
            ops = self.client.log_batch(self.run_id, synchronous=self.synchronous, **entities)
        except Exception as exc:  # noqa: BLE001 - tracking trouble must not kill training
            self._warn(exc)
            return
        if ops is not None:
            self._pending.append(ops)

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            log.warning("MLflow logging failed for run %s (training goes on): %s", self.run_id, exc)
            self._warned = True

    def flush_metrics(self) -> None:
        """Block until every queued metric/param/tag batch is written."""
        pending, self._pending = self._pending, []
        for ops in pending:
            try:
                ops.wait()
            except Exception as exc:  # noqa: BLE001
                self._warn(exc)

    def flush(self) -> None:
        """Block until everything queued (metrics and artifacts) is written."""
        jobs, self._artifact_jobs = self._artifact_jobs, []
        for job in jobs:
            job.result()  # the jobs catch their own errors
        self.flush_metrics()

    def close(self) -> None:
        self.flush()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _in_background(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the artifact worker (in order), or inline when synchronous."""
        if self.synchronous:
            fn(*args)
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="angioexp-mlflow-artifacts")
        self._artifact_jobs = [j for j in self._artifact_jobs if not j.done()]
        self._artifact_jobs.append(self._worker.submit(fn, *args))

    def _log_params_async(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._submit(params=items[i : i + PARAMS_PER_BATCH])

    def _set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._submit(tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _artifact(self, local: Path | None, artifact_path: str | None) -> None:
        if local is None or not Path(local).exists():
            return
        try:
            if Path(local).is_dir():
                self.client.log_artifacts(self.run_id, str(local), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(local), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    def _read_high_water(self) -> None:
        """Highest logged step of each train/val metric of the run, and its history for plots."""
        run = self.client.get_run(self.run_id)
        for key in run.data.metrics:
            if not key.startswith(("train/", "val/")):
                continue  # system/* resume on their own (SystemMetricsMonitor(resume_logging))
            points = self.client.get_metric_history(self.run_id, key)
            if points:
                self.high_water[key] = max(p.step for p in points)
                self.history[key] = sorted((p.step, p.value) for p in points)

    def _draw(self) -> None:
        """Redraw the learning curve on the artifact worker, from a snapshot of the history.

        Coalesced: while a redraw waits in the queue, newer requests only replace its data,
        so a slow store or a busy CPU never piles up PNG renders.
        """
        if not self.plot or not self.history:
            signature = None
        else:
            signature = tuple((k, len(v)) for k, v in sorted(self.history.items())) + (len(self.nan_events),)
        if signature is None or signature == self._drawn_signature:
            return  # nothing new to show
        self._drawn_signature = signature
        latest = ({k: list(v) for k, v in self.history.items()}, [e["step"] for e in self.nan_events], self._title)
        queued = self._plot_request is not None
        self._plot_request = latest
        if not queued:
            self._in_background(self._draw_now)

    def _draw_now(self) -> None:
        request, self._plot_request = self._plot_request, None
        if request is None:
            return
        history, nan_steps, title = request
        from angioexp.tracking.plots import learning_curve_png

        try:
            with tempfile.TemporaryDirectory() as tmp:
                png = learning_curve_png(history, Path(tmp) / Path(LEARNING_CURVE).name, title, nan_steps=nan_steps)
                self._artifact(png, str(Path(LEARNING_CURVE).parent))
        except Exception as exc:  # noqa: BLE001 - a plot must never stop training
            log.warning("learning-curve plot failed: %s", exc)

    @staticmethod
    def _warm_up_plotting() -> None:
        import matplotlib.figure  # noqa: F401 - a second of import, paid on the worker thread

    def _text_artifact(self, name: str, text: str, artifact_path: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            self._artifact(path, artifact_path)

    # -- hooks ------------------------------------------------------------------------------

    def on_train_start(self, info: RunInfo) -> None:
        from angioexp.config import dump_yaml
        from angioexp.config_view import resolved_with_sources

        resumed = info.start_step > 0
        if self.plot:
            self._in_background(self._warm_up_plotting)
        self.backend_logs_metrics = bool((info.extra or {}).get("metrics_logged_by_backend"))
        if resumed:
            self._read_high_water()
        cfg = info.config
        self._title = f"stage {cfg.stage} · {cfg.backend} · run {self.run_id[:8]}"
        if self.log_config and not resumed:
            params = config_params(cfg)
            if info.model is not None:
                params["model.parameters"] = sum(p.numel() for p in info.model.parameters())
            existing = self.client.get_run(self.run_id).data.params  # e.g. `mlflow run`'s own params
            clashes = {k: (existing[k], param_value(v)) for k, v in params.items()
                       if k in existing and existing[k] != param_value(v)}
            if clashes:  # MLflow params are immutable: keep the run's value, record ours
                self._set_tags({"angioexp.param_clashes": json.dumps(clashes)[:5000]})
            self._log_params_async({k: v for k, v in params.items() if k not in existing})
            self._in_background(self._text_artifact, "config.yaml", dump_yaml(cfg), "config")
            self._in_background(self._text_artifact, "resolved_with_sources.yaml", resolved_with_sources(cfg), "config")
        report = (info.extra or {}).get("init_report")
        if report is not None:
            log_load_report(self.client, self.run_id, report, source=self.init_source)
        tags = {OUT_DIR_TAG: str(Path(info.out_dir).resolve()), "angioexp.max_steps": info.max_steps}
        if resumed:
            tags["angioexp.resumed_from_step"] = info.start_step
        self._set_tags(tags)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self._log_metrics(metrics, step)

    def on_nan_event(self, step: int, event: dict) -> None:
        self.nan_events.append({"step": int(step), **{k: _jsonable(v) for k, v in event.items()}})
        self._set_tags({"angioexp.nan_events": len(self.nan_events), "angioexp.last_nan": json.dumps(self.nan_events[-1])[:500]})

    def on_eval_end(self, step: int, metrics: dict[str, float], artifacts: EvalArtifacts) -> None:
        self._log_metrics(metrics, step)
        where = f"eval/step_{int(step):06d}"
        if artifacts is not None:  # files stay in out_dir/eval/: safe to copy later
            for local in (artifacts.metrics_json, artifacts.per_image_csv, artifacts.predictions_json):
                self._in_background(self._artifact, local, where)
            if artifacts.overlays_dir is not None:
                self._in_background(self._artifact, artifacts.overlays_dir, f"{where}/overlays")
            if artifacts.segments_dir is not None:
                self._in_background(self._artifact, artifacts.segments_dir, f"{where}/segments")
        self._draw()

    def on_checkpoint(self, step: int, path: Path) -> None:
        # Make every metric up to this step durable before the run could be killed: a resume
        # from this checkpoint recomputes only later steps.
        self._set_tags({CHECKPOINT_STEP_TAG: int(step), CHECKPOINT_PATH_TAG: str(Path(path).resolve())})
        self.flush_metrics()  # artifacts may trail: a resume does not depend on them

    def on_train_end(self, result: TrainResult) -> None:
        summary = {
            "summary/steps": result.steps,
            "summary/nan_events": result.nan_events,
            "summary/restores": result.restores,
            "summary/wall_seconds": result.wall_seconds,
        }
        summary.update({f"best/{k}": v for k, v in (result.best_metrics or {}).items() if _is_number(v)})
        self._log_metrics(summary, result.steps, own=True)
        self._set_tags({"angioexp.stopped_reason": result.stopped_reason, "angioexp.diverged": result.diverged, "angioexp.pruned": result.pruned})
        if self.nan_events or result.history:
            payload = {"events": self.nan_events, "guard_history": [_jsonable(h) for h in result.history]}
            self._in_background(self._text_artifact, "nan_events.json", json.dumps(payload, indent=2, default=str), None)
        self._draw()
        self.close()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
