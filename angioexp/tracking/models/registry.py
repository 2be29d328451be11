"""Registry: a new version → ``challenger``; ``champion`` if it beats the current one; manual
alias moves, recorded on both versions."""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from angioexp.train.callbacks import is_better

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

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
        if is_better(value, old, mode):
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
