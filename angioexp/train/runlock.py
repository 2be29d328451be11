"""One writer per training run: ``<out_dir>/run.lock``.

The process training a run holds an exclusive ``fcntl`` lock on ``run.lock`` for its whole life,
and writes its pid, host, start time and command into the file so a refused second writer can
name the owner. The kernel drops the lock when the owner dies — ``kill -9`` and power loss
included — so a lock left by a dead process is recognised as stale without guessing from pids
(which get reused) and taken over. The file is emptied, never deleted, on release: deleting it
would let two processes lock two different files of the same name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import itertools
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from angioexp.errors import RunBusy
from angioexp.fileio import make_dirs, unwritable

LOCK_FILE = "run.lock"


def _rank_zero() -> bool:
    """Under torchrun only rank 0 locks and checks: the other ranks are the same writer (and
    would find the folder rank 0 has just claimed)."""
    return os.environ.get("RANK", "0") == "0"


def owner_of(out_dir: str | Path) -> dict | None:
    """The recorded owner of a run folder's lock, or None when no live process holds it."""
    path = Path(out_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:  # flock needs no write access
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_owner(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _read_owner(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except ValueError:
        return {}


def refuse_if_owned(out_dir: str | Path) -> None:
    """Raise :class:`RunBusy` naming the live process that holds ``out_dir``'s lock, if any."""
    owner = owner_of(out_dir)
    if owner is not None:
        raise _busy(out_dir, owner)


def _busy(out_dir, owner: dict) -> RunBusy:
    return RunBusy(f"{out_dir}: this run is being written by another process ({describe(owner)}); "
                   "wait for it to finish or stop it first")


def describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('started', '?')}"
            f" ({owner.get('command', '?')})")


@contextlib.contextmanager
def run_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``out_dir/run.lock`` for the duration; raise :class:`RunBusy` naming a live owner.

    Only rank 0 of a distributed job locks (the other ranks are part of the same writer).
    """
    if not _rank_zero():
        yield Path(out_dir) / LOCK_FILE
        return
    out_dir = Path(out_dir)
    path = out_dir / LOCK_FILE
    make_dirs(out_dir)
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise unwritable(out_dir, exc) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out_dir, _read_owner(handle)) from None
        # a previous owner that died left its record: the lock itself was free, so it is stale
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        }))
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def refuse_foreign_run_folder(out_dir: str | Path) -> None:
    """A new run may not write into a folder that holds another run: it would overwrite that
    run's checkpoints, and a later ``--resume`` of it would continue from foreign weights."""
    from angioexp.errors import InputError

    if not _rank_zero():
        return
    out_dir = Path(out_dir)
    marks = [name for name in ("mlflow_run.json", "checkpoints/last.pt", "checkpoints/best.pt", "config.yaml")
             if (out_dir / name).exists()]
    refuse_if_owned(out_dir)
    if marks:
        run_file = out_dir / "mlflow_run.json"
        which = ""
        if run_file.is_file():
            try:
                which = f" (MLflow run {json.loads(run_file.read_text(encoding='utf-8')).get('run_id')})"
            except (OSError, ValueError):
                pass
        raise InputError(f"this folder holds another run{which} ({', '.join(marks)}); continue it with "
                         f"`angioexp train --resume {out_dir}` or choose a new --out", file=out_dir, key="--out")


def claim_new_folder(base: str | Path) -> Path:
    """``base``, else ``base-2``, ``base-3`` …: the first that did not exist, created atomically, so
    two runs started in the same second on the same data get a folder each."""
    base = Path(base)
    if not _rank_zero():
        return base
    make_dirs(base.parent)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise unwritable(candidate, exc) from None
