"""Atomic file/directory writes and root-confined path resolution.

Everything angioexp writes for the user goes through these helpers so that a crash or a bad
input never leaves a half-written file or directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from angioexp.errors import InputError, OutputError

# errno values that mean "this location cannot take the output", not a bug
_REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR, errno.EISDIR}


def refuse_output_over_inputs(out: str | Path, inputs=(), *, option: str = "--out") -> Path:
    """Refuse an output path that is, contains or lies inside one of ``inputs``, or that is (or
    contains) the current folder; return it resolved.

    Every command with ``--out``/``--overwrite`` calls this before it reads or writes anything:
    replacing such a folder (``--overwrite``, or a run writing its checkpoints there) would delete
    or mix the user's own data. ``inputs`` are files or folders; ``None`` entries are skipped.
    An output inside the current folder is the normal case and is allowed.
    """
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        where = "is the current folder" if target == cwd else f"contains the current folder {cwd}"
        raise InputError(f"{option} {where}; choose a new folder for the output", file=out)
    for item in inputs:
        if item is None or str(item).strip() == "":
            continue
        source = Path(item).expanduser().resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise InputError(
            f"{option} {relation} the input {source}; writing there could overwrite or delete it — "
            "choose a folder outside the inputs", file=out,
        )
    return target


def local_store_file(url: str | None) -> Path | None:
    """The local file behind a store URL (``sqlite:///x.db``, ``journal:///x.log``, a plain path),
    or None for a server (``http://``, ``postgresql://``) — for :func:`refuse_output_over_inputs`."""
    if not url:
        return None
    for scheme in ("sqlite:///", "journal:///", "file://"):
        if url.startswith(scheme):
            return Path(url[len(scheme):])
    return None if "://" in url else Path(url)


def unwritable(path: str | Path, exc: OSError) -> OutputError:
    """The one-line error for an output location the OS refuses (permissions, read-only, full)."""
    reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    return OutputError(f"{path}: cannot write here ({reason}); nothing there was changed")


def make_dirs(folder: str | Path) -> Path:
    """``mkdir -p`` whose failures (a file in the way, no permission, read-only, full) are one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno not in _REFUSED_WRITES | {errno.EEXIST}:
            raise
        raise unwritable(folder, exc) from None
    return folder


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
    refuse_output_over_inputs(final)  # never replace the current folder or one above it
    if final.exists() and not overwrite:
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        else:
            raise InputError(f"output already exists (pass --overwrite to replace it): {final}")
    make_dirs(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        if exc.errno not in _REFUSED_WRITES:
            raise
        raise unwritable(final.parent, exc) from None
    # mkdtemp creates 0700; give the result the permissions a plain mkdir would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _REFUSED_WRITES:
            raise unwritable(final, exc) from None
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
    make_dirs(final.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        if exc.errno not in _REFUSED_WRITES:
            raise
        raise unwritable(final.parent, exc) from None
    os.close(fd)
    try:
        with open(tmp_name, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError) and exc.errno in _REFUSED_WRITES:
            raise unwritable(final, exc) from None
        raise


def write_json_atomic(path: str | Path, payload, *, indent: int | None = 2) -> None:
    with atomic_file(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=indent, sort_keys=False, allow_nan=False)
        handle.write("\n")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)
