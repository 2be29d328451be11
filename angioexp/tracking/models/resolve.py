"""Resolving ``init_from`` / checkpoint URIs (``models:/…``, ``runs:/…``, run folders, files) to
local weights, downloaded once into a cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from angioexp.errors import InputError
from angioexp.fileio import atomic_dir
from angioexp.tracking.models.logged import CONFIG_FILE, INFO_FILE, WEIGHTS_FILE
from angioexp.tracking.models.registry import _client

log = logging.getLogger(__name__)



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


def resolve_weights(source: str | Path | None, *, client=None) -> Path | None:
    """Starting weights as a local file: None for none, a file as it is, anything else through
    :func:`resolve_model` (``models:/…``, ``runs:/…``, run folders)."""
    if not source:
        return None
    path = Path(str(source)).expanduser()
    if path.is_file():
        return path
    return Path(resolve_model(str(source), client=client).weights)
