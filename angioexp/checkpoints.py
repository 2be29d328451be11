"""Checkpoints: reading them safely, loading weights with a verified report, and the core
backend's training checkpoints.

Both backends load through :func:`load_state_with_report`: a Stage 2 run that silently starts
from random weights (the researcher's mistake; SAM3's own ``checkpoint_path`` does this with a
trainer checkpoint) fails here instead, before any training step.

The core backend's ``out_dir/checkpoints/last.pt`` (and ``best.pt``) hold everything an exact
resume needs, written atomically by :func:`save_checkpoint`:

    model       state dict (the averaged weights when ``train.ema_decay`` is set)
    raw_model   the optimizer's own weights (only with ``train.ema_decay``; ``--resume`` reads it)
    optimizer   AdamW state (param groups carry base_lr / name); ``{}`` in best.pt
    step        iterations completed (the next step to run)
    guard       NaN-guard counters
    rng         torch CPU (+ CUDA) generator states — the losses' point sampling draws from them
    best        {"metric", "value", "step", "metrics"} of the best evaluation so far
    config      the plain config dict (rebuilds the model; ``angioexp.tracking`` reads it)
    format      "angioexp-core/1"

Data order needs no saved state: batches are keyed by (seed, step).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from angioexp.errors import CheckpointLoadError, InputError
from angioexp.fileio import write_bytes_atomic

FORMAT = "angioexp-core/1"
REQUIRED = ("model", "optimizer", "step", "config")


@dataclass
class LoadReport:
    """What a state dict did to a model. Counts are tensors; fractions are of the model's tensors."""

    source: str
    model_tensors: int
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, absent from the model
    shape_mismatched: list[str] = field(default_factory=list)  # same name, different shape (skipped)
    skipped_by_rule: list[str] = field(default_factory=list)  # dropped on purpose (e.g. RoPE buffers)
    # missing on purpose: modules the model adds on top of the source (zero-initialised, so the
    # model starts as the source did); left out of the loaded fraction's denominator
    new_by_design: list[str] = field(default_factory=list)

    @property
    def loaded_fraction(self) -> float:
        expected = self.model_tensors - len(self.new_by_design)
        return len(self.loaded) / expected if expected > 0 else 0.0

    def as_params(self, prefix: str = "init") -> dict[str, str | int | float]:
        """Flat values for MLflow params (counts and the loaded fraction)."""
        return {
            f"{prefix}.source": self.source,
            f"{prefix}.loaded": len(self.loaded),
            f"{prefix}.missing": len(self.missing),
            f"{prefix}.unexpected": len(self.unexpected),
            f"{prefix}.shape_mismatched": len(self.shape_mismatched),
            f"{prefix}.skipped_by_rule": len(self.skipped_by_rule),
            f"{prefix}.new_by_design": len(self.new_by_design),
            f"{prefix}.model_tensors": self.model_tensors,
            f"{prefix}.loaded_fraction": round(self.loaded_fraction, 4),
        }

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["loaded_fraction"] = self.loaded_fraction
        return d

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)}/{self.model_tensors - len(self.new_by_design)} tensors ({self.loaded_fraction:.1%}) from {self.source}; "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"shape-mismatched {len(self.shape_mismatched)}, skipped {len(self.skipped_by_rule)}"
            + (f", new by design {len(self.new_by_design)} (not in the source, start at their init)" if self.new_by_design else "")
        )


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True``; a clear error for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", file=path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's safe unpickler names a Python object it will not build "Unsupported global";
        # anything else (bytes that are no pickle at all) is a corrupt file, not an unsafe one
        if "unsupported global" not in str(exc).lower():
            raise InputError(f"cannot read checkpoint: not a torch checkpoint, or corrupt ({type(exc).__name__})",
                             file=path) from None
        # torch's own advice here is to retry with weights_only=False, i.e. to run the file's code
        raise InputError(
            "refused as unsafe: it holds pickled Python objects, which could run code when loaded; a safe "
            "checkpoint holds only tensors, numbers, strings, lists and dicts (what `angioexp train` writes, "
            "or torch.save({'model': model.state_dict()}, path))", file=path) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise InputError(f"cannot read checkpoint ({type(exc).__name__}: {exc})", file=path) from None


def extract_state_dict(payload: Mapping) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the common wrappers (``model``, ``state_dict``, ``model_state``)."""
    for key in ("model", "state_dict", "model_state"):
        inner = payload.get(key) if isinstance(payload, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if isinstance(payload, Mapping) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return dict(payload)
    raise InputError("no model state dict found (looked for a tensor mapping at the top level and under 'model', 'state_dict', 'model_state')")


def load_state_with_report(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    min_loaded_fraction: float = 0.0,
    skip=lambda name: False,
    rename=lambda name: name,
    new_by_design=lambda name: False,
) -> LoadReport:
    """Copy matching tensors of ``state`` into ``model``; never raise on partial fits.

    ``rename`` maps checkpoint names to model names (e.g. strip a ``detector.`` prefix);
    ``skip(name)`` drops tensors on purpose (counted separately); a model tensor the source
    lacks and ``new_by_design(name)`` accepts is reported apart from ``missing`` and does not
    count against the loaded fraction. Fails with
    :class:`CheckpointLoadError` when the loaded fraction is below ``min_loaded_fraction`` —
    and then the model is left untouched.
    """
    own = model.state_dict()
    report = LoadReport(source=source, model_tensors=len(own))
    to_load: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for raw_name, tensor in state.items():
        name = rename(raw_name)
        if skip(name):
            report.skipped_by_rule.append(name)
            seen.add(name)
            continue
        if name not in own:
            report.unexpected.append(raw_name)
            continue
        seen.add(name)
        if tuple(own[name].shape) != tuple(tensor.shape):
            report.shape_mismatched.append(name)
            continue
        to_load[name] = tensor
    report.loaded = sorted(to_load)
    for name in sorted(n for n in own if n not in seen):
        (report.new_by_design if new_by_design(name) else report.missing).append(name)
    if report.loaded_fraction < min_loaded_fraction:
        raise CheckpointLoadError(
            f"refusing to start from {source}: {report.summary()} — below the required "
            f"{min_loaded_fraction:.0%} (min_loaded_fraction)",
            report,
        )
    with torch.no_grad():
        for name, tensor in to_load.items():
            own[name].copy_(tensor.to(dtype=own[name].dtype))
    return report


# ---------------------------------------------------------------------------------------------
# The core backend's training checkpoints


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
    """A validated Config from the plain dict a checkpoint stores (no MLflow needed), read as it ran."""
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
