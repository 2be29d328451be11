"""Trained weights ↔ MLflow 3 LoggedModels ↔ the model registry (``angio-stage1/2``, aliases).

Format decision: the LoggedModel is a **pyfunc "model from code"** (``pyfunc_model.py``)
whose artifacts are ``weights.pt`` (a bare state dict — ``torch.load(weights_only=True)``
reads it), ``config.yaml`` (the resolved angioexp config that builds the architecture) and
``model_info.json``. Why not ``mlflow.pytorch.log_model``: in MLflow 3.17 it serialises either
as ``pt2`` (torch.export — needs an input example and a traceable forward; our models take
prompt tokens and SAM3 is ~850 M parameters) or as a whole-module pickle, which
``weights_only=True`` cannot read and which MLflow itself refuses to load unless
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is set. Models from code pickle nothing: loading runs
our own code on a plain state dict.

    info = log_trained_model(checkpoint, cfg, step=best_step)          # inside the active run
    reg = register_and_alias(info, cfg, metrics=result.best_metrics)  # challenger (+ champion)
    resolved = resolve_model("models:/angio-stage1@champion")          # → local weights.pt
    move_alias("angio-stage1", "champion", version="3", reason="manual")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from angioexp.errors import InputError
from angioexp.fileio import atomic_dir

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.yaml"
INFO_FILE = "model_info.json"
LOGGED_MODEL_NAME = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")

# Version tags (the registry page shows them; the dashboards read them).
TAG_PRIMARY_METRIC = "primary_metric"
TAG_PRIMARY_VALUE = "primary_value"
TAG_PRIMARY_MODE = "primary_mode"
TAG_DECISION = "champion.decision"
TAG_COMPARED = "champion.compared_with"

STAGE_DESCRIPTIONS = {
    1: "Stage 1: whole coronary tree (one 'coronary artery' instance per frame).",
    2: "Stage 2: SYNTAX segments (one category per segment), initialised from Stage 1.",
}


def registered_model_name(stage: int) -> str:
    return f"angio-stage{int(stage)}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _client(client=None):
    from mlflow import MlflowClient

    return client or MlflowClient()


# ---------------------------------------------------------------------------------------------
# Logging a trained checkpoint as a LoggedModel


def pip_requirements() -> list[str]:
    """What a fresh environment needs to load the model (angioexp itself pulls the rest)."""
    import torch

    import angioexp

    version = getattr(angioexp, "__version__", None)
    return [f"angioexp=={version}" if version else "angioexp", f"torch>={torch.__version__.split('+')[0]}"]


def write_model_files(checkpoint: str | Path, cfg, folder: Path, *, extra_info: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write weights.pt (bare state dict), config.yaml and model_info.json into ``folder``.

    Returns the pyfunc ``artifacts`` mapping (name → local path).
    """
    import torch

    from angioexp.checkpoints import extract_state_dict, read_checkpoint
    from angioexp.config import dump_yaml

    payload = read_checkpoint(checkpoint)
    state = extract_state_dict(payload)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, weights)
    (folder / CONFIG_FILE).write_text(dump_yaml(cfg), encoding="utf-8")
    info = {
        "stage": cfg.stage,
        "backend": cfg.backend,
        "checkpoint_step": payload.get("step") if isinstance(payload, Mapping) else None,
        "tensors": len(state),
        "parameters": int(sum(v.numel() for v in state.values())),
        **dict(extra_info or {}),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return {"weights": str(weights), "config": str(folder / CONFIG_FILE), "info": str(folder / INFO_FILE)}


def _signature(cfg):
    """No input schema (images as arrays or paths); ``score_threshold`` as a predict-time param."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, params=ParamSchema([ParamSpec("score_threshold", "double", float(cfg.eval.score_threshold))]))


def log_trained_model(
    checkpoint: str | Path,
    cfg,
    *,
    step: int | None = None,
    tags: Mapping[str, Any] | None = None,
    extra_info: Mapping[str, Any] | None = None,
):
    """Log ``checkpoint`` as a LoggedModel of the ACTIVE run; returns mlflow's ``ModelInfo``.

    ``step``: the evaluation step whose metrics the model has (default: the checkpoint's
    step) — MLflow links the run's metrics at that step to the LoggedModel.
    """
    import mlflow

    from angioexp.checkpoints import read_checkpoint

    if mlflow.active_run() is None:
        raise RuntimeError("log_trained_model needs an active MLflow run (mlflow.start_run)")
    if step is None:
        payload = read_checkpoint(checkpoint)
        step = int(payload.get("step", 0)) if isinstance(payload, Mapping) else 0
    with tempfile.TemporaryDirectory(prefix="angioexp-model-") as tmp, warnings.catch_warnings():
        # inputs are image arrays or paths (no column schema fits both); params are declared
        warnings.filterwarnings("ignore", message=".*An input example was not provided.*")
        artifacts = write_model_files(checkpoint, cfg, Path(tmp), extra_info=extra_info)
        return mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            python_model=str(PYFUNC_CODE),
            artifacts=artifacts,
            signature=_signature(cfg),
            pip_requirements=pip_requirements(),
            step=int(step),
            model_type=f"angioexp-{cfg.backend}-stage{cfg.stage}",
            tags={k: str(v) for k, v in (tags or {}).items()},
        )


# ---------------------------------------------------------------------------------------------
# Registry: new version → challenger; champion if it beats the current one


@dataclass
class Registration:
    name: str
    version: str
    model_uri: str
    primary_metric: str
    primary_value: float | None
    champion: bool  # this version now holds the champion alias
    decision: str  # human-readable reason, also stored as a version tag
    previous_champion: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def _is_better(new: float, old: float, mode: str) -> bool:
    return new > old if mode == "max" else new < old


def _version_primary(client, name: str, version: str, metric: str) -> float | None:
    """The primary value recorded on a version (tag), else its source run's metric."""
    mv = client.get_model_version(name, version)
    if mv.tags.get(TAG_PRIMARY_METRIC) == metric and TAG_PRIMARY_VALUE in mv.tags:
        try:
            return float(mv.tags[TAG_PRIMARY_VALUE])
        except ValueError:
            return None
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        return float(value) if value is not None else None
    return None


def get_alias_version(client, name: str, alias: str):
    """The ModelVersion an alias points to, or None (no model or no alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_and_alias(
    model_info,
    cfg,
    *,
    metrics: Mapping[str, float],
    tags: Mapping[str, Any] | None = None,
    name: str | None = None,
    client=None,
) -> Registration:
    """Register a logged model, alias it ``challenger``, and ``champion`` if it wins.

    Called only after the model is logged and evaluated, so a failed run never leaves a half
    version behind. The champion comparison uses ``cfg.tracking.primary_metric`` /
    ``primary_mode``; the decision and the alias moves are stored as version tags.
    """
    import mlflow

    client = _client(client)
    name = name or registered_model_name(cfg.stage)
    metric, mode = cfg.tracking.primary_metric, cfg.tracking.primary_mode
    value = metrics.get(metric)
    value = float(value) if value is not None and math.isfinite(float(value)) else None

    version_tags = {
        "stage": str(cfg.stage),
        "backend": cfg.backend,
        TAG_PRIMARY_METRIC: metric,
        TAG_PRIMARY_MODE: mode,
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    if value is not None:
        version_tags[TAG_PRIMARY_VALUE] = repr(value)
    for key in ("val/AP75_tol", "val/AP75", "val/AP", "val/dice", "val/cldice"):
        if key in metrics and metrics[key] is not None:
            version_tags[f"metric.{key}"] = f"{float(metrics[key]):.6g}"

    mv = mlflow.register_model(model_info.model_uri, name, tags=version_tags)
    version = str(mv.version)
    registered = client.get_registered_model(name)
    if not registered.description and cfg.stage in STAGE_DESCRIPTIONS:
        client.update_registered_model(name, description=STAGE_DESCRIPTIONS[cfg.stage])

    client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, f"alias.{CHALLENGER}", f"set {_now()} (new version)")

    current = get_alias_version(client, name, CHAMPION)
    if value is None:
        promote, compared = False, "n/a"
        decision = f"not promoted: this run has no finite '{metric}'"
    elif current is None:
        promote, compared = True, "none"
        decision = f"promoted: first version with {metric}={value:.4g}"
    else:
        old = _version_primary(client, name, str(current.version), metric)
        compared = f"v{current.version}: {old:.4g}" if old is not None else f"v{current.version}: no {metric}"
        if old is None or _is_better(value, old, mode):
            promote = True
            decision = f"promoted: {metric}={value:.4g} beats v{current.version} ({compared.split(': ')[1]}, mode {mode})"
        else:
            promote = False
            decision = f"kept v{current.version}: {metric}={value:.4g} does not beat {old:.4g} (mode {mode})"
    client.set_model_version_tag(name, version, TAG_COMPARED, compared)
    client.set_model_version_tag(name, version, TAG_DECISION, decision)
    previous = str(current.version) if current is not None else None
    if promote:
        move_alias(name, CHAMPION, version, reason=f"auto: {decision}", client=client)
    log.info("registered %s v%s (%s)", name, version, decision)
    return Registration(
        name=name, version=version, model_uri=f"models:/{name}/{version}", primary_metric=metric,
        primary_value=value, champion=promote, decision=decision, previous_champion=previous,
        tags=version_tags,
    )


def move_alias(name: str, alias: str, version: str, *, reason: str = "manual", client=None) -> str | None:
    """Point ``alias`` at ``version``; record the move on both versions. Returns the old version."""
    client = _client(client)
    version = str(version)
    client.get_model_version(name, version)  # raises if it does not exist
    old = get_alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    stamp = _now()
    client.set_model_version_tag(name, version, f"alias.{alias}", f"set {stamp} ({reason})")
    if old is not None and str(old.version) != version:
        client.set_model_version_tag(name, str(old.version), f"alias.{alias}", f"moved to v{version} {stamp} ({reason})")
    return str(old.version) if old is not None else None


# ---------------------------------------------------------------------------------------------
# Resolving init_from / checkpoint URIs to local weights


@dataclass
class ResolvedModel:
    """Local weights behind a URI, with where they came from."""

    uri: str
    weights: Path  # loadable with torch.load(weights_only=True)
    model_name: str | None = None
    version: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    config: dict | None = None  # the config those weights were trained with, if known
    info: dict = field(default_factory=dict)

    @property
    def short(self) -> str:
        """``s1v3`` for angio-stage1 version 3 (run names), else a short id."""
        if self.model_name and self.version:
            m = re.fullmatch(r"angio-stage(\d+)", self.model_name)
            return f"s{m.group(1)}v{self.version}" if m else f"{self.model_name}v{self.version}"
        if self.model_id:
            return self.model_id[:10]
        if self.run_id:
            return f"run{self.run_id[:8]}"
        return Path(self.weights).stem

    def as_tags(self) -> dict[str, str]:
        tags = {"init.uri": self.uri}
        for key in ("model_name", "version", "run_id", "model_id"):
            value = getattr(self, key)
            if value:
                tags[f"init.{key}"] = str(value)
        return tags


_MODELS_RE = re.compile(r"^models:/(?P<rest>.+)$")


def _bad(uri: str, message: str) -> InputError:
    return InputError(f"{message} (init_from / checkpoint '{uri}')", key="init_from")


def resolve_model(uri: str, *, client=None, dst: str | Path | None = None) -> ResolvedModel:
    """``models:/name@alias``, ``models:/name/N``, ``models:/m-<id>``, ``runs:/<id>/path`` or a
    local file → local weights. Every failure is an :class:`InputError` naming the URI."""
    from mlflow.exceptions import MlflowException

    text = str(uri).strip()
    match = _MODELS_RE.match(text)
    if match:
        client = _client(client)
        rest = match.group("rest").strip("/")
        if rest.startswith("m-") and "/" not in rest and "@" not in rest:
            return _from_logged_model(client, text, rest, dst=dst)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = _version_by_alias(client, text, name, alias)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            try:
                mv = client.get_model_version(name, version)
            except MlflowException:
                _require_registered(client, text, name)
                raise _bad(text, f"registered model '{name}' has no version {version}{_versions_hint(client, name)}") from None
        else:
            raise _bad(text, "expected models:/<name>@<alias>, models:/<name>/<version> or models:/m-<model id>")
        resolved = _from_version(client, text, mv, dst=dst)
        return resolved
    if text.startswith("runs:/"):
        return _from_runs_uri(text, dst=dst)
    path = Path(text).expanduser()
    if path.is_dir():
        for candidate in (path / WEIGHTS_FILE, path / "artifacts" / WEIGHTS_FILE, path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return ResolvedModel(uri=text, weights=candidate, config=_read_config(candidate.parent / CONFIG_FILE))
        raise _bad(text, f"folder has no {WEIGHTS_FILE} or checkpoints/best.pt")
    if not path.is_file():
        raise _bad(text, "no such file, and not a models:/ or runs:/ URI")
    return ResolvedModel(uri=text, weights=path)


def _require_registered(client, uri: str, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        stage_hint = ""
        m = re.fullmatch(r"angio-stage(\d+)", name)
        if m:
            stage_hint = f"; train Stage {m.group(1)} first (angioexp train --stage {m.group(1)}) or set init_from=none to start from scratch"
        raise _bad(uri, f"registered model '{name}' does not exist in this tracking store{stage_hint}") from None


def _versions_hint(client, name: str) -> str:
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001
        return ""
    if not versions:
        return "; it has no versions"
    listed = ", ".join(sorted((str(v.version) for v in versions), key=int))
    try:  # search results carry no aliases; the registered model does
        aliases = {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
    except Exception:  # noqa: BLE001
        aliases = {}
    alias_text = ", ".join(f"{a}→v{v}" for a, v in sorted(aliases.items())) or "none"
    return f"; versions: {listed}; aliases: {alias_text}"


def _version_by_alias(client, uri: str, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    _require_registered(client, uri, name)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise _bad(
            uri,
            f"alias '{alias}' is not set on registered model '{name}'{_versions_hint(client, name)}; "
            f"set it with: angioexp promote --model {name} --version N --alias {alias}",
        ) from None


def _from_version(client, uri: str, mv, *, dst) -> ResolvedModel:
    source = mv.source or ""
    model_id = getattr(mv, "model_id", None)
    if not model_id and source.startswith("models:/m-"):
        model_id = source[len("models:/"):].strip("/")
    if model_id:
        resolved = _from_logged_model(client, uri, model_id, dst=dst)
    else:  # a version registered from a run artifact or a path
        resolved = _download_model_dir(uri, source, dst=dst, label=f"{mv.name}-v{mv.version}")
    resolved.model_name, resolved.version = mv.name, str(mv.version)
    resolved.run_id = resolved.run_id or mv.run_id
    return resolved


def _from_logged_model(client, uri: str, model_id: str, *, dst) -> ResolvedModel:
    from mlflow.exceptions import MlflowException

    try:
        logged = client.get_logged_model(model_id)
    except MlflowException:
        raise _bad(uri, f"logged model '{model_id}' does not exist") from None
    resolved = _download_model_dir(uri, logged.artifact_location, dst=dst, label=model_id)
    resolved.model_id = model_id
    resolved.run_id = logged.source_run_id
    return resolved


def model_cache_dir() -> Path:
    """Where ``models:/`` and ``runs:/`` downloads are kept: ``$ANGIOEXP_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/angioexp/models`` (``~/.cache/angioexp/models``). Delete it freely."""
    explicit = os.environ.get("ANGIOEXP_MODEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "angioexp" / "models"


def _cache_entry(label: str, artifact_uri: str) -> Path:
    import mlflow

    # mlflow-artifacts:/ URIs are relative to their server, so the server is part of the key
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{artifact_uri}".encode()).hexdigest()[:16]
    return model_cache_dir() / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)[:60]}-{key}"


def _download_into(dst, label: str, artifact_uri: str, fetch, *, reuse: bool) -> Path:
    """Run ``fetch(folder)`` — it downloads ``artifact_uri`` into ``folder`` and returns the local
    path MLflow gave it — and return that path after publishing (or the folder on cache reuse).

    With ``dst`` that folder is ``dst``. Without it, the download goes to the model cache — one
    entry per artifact URI, published whole by a rename so a failed or concurrent download never
    leaves a half entry. ``reuse``: registered and logged models are immutable, so a published
    entry is used as it is; a run's artifacts can still change, so ``runs:/`` re-downloads and
    replaces its entry. (Temporary folders here leaked a copy of the weights per run: 3.4 GB for SAM3.)"""
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(fetch(str(dst)))
    entry = _cache_entry(label, artifact_uri)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot use {entry.parent} as the model cache: {exc}", key="ANGIOEXP_MODEL_CACHE") from None
    if reuse and entry.is_dir():
        log.info("model cache: %s (already downloaded)", entry)
        return entry
    with atomic_dir(entry, overwrite=True) as tmp:
        local = Path(fetch(str(tmp))).resolve()
        relative = local.relative_to(Path(tmp).resolve())
    return entry / relative


def _download_model_dir(uri: str, artifact_uri: str, *, dst, label: str) -> ResolvedModel:
    """Download the model's artifacts/ folder (weights + config) — not the whole model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    base = artifact_uri.rstrip("/")

    def fetch(folder: str) -> str:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/artifacts/{WEIGHTS_FILE}", dst_path=folder)
        except (MlflowException, OSError) as exc:
            raise _bad(uri, f"the model has no artifacts/{WEIGHTS_FILE} (not logged by angioexp?): {exc}") from None
        for name in (CONFIG_FILE, INFO_FILE):  # optional
            with contextlib.suppress(MlflowException, OSError):
                mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/artifacts/{name}", dst_path=folder)
        return folder

    folder = _download_into(dst, label, base, fetch, reuse=True)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise _bad(uri, f"download of artifacts/{WEIGHTS_FILE} produced no {weights}")
    info_path = folder / INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    return ResolvedModel(uri=uri, weights=weights, config=_read_config(folder / CONFIG_FILE), info=info)


def _from_runs_uri(uri: str, *, dst) -> ResolvedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = uri.rstrip("/").rsplit("/", 1)[-1]

    def fetch(folder: str) -> str:
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        except (MlflowException, OSError) as exc:
            raise _bad(uri, f"cannot download: {exc}") from None

    run_id = uri[len("runs:/"):].split("/", 1)[0]
    local = _download_into(dst, f"run-{run_id}-{name}", uri, fetch, reuse=False)
    if local.is_dir():
        inner = resolve_model(str(local))
        inner.uri, inner.run_id = uri, run_id
        return inner
    return ResolvedModel(uri=uri, weights=local, run_id=run_id)


def _read_config(path: Path) -> dict | None:
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None
