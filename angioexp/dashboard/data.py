"""What the dashboards show, read only through ``MlflowClient`` and Optuna storage.

Any tracking URI works (SQLite, a remote MLflow server): runs, metric histories, registry
versions, aliases and artifacts all come through the client. The one thing read from disk
directly is a dataset's frames for the prediction galleries — the COCO folder a run recorded
(tag ``angioexp.coco_dir`` or its validation dataset input); where it is not on this machine
the galleries fall back to the overlay PNGs the run logged.

Nothing here raises for missing data: a missing model, run or artifact reads as None/empty,
and the pages say so.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("angio-stage1", "angio-stage2")
DEFAULT_EXPERIMENTS = ("angioexp-stage1", "angioexp-stage2")
SWEEP_EXPERIMENT = "angioexp-sweeps"
DASHBOARD_EXPERIMENT = "angioexp-dashboards"

# Headline validation metrics, in display order (docs/design.md#metric-keys, vessel-grade ones included).
HEADLINE = ("val/AP75_tol", "val/AP75", "val/AP_tol", "val/AP", "val/AP50", "val/dice", "val/cldice", "val/biou",
            "val/semantic/dice", "val/dice_mean_segments", "val/semantic/dice_mean_segments",
            # Stage 2 headline with its reference points (angioexp.evaluate.segments)
            "val/segments/dice_common", "val/segments/floor_common", "val/segments/ceiling_common",
            "val/segments/arcade_mean_f1")
EVAL_DIR = "eval"  # MlflowCallback logs each evaluation under eval/step_NNNNNN/
NAN_EVENTS_FILE = "nan_events.json"
LOAD_REPORT_FILE = "init/load_report.json"


def mlflow_client(uri: str | None = None):
    from mlflow import MlflowClient

    from angioexp.tracking.uri import configure_mlflow

    return MlflowClient(configure_mlflow(uri))


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Artifacts


def download_text(client, run_id: str, path: str) -> str | None:
    """Text of one artifact of a run, or None when it is not there."""
    try:
        with tempfile.TemporaryDirectory(prefix="angioexp-dash-") as tmp:
            local = Path(client.download_artifacts(run_id, path, tmp))
            return local.read_text(encoding="utf-8") if local.is_file() else None
    except Exception as exc:  # noqa: BLE001 - MlflowException, OSError: "not there" for a dashboard
        log.debug("artifact %s of run %s: %s", path, run_id, exc)
        return None


def download_json(client, run_id: str, path: str):
    text = download_text(client, run_id, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        log.warning("artifact %s of run %s is not valid JSON", path, run_id)
        return None


def download_bytes(client, run_id: str, path: str) -> bytes | None:
    try:
        with tempfile.TemporaryDirectory(prefix="angioexp-dash-") as tmp:
            local = Path(client.download_artifacts(run_id, path, tmp))
            return local.read_bytes() if local.is_file() else None
    except Exception as exc:  # noqa: BLE001
        log.debug("artifact %s of run %s: %s", path, run_id, exc)
        return None


def list_artifacts(client, run_id: str, path: str | None = None) -> list:
    try:
        return list(client.list_artifacts(run_id, path))
    except Exception as exc:  # noqa: BLE001
        log.debug("list_artifacts %s of run %s: %s", path, run_id, exc)
        return []


def eval_steps(client, run_id: str) -> list[int]:
    """Steps of the evaluations a run logged (``eval/step_NNNNNN``), ascending."""
    steps = []
    for item in list_artifacts(client, run_id, EVAL_DIR):
        name = Path(item.path).name
        if item.is_dir and name.startswith("step_"):
            try:
                steps.append(int(name[len("step_"):]))
            except ValueError:
                continue
    return sorted(steps)


def eval_dir(step: int) -> str:
    return f"{EVAL_DIR}/step_{int(step):06d}"


# ---------------------------------------------------------------------------------------------
# Runs


def get_run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or recorded in another store
        return None


def experiment_ids(client, names) -> dict[str, str]:
    """name → id for the experiments that exist (missing ones are left out)."""
    out = {}
    for name in names:
        try:
            experiment = client.get_experiment_by_name(name)
        except Exception:  # noqa: BLE001
            experiment = None
        if experiment is not None and experiment.lifecycle_stage == "active":
            out[name] = experiment.experiment_id
    return out


def select_runs(client, *, experiments=DEFAULT_EXPERIMENTS, run_ids=(), max_runs: int = 20) -> list:
    """Explicit ``run_ids`` (in that order), else the newest ``max_runs`` runs of ``experiments``
    that trained (sweep parent runs and dashboard runs are left out; sweep trials are kept)."""
    if run_ids:
        runs = [get_run(client, r) for r in run_ids]
        missing = [r for r, run in zip(run_ids, runs) if run is None]
        if missing:
            from angioexp.errors import InputError

            raise InputError(f"no such run(s) in this tracking store: {', '.join(missing)}", key="--runs")
        return runs
    ids = list(experiment_ids(client, experiments).values())
    if not ids:
        return []
    runs = client.search_runs(ids, max_results=max(4 * max_runs, 50), order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if r.data.tags.get("sweep.role") != "parent" and r.data.tags.get("angioexp.role") != "dashboard"]
    return runs[:max_runs]


def metric_history(client, run_id: str, key: str, *, max_points: int = 160) -> list[tuple[int, float]]:
    """(step, value) of a metric, finite values only, at most ``max_points`` of them.

    Thinning keeps the lowest and the highest point of each of ``max_points / 2`` step buckets
    (plus the first and last), so a loss spike before a NaN survives while 20 runs × 25
    metrics stay a page of about a megabyte.
    """
    try:
        points = client.get_metric_history(run_id, key)
    except Exception:  # noqa: BLE001
        return []
    series = sorted((int(p.step), float(p.value)) for p in points if _finite(p.value) is not None)
    return thin(series, max_points)


def thin(series: list[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    """Min/max-per-bucket thinning of a step-sorted series (see :func:`metric_history`)."""
    if len(series) <= max_points or max_points < 4:
        return series
    buckets = (max_points - 2) // 2
    inner = series[1:-1]
    size = len(inner) / buckets
    kept = [series[0]]
    for b in range(buckets):
        chunk = inner[round(b * size): round((b + 1) * size)]
        if not chunk:
            continue
        low = min(range(len(chunk)), key=lambda i: chunk[i][1])
        high = max(range(len(chunk)), key=lambda i: chunk[i][1])
        kept += [chunk[i] for i in sorted({low, high})]
    kept.append(series[-1])
    return kept


def nan_events(client, run) -> list[dict]:
    """The NaN guard's events of a run: ``nan_events.json`` (written at the end of training),
    else the steps where the logged ``train/nan_events`` count went up (live or killed runs)."""
    payload = None
    if _finite(run.data.metrics.get("summary/nan_events")) or run.data.tags.get("angioexp.nan_events"):
        payload = download_json(client, run.info.run_id, NAN_EVENTS_FILE)
    if isinstance(payload, dict) and isinstance(payload.get("events"), list):
        return [e for e in payload["events"] if isinstance(e, dict) and "step" in e]
    events, previous = [], 0.0
    for step, count in metric_history(client, run.info.run_id, "train/nan_events", max_points=10_000):
        if count > previous:
            events.append({"step": step, "kind": "non-finite", "action": f"{int(count - previous)} event(s) up to here",
                           "detail": "from train/nan_events"})
        previous = count
    return events


def run_url(tracking_uri: str, run) -> str | None:
    """The run's page in the MLflow UI when the store is an MLflow server (http/https), else None."""
    if run is None or not str(tracking_uri).startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def run_label(run) -> str:
    name = run.info.run_name or run.data.tags.get("mlflow.runName") or run.info.run_id[:8]
    return name


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass
class VersionInfo:
    """One registered model version with what the dashboards show about it."""

    name: str
    version: str
    aliases: list[str]
    created_ms: int | None
    run_id: str | None
    run: Any | None  # mlflow Run of the source run (None if gone)
    model_id: str | None
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)  # val/* at the model's evaluation
    metrics_step: int | None = None  # the evaluation step those metrics (and the gallery) come from

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def stage(self) -> str:
        return self.tags.get("stage") or (self.run.data.tags.get("stage", "") if self.run else "")

    @property
    def dataset_digest(self) -> str:
        return self.tags.get("dataset.digest") or (self.run.data.tags.get("dataset.digest", "") if self.run else "")

    @property
    def run_name(self) -> str:
        return run_label(self.run) if self.run is not None else (self.run_id or "")

    @property
    def primary_metric(self) -> str:
        return self.tags.get("primary_metric", "")

    @property
    def primary_value(self) -> float | None:
        value = _finite(self.tags.get("primary_value"))
        return value if value is not None else self.metrics.get(self.primary_metric)

    @property
    def init_from(self) -> str:
        """The Stage 1 version (or URI) a version's training started from; "" for none."""
        if self.tags.get("init_from.version"):
            return self.tags["init_from.version"]
        candidates = [self.tags.get("init_from", "")]
        if self.run is not None:
            t = self.run.data.tags
            if t.get("init.model_name") and t.get("init.version"):
                return f"{t['init.model_name']}/{t['init.version']}"
            candidates += [t.get("init.uri", ""), self.run.data.params.get("init_from", "")]
        return next((c for c in candidates if _given(c)), "")


