"""Trained weights ↔ MLflow 3 LoggedModels ↔ the model registry (``angio-stage1/2``, aliases).

Three rooms: :mod:`.logged` (a checkpoint → a LoggedModel), :mod:`.registry` (versions and the
``challenger``/``champion`` aliases) and :mod:`.resolve` (``models:/…``, ``runs:/…`` → local
weights, cached).

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

from angioexp.tracking.models.logged import (CONFIG_FILE, INFO_FILE, LOGGED_MODEL_NAME, PYFUNC_CODE, WEIGHTS_FILE,
                                             log_trained_model, pip_requirements, write_model_files)
from angioexp.tracking.models.registry import (CHALLENGER, CHAMPION, STAGE_DESCRIPTIONS, TAG_COMPARED, TAG_DECISION,
                                               TAG_PRIMARY_METRIC, TAG_PRIMARY_MODE, TAG_PRIMARY_VALUE, Registration,
                                               get_alias_version, move_alias, register_and_alias, registered_model_name)
from angioexp.tracking.models.resolve import ResolvedModel, model_cache_dir, resolve_model, resolve_weights

__all__ = [
    "CHALLENGER", "CHAMPION", "CONFIG_FILE", "INFO_FILE", "LOGGED_MODEL_NAME", "PYFUNC_CODE", "STAGE_DESCRIPTIONS",
    "TAG_COMPARED", "TAG_DECISION", "TAG_PRIMARY_METRIC", "TAG_PRIMARY_MODE", "TAG_PRIMARY_VALUE", "WEIGHTS_FILE",
    "Registration", "ResolvedModel", "get_alias_version", "log_trained_model", "model_cache_dir", "move_alias",
    "pip_requirements", "register_and_alias", "registered_model_name", "resolve_model", "resolve_weights",
    "write_model_files",
]
