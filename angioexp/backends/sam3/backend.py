"""The ``sam3`` backend behind :class:`angioexp.backends.Backend`: an adapter onto
:func:`angioexp.backends.sam3.run.train_sam3` (SAM3's trainer in a subprocess)."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Iterable

from angioexp.train.callbacks import Callback, TrainResult


def check(cfg) -> None:
    """The sam3 package, at the supported release, before any data or run is made for it."""
    from angioexp.backends.sam3 import SAM3_MISSING, check_sam3_version, sam3_available
    from angioexp.errors import InputError

    if not sam3_available():
        raise InputError(SAM3_MISSING, key="backend")
    check_sam3_version()


def check_init(cfg, init: Path | None) -> None:
    """SAM3's weights are checked by the trainer itself, before its first step (load report)."""


def train(cfg, *, data: Path, init: Path | None = None, callbacks: Iterable[Callback] = (),
          resume_from: str | Path | None = None, run_id: str | None = None) -> TrainResult:
    from angioexp.backends.sam3.run import train_sam3

    # train_sam3 reads its run folder, resume and init weights the way `angioexp train` names them;
    # with run_id, SAM3's trainer streams its scalars into that run itself (RunInfo.extra
    # "metrics_logged_by_backend") and the callbacks add artifacts, plots and the registry.
    args = Namespace(out=str(cfg.train.out_dir), resume=str(resume_from) if resume_from is not None else None,
                     init_from=str(init) if init is not None else None)
    return train_sam3(cfg, args, callbacks=callbacks, run_id=run_id, coco_dir=data)