def _given(value) -> bool:
    """A recorded value that names something (params store None as the text 'None')."""
    return bool(value) and str(value).strip().lower() not in ("none", "null", "")


def version_metrics(client, model_id: str | None, run) -> tuple[dict[str, float], int | None]:
    """val/* metrics of a version and their step: the LoggedModel's (MLflow links the run's
    metrics at the model's step to it), else the run's ``best/val/*``, else its last ``val/*``."""
    if model_id:
        try:
            logged = client.get_logged_model(model_id)
            metrics = {m.key: float(m.value) for m in logged.metrics or [] if m.key.startswith("val/")}
            steps = {int(m.step) for m in logged.metrics or [] if m.key.startswith("val/")}
            if metrics:
                return metrics, (max(steps) if steps else None)
        except Exception as exc:  # noqa: BLE001
            log.debug("logged model %s: %s", model_id, exc)
    if run is None:
        return {}, None
    best = {k[len("best/"):]: v for k, v in run.data.metrics.items() if k.startswith("best/val/")}
    if best:
        return best, None
    return {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}, None


def model_versions(client, name: str) -> list[VersionInfo] | None:
    """Every version of registered model ``name``, newest first; None when the model does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        return None
    aliases_of: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases_of.setdefault(str(version), []).append(alias)
    quoted = name.replace("'", "\\'")
    versions = client.search_model_versions(f"name='{quoted}'")
    out = []
    runs: dict[str, Any] = {}
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        mv = client.get_model_version(name, mv.version)  # search results carry no tags/aliases in some stores
        model_id = getattr(mv, "model_id", None)
        if not model_id and (mv.source or "").startswith("models:/m-"):
            model_id = mv.source[len("models:/"):].strip("/")
        if mv.run_id and mv.run_id not in runs:
            runs[mv.run_id] = get_run(client, mv.run_id)
        run = runs.get(mv.run_id) if mv.run_id else None
        metrics, step = version_metrics(client, model_id, run)
        out.append(VersionInfo(
            name=name, version=str(mv.version), aliases=sorted(set(aliases_of.get(str(mv.version), [])) | set(mv.aliases or [])),
            created_ms=mv.creation_timestamp, run_id=mv.run_id, run=run, model_id=model_id, tags=dict(mv.tags or {}),
            metrics=metrics, metrics_step=step,
        ))
    return out


def by_alias(versions: list[VersionInfo] | None, alias: str) -> VersionInfo | None:
    for v in versions or []:
        if alias in v.aliases:
            return v
    return None


def init_report(client, run) -> dict | None:
    """The Stage 2 init-load report of a run: params ``init.*`` + ``init/load_report.json``."""
    if run is None:
        return None
    params = {k[len("init."):]: v for k, v in run.data.params.items() if k.startswith("init.")}
    if not params:
        return None
    report: dict[str, Any] = {"params": params, "tags": {k: v for k, v in run.data.tags.items() if k.startswith("init.")}}
    detail = download_json(client, run.info.run_id, LOAD_REPORT_FILE)
    if isinstance(detail, dict):
        report["detail"] = detail
    return report


# ---------------------------------------------------------------------------------------------
# Optuna


@dataclass
class StudyRef:
    """A study found in an Optuna storage (``study`` loaded) or known only from MLflow."""

    name: str
    storage: str  # redacted URL
    study: Any = None  # optuna.Study, None when its storage is not reachable from here
    parent_run: Any = None  # the MLflow parent run of the sweep, if any
    error: str = ""


def _storage_file(url: str) -> Path | None:
    """The local file behind a SQLite or journal storage URL (None for server databases)."""
    if url.startswith("journal://"):
        rest = url[len("journal://"):]
        return Path(rest[1:] if rest.startswith("//") else rest) if rest.strip("/") else None
    if "://" not in url:
        return Path(url)  # a plain journal file path
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        return Path(path) if path and path != ":memory:" else None
    return None


def _is_journal(url: str) -> bool:
    return url.startswith("journal://") or "://" not in url


def _storage_exists(url: str) -> bool:
    """False for a SQLite/journal file that is not there (opening it would create an empty one)."""
    path = _storage_file(url)
    return path is None or path.is_file()


def sweep_parent_runs(client) -> list:
    ids = list(experiment_ids(client, [SWEEP_EXPERIMENT]).values())
    if not ids:
        return []
    runs = client.search_runs(ids, filter_string="tags.`sweep.role` = 'parent'", max_results=500,
                              order_by=["attributes.start_time DESC"])
    return list(runs)


def find_studies(client, *, storages=(), names=()) -> tuple[list[StudyRef], list[str]]:
    """Studies to show, and notes on what was looked at.

    Storages searched: ``storages`` if given, else those recorded on sweep parent runs
    (tag ``optuna.storage``) plus the defaults ``sqlite:///optuna.db`` and
    ``optuna-journal.log`` when those files exist. ``names`` filters; a named study found
    nowhere is reported in the notes.
    """
    import optuna

    from angioexp.sweep.storage import DEFAULT_JOURNAL, DEFAULT_SQLITE, open_storage, redact

    notes: list[str] = []
    parents = sweep_parent_runs(client)
    parent_of = {}
    for run in parents:  # newest first: keep the newest parent per study
        parent_of.setdefault(run.data.tags.get("sweep.study", ""), run)
    candidates = list(storages)
    if not candidates:
        recorded = [r.data.tags.get("optuna.storage") for r in parents if r.data.tags.get("optuna.storage")]
        candidates = [u for u in dict.fromkeys(recorded) if "***" not in u]  # redacted URLs cannot be opened
        for default in (DEFAULT_SQLITE, DEFAULT_JOURNAL):
            if default not in candidates and _storage_exists(default):
                candidates.append(default)
    found: dict[str, StudyRef] = {}
    for url in candidates:
        shown = redact(url)
        if not _storage_exists(url):
            notes.append(f"storage {shown}: no such file")
            continue
        try:
            handle = open_storage(url, workers=2 if _is_journal(url) else 1)
            study_names = optuna.study.get_all_study_names(storage=handle.storage)
        except Exception as exc:  # noqa: BLE001 - InputError (unreachable), SQLAlchemy errors
            notes.append(f"storage {shown}: cannot be opened ({exc})")
            continue
        notes.append(f"storage {shown}: {len(study_names)} stud{'y' if len(study_names) == 1 else 'ies'}")
        for study_name in study_names:
            if names and study_name not in names:
                continue
            if study_name in found:
                continue
            try:
                study = optuna.load_study(study_name=study_name, storage=handle.storage)
            except Exception as exc:  # noqa: BLE001
                found[study_name] = StudyRef(study_name, shown, None, parent_of.get(study_name), f"cannot load: {exc}")
                continue
            found[study_name] = StudyRef(study_name, shown, study, parent_of.get(study_name))
    # studies MLflow knows of whose storage we could not open: still listed, from MLflow
    for study_name, run in parent_of.items():
        if study_name and study_name not in found and (not names or study_name in names):
            found[study_name] = StudyRef(study_name, run.data.tags.get("optuna.storage", "?"), None, run,
                                         "its Optuna storage is not reachable from here; figures need it")
    for wanted in names:
        if wanted not in found:
            notes.append(f"study '{wanted}' was not found in any storage searched")
    return sorted(found.values(), key=lambda s: s.name), notes
