"""The ``core`` backend: angioexp's own model and training loop (:mod:`angioexp.train.loop`), on
CPU or GPU, under ``torchrun`` with DDP. Implements :class:`angioexp.backends.Backend`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from angioexp.train.callbacks import Callback, TrainResult


def check(cfg) -> None:
    """Nothing to check: the core backend runs wherever angioexp is installed."""


def check_init(cfg, init: Path | None) -> None:
    from angioexp.train.loop import check_init_weights

    check_init_weights(cfg, init)


def train(cfg, *, data: Path, init: Path | None = None, callbacks: Iterable[Callback] = (),
          resume_from: str | Path | None = None, run_id: str | None = None) -> TrainResult:
    from angioexp.train.loop import train as train_loop

    return train_loop(cfg, coco_dir=data, callbacks=callbacks, resume_from=resume_from, init_checkpoint=init)
