"""Errors that reach the user. Each names where the problem is: file, row, column or key."""

from __future__ import annotations

from pathlib import Path


class AngioexpError(Exception):
    """Base class for errors the CLI reports without a traceback (exit code 2)."""

    exit_code = 2


class InputError(AngioexpError):
    """Bad user input: a file, a CSV row, a JSON entry, a config key.

    The message starts with the location so that it can be pasted into an editor:
    ``index.csv: row 7, column 'mask_path': file not found: masks/c007.npy``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        row: int | None = None,
        column: str | None = None,
        key: str | None = None,
    ):
        self.file = str(file) if file is not None else None
        self.row = row
        self.column = column
        self.key = key
        self.reason = message
        where = []
        if self.file:
            where.append(self.file)
        loc = []
        if row is not None:
            loc.append(f"row {row}")
        if column is not None:
            loc.append(f"column '{column}'")
        if key is not None:
            loc.append(f"key '{key}'")
        prefix = ": ".join(where)
        if loc:
            prefix = f"{prefix}: {', '.join(loc)}" if prefix else ", ".join(loc)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(InputError):
    """A bad configuration key or value."""


class OutputError(AngioexpError):
    """An output the operating system refused to write (no permission, read-only, disk full).

    What was there before is intact (writes go to a temporary file first)."""


class RunBusy(AngioexpError):
    """Another live process owns this training run (see :mod:`angioexp.train.runlock`)."""


class TrainingDiverged(AngioexpError):
    """Raised when the NaN guard gives up (too many rollbacks). Carries the guard's record."""

    def __init__(self, message: str, *, step: int, lr: float, events: int, history=None):
        super().__init__(message)
        self.step = step
        self.lr = lr
        self.events = events
        self.history = list(history or [])


class CheckpointLoadError(AngioexpError):
    """A checkpoint that does not fit the model well enough (see the load report)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
