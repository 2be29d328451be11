"""Every shim that lets SAM3's own trainer run on a machine without CUDA, in one place.

SAM3 (PyPI 0.1.4) assumes a GPU in a handful of spots. Each shim below names the SAM3 code it
covers, is a no-op when CUDA is available, and has a test (``tests/test_sam3_cpu.py``):

=====================  ==============================================================  =========
shim                   SAM3 code that fails or misbehaves without CUDA                 effect
=====================  ==============================================================  =========
``cuda_factories``     ``TransformerDecoder.__init__`` (``_get_coords(..., "cuda")``),   raises
                       ``PositionEmbeddingSine.__init__`` (``torch.zeros(device=cuda)``)
``pin_memory``         ``SequenceGeometryEncoder._encode_boxes`` (``scale.pin_memory()``)  raises
``focal_loss``         ``loss_fns.sigmoid_focal_loss(triton=True)`` (triton GPU kernel)    raises
``mem_meter``          ``train_utils.MemMeter`` (``torch.cuda.max_memory_allocated``)    reports 0
``cuda_autocast``      ``Trainer`` / ``TransformerDecoder`` ``autocast(device_type=cuda)``  warns
                                                                                       every step
=====================  ==============================================================  =========

Configuration-level CPU settings (``accelerator: cpu``, gloo, ``always_interpolate_masks_on_gpu:
false``, AMP off) are written by :mod:`angioexp.backends.sam3.config_gen`, not patched here.

``apply_cpu_shims()`` installs them process-wide (the SAM3 trainer runs in its own subprocess,
see :mod:`angioexp.backends.sam3.launch`); ``cpu_shims()`` is the same as a context manager that
undoes everything on exit (tests).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import sys
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

# torch tensor factories SAM3 calls with a hard-coded device="cuda".
_FACTORIES = ("arange", "zeros", "ones", "empty", "full", "tensor", "as_tensor", "linspace", "rand", "randn")

_applied: dict[str, Callable[[], None]] = {}  # shim name → undo function


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


def _patch(owner, name: str, replacement) -> Callable[[], None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    return lambda: setattr(owner, name, original)


# --- the shims ----------------------------------------------------------------------------------


def _shim_cuda_factories() -> Callable[[], None]:
    """torch.<factory>(..., device="cuda") → the same tensor on the CPU."""
    undo = []
    for name in _FACTORIES:
        original = getattr(torch, name)

        @functools.wraps(original)
        def factory(*args, __original=original, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return __original(*args, **kwargs)

        undo.append(_patch(torch, name, factory))
    return lambda: [u() for u in undo]


def _shim_pin_memory() -> Callable[[], None]:
    """Tensor.pin_memory() needs an accelerator; without one pinned memory has no purpose."""
    original = torch.Tensor.pin_memory

    def pin_memory(self, *args, **kwargs):
        return self

    pin_memory.__wrapped__ = original  # type: ignore[attr-defined]
    return _patch(torch.Tensor, "pin_memory", pin_memory)


def _shim_focal_loss() -> Callable[[], None]:
    """SAM3's focal loss defaults to a triton GPU kernel; use its own PyTorch path instead."""
    from sam3.train.loss import loss_fns

    original = loss_fns.sigmoid_focal_loss

    @functools.wraps(original)
    def sigmoid_focal_loss(*args, **kwargs):
        kwargs["triton"] = False
        return original(*args, **kwargs)

    return _patch(loss_fns, "sigmoid_focal_loss", sigmoid_focal_loss)


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def _shim_mem_meter() -> Callable[[], None]:
    """MemMeter reads CUDA's allocator (0 on CPU); report the process's peak RSS instead."""
    from sam3.train.utils.train_utils import MemMeter

    original = MemMeter.update

    def update(self, n=1, reset_peak_usage=True):
        # RSS peaks cannot be reset; the meter shows the lifetime peak, which is what matters
        # for "will this fit on the machine".
        self.val = round(peak_rss_gb(), 2)
        self.sum += self.val * n
        self.count += n
        self.avg = self.sum / self.count
        self.peak = max(self.peak, self.val)

    update.__wrapped__ = original  # type: ignore[attr-defined]
    return _patch(MemMeter, "update", update)


def _shim_cuda_autocast() -> Callable[[], None]:
    """autocast(device_type="cuda") without CUDA warns and disables itself on every call: make
    it an explicit, silent CPU no-op (AMP is a CUDA-only setting in angioexp)."""
    original = torch.amp.autocast

    class autocast(original):  # type: ignore[misc, valid-type]
        def __init__(self, device_type: str, dtype=None, enabled: bool = True, cache_enabled=None):
            if device_type == "cuda":
                device_type, enabled = "cpu", False
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    undo_amp = _patch(torch.amp, "autocast", autocast)
    undo_torch = _patch(torch, "autocast", autocast)
    return lambda: (undo_amp(), undo_torch())


SHIMS: dict[str, Callable[[], Callable[[], None]]] = {
    "cuda_factories": _shim_cuda_factories,
    "pin_memory": _shim_pin_memory,
    "focal_loss": _shim_focal_loss,
    "mem_meter": _shim_mem_meter,
    "cuda_autocast": _shim_cuda_autocast,
}


def apply_cpu_shims(force: bool = False, *, announce: bool = True) -> list[str]:
    """Install every shim (idempotent). No-op when CUDA is available unless ``force``.

    Returns the names of the shims now active; ``announce`` logs them (at INFO, else DEBUG).
    """
    if cuda_available() and not force:
        return []
    for name, install in SHIMS.items():
        if name not in _applied:
            _applied[name] = install()
    log.log(logging.INFO if announce else logging.DEBUG, "SAM3 CPU shims active: %s", ", ".join(_applied))
    return list(_applied)


def remove_cpu_shims() -> None:
    for name in reversed(list(_applied)):
        _applied.pop(name)()


@contextlib.contextmanager
def cpu_shims(force: bool = False) -> Iterator[list[str]]:
    """``apply_cpu_shims`` for the duration of a ``with`` block (then everything is undone);
    quiet, as ``predict`` enters it once per batch of frames."""
    already = set(_applied)
    names = apply_cpu_shims(force=force, announce=False)
    try:
        yield names
    finally:
        for name in reversed(list(_applied)):
            if name not in already:
                _applied.pop(name)()
