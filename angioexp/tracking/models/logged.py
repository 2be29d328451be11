"""A trained checkpoint → a LoggedModel of the active MLflow run (pyfunc "model from code":
``weights.pt``, ``config.yaml``, ``model_info.json``; see :mod:`angioexp.tracking.models`)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.yaml"
INFO_FILE = "model_info.json"
LOGGED_MODEL_NAME = "model"
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "pyfunc_model.py"



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
