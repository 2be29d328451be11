"""Where a run computes and in which precision: one answer for training, evaluation, prediction
and both backends."""

from __future__ import annotations

import torch

from angioexp.errors import InputError


def resolve_device(name: str, *, key: str = "train.device") -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; a CUDA device this machine lacks is
    refused, naming the setting (``key``) that asked for it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: CUDA is not available on this machine", key=key)
    return name


def amp_dtype(name: str) -> torch.dtype:
    """``optim.amp.amp_dtype`` as a torch dtype (bfloat16 or float16)."""
    return torch.bfloat16 if name == "bfloat16" else torch.float16
