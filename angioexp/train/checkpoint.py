"""Training checkpoints: written atomically, read with ``weights_only=True``.

``out_dir/checkpoints/last.pt`` (and ``best.pt``) hold everything an exact resume needs:

    model       state dict
    optimizer   AdamW state (param groups carry base_lr / name)
    step        iterations completed (the next step to run)
    guard       NaN-guard counters
    rng         torch CPU (+ CUDA) generator states — the losses' point sampling draws from them
    best        {"metric", "value", "step"} of the best evaluation so far
    config      the plain config dict (rebuilds the model; ``angioexp.tracking`` reads it)
    format      "angioexp-core/1"

Data order needs no saved state: batches are keyed by (seed, step).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from angioexp.checkpoints import read_checkpoint
from angioexp.errors import InputError
from angioexp.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

FORMAT = "angioexp-core/1"
REQUIRED = ("model", "optimizer", "step", "config")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Serialise to memory first, then one atomic write: a crash leaves the old file intact."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def load_training_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for anything else."""
    payload = read_checkpoint(path)
    if not isinstance(payload, dict):
        raise InputError("not an angioexp training checkpoint (not a dict)", file=path)
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise InputError(f"not a resumable angioexp checkpoint: missing {', '.join(missing)}", file=path)
    if not isinstance(payload["config"], dict):
        raise InputError("checkpoint 'config' is not a mapping", file=path)
    return payload


def config_from_dict(data: dict, *, source: str | Path | None = None):
    """A validated Config from the plain dict a checkpoint stores (no MLflow needed)."""
    from angioexp.config import config_from_dict as stored_config

    try:
        return stored_config(data, source=source)
    except InputError as exc:
        raise InputError(f"stored config is not valid here: {exc.reason}", file=source, key=exc.key) from None


def resolve_resume(resume_from: str | Path) -> Path:
    """A run folder (→ checkpoints/last.pt), a checkpoints folder (→ last.pt) or a file."""
    path = Path(resume_from).expanduser()
    for candidate in (path, path / "checkpoints" / "last.pt", path / "last.pt"):
        if candidate.is_file():
            return candidate
    raise InputError("no checkpoint to resume from (looked for the file, checkpoints/last.pt and last.pt)", file=path, key="--resume")
