"""SIGTERM handled like Ctrl-C, and neither tears a training step in half.

``timeout``, ``docker stop``, Kubernetes and Slurm preemption send SIGTERM (then SIGKILL after a
grace period). :func:`stop_signals_raise` turns SIGTERM into :class:`Terminated`, a
``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` path (checkpoint, MLflow run
KILLED, temp files removed) serves both. Inside :func:`step_boundary` the signal is held until
the step is complete: an interrupt in the middle of ``optimizer.step()`` would leave weights
half-updated, and the checkpoint written on the way out would not match its step number.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

EXIT_CODE = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal number, as shells report


class Terminated(KeyboardInterrupt):
    """SIGTERM received; handled wherever Ctrl-C is."""

    signum = signal.SIGTERM


_state = threading.local()


def _raise(signum: int) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    if getattr(_state, "depth", 0):
        _state.pending = signum  # re-raised at the end of the step
        return
    _raise(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM and SIGINT raise at the next step boundary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def step_boundary() -> Iterator[None]:
    """Hold a stop signal until the enclosed block (one training step) has finished."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        pending = getattr(_state, "pending", None)
        if pending is not None and _state.depth == 0:
            _state.pending = None
            _raise(pending)
