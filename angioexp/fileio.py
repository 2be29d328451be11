"""Atomic file/directory writes and root-confined path resolution.

Everything angioexp writes for the user goes through these helpers so that a crash or a bad
input never leaves a half-written file or directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from angioexp.errors import InputError


def resolve_under(root: str | Path, relative: str | Path, *, file=None, row=None, column=None) -> Path:
    """Resolve ``relative`` against ``root`` and refuse anything that escapes ``root``.

    Absolute paths and ``..`` segments are allowed only if the result stays inside ``root``
    (symlinks are resolved first, so a link pointing outside is refused too).
    """
    root_resolved = Path(root).resolve()
    text = str(relative).strip()
    if not text:
        raise InputError("empty path", file=file, row=row, column=column)
    candidate = (root_resolved / text).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise InputError(
            f"path '{text}' escapes its root folder {root_resolved}", file=file, row=row, column=column
        )
    return candidate


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``final``.

    On any exception the temporary directory is removed and ``final`` is untouched.
    With ``overwrite`` an existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        else:
            raise InputError(f"output already exists (pass --overwrite to replace it): {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp creates 0700; give the result the permissions a plain mkdir would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary sibling of ``final`` for writing; rename over ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        with open(tmp_name, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json_atomic(path: str | Path, payload, *, indent: int | None = 2) -> None:
    with atomic_file(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=indent, sort_keys=False, allow_nan=False)
        handle.write("\n")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)
