"""Training backends behind one interface: ``get_backend(cfg.backend).train(cfg, data=…, …)``.

    backend = get_backend("core")            # or "sam3"
    backend.check(cfg)                       # seconds: can this backend run here at all?
    backend.check_init(cfg, init)            # weights that do not fit fail before any run exists
    result = backend.train(cfg, data=coco_dir, init=weights, callbacks=[...],
                           resume_from=run_folder, run_id=mlflow_run_id)   # -> TrainResult

The caller (``angioexp train``, :mod:`angioexp.tracking.session`, the sweep's objective) prepares
the data (:func:`angioexp.data.prepare.prepare`) and resolves ``models:/…`` URIs to a weights file
(:func:`angioexp.tracking.models.resolve_weights`); a backend trains into ``cfg.train.out_dir``
and reports through :mod:`angioexp.train.callbacks` only.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterable, Protocol

from angioexp.errors import InputError
from angioexp.train.callbacks import Callback, TrainResult

# name → the module that implements :class:`Backend` (imported on first use: sam3 is heavy)
BACKENDS = {"core": "angioexp.backends.core", "sam3": "angioexp.backends.sam3.backend"}


class Backend(Protocol):
    def check(self, cfg) -> None:
        """Raise a one-line error when this backend cannot run here (e.g. sam3 not installed)."""

    def check_init(self, cfg, init: Path | None) -> None:
        """Raise :class:`~angioexp.errors.CheckpointLoadError` when ``init`` does not fit the model."""

    def train(self, cfg, *, data: Path, init: Path | None = None, callbacks: Iterable[Callback] = (),
              resume_from: str | Path | None = None, run_id: str | None = None) -> TrainResult:
        """Train into ``cfg.train.out_dir`` on the COCO folder ``data``, starting from ``init`` (a
        weights file) or resuming the run folder ``resume_from``. ``run_id``: the MLflow run a
        backend that logs by itself (sam3) streams into."""


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r} (expected one of: {', '.join(BACKENDS)})", key="backend")
    return importlib.import_module(BACKENDS[name])
