"""Optuna storage for sweeps: SQLite (one worker), journal file (local workers), PostgreSQL (many hosts).

``--storage`` accepts:

* ``sqlite:///path.db`` — the default for one worker (``sqlite:///optuna.db``);
* ``journal:///abs/path.log`` or a plain path ending in ``.log``/``.jsonl`` — Optuna's
  ``JournalFileBackend``; the default when ``--workers K > 1`` (SQLite is not safe for several
  writers on one file);
* ``postgresql://user@host:port/db`` (or any SQLAlchemy URL) — ``RDBStorage`` for workers on
  several machines.

Every storage has heartbeats, so a worker that dies mid-trial (SIGKILL, OOM killer, a lost host)
gets its RUNNING trial marked FAIL after ``grace_period`` seconds and re-queued once by
``RetryFailedTrialCallback`` (WAITING, same parameters). Optuna's ``JournalStorage`` has no
heartbeat of its own; :class:`HeartbeatJournalStorage` adds one by writing a timestamp system
attribute, which is all ``optuna.storages.fail_stale_trials`` needs.

``budget_lock`` serialises "count the trials, then ask for a new one" between workers, which is
what lets a study end with exactly ``--n-trials`` trials however many workers race for the last
slot (fcntl lock next to a file storage, a PostgreSQL advisory lock otherwise; both vanish with a
killed process).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock  # not re-exported; the documented lock_obj interface
from optuna.trial import TrialState

from angioexp.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_SQLITE = "sqlite:///optuna.db"
DEFAULT_JOURNAL = "optuna-journal.log"
HEARTBEAT_ATTR = "angioexp:heartbeat"
CONNECT_TIMEOUT_S = 5

try:  # Optuna >= 4.9 renamed the callback; keep older releases (pyproject allows >= 4.2) working.
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _RetryCallback
except ImportError:  # pragma: no cover - depends on the installed Optuna
    from optuna.storages import RetryFailedTrialCallback as _RetryCallback

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class StorageHandle:
    storage: BaseStorage
    url: str  # as given/resolved (journal:///…, sqlite:///…, postgresql://…)
    kind: str  # sqlite | journal | rdb
    lock_path: Path | None  # fcntl lock file for file storages
    engine: object | None = None  # SQLAlchemy engine for RDB (advisory lock)

    @property
    def display_url(self) -> str:
        return redact(self.url)

    @property
    def supports_parallel_workers(self) -> bool:
        return self.kind in ("journal", "rdb")


def redact(url: str) -> str:
    """Hide a password in ``scheme://user:password@host`` before printing a URL."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def default_url(workers: int) -> str:
    return f"journal:///{Path(DEFAULT_JOURNAL).resolve()}" if workers > 1 else DEFAULT_SQLITE


def retry_callback(max_retry: int | None = 1):
    """Re-queue a heartbeat-stale (killed) trial as WAITING with the same parameters."""
    return _RetryCallback(max_retry=max_retry)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """``JournalStorage`` plus heartbeats: a RUNNING trial whose last beat is older than the grace
    period is stale, exactly as RDBStorage decides it (trials that never beat are left alone)."""

    def __init__(self, backend, *, heartbeat_interval: int, grace_period: int, stale_callback=None):
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker already declared this trial stale; the tell will say so

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat is not None and now - float(beat) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self._stale_callback

    # Optuna < 4.9 spelt the abstract method this way.
    def get_failed_trial_callback(self) -> Callable | None:
        return self._stale_callback


def open_storage(
    url: str | None,
    *,
    workers: int = 1,
    heartbeat_interval: int = 10,
    grace_period: int = 60,
    max_retry: int | None = 1,
) -> StorageHandle:
    """Open (and check) a sweep storage. Errors are :class:`InputError` with the redacted URL."""
    url = (url or default_url(workers)).strip()
    stale_callback = retry_callback(max_retry)
    journal_path = _journal_path(url)
    if journal_path is not None:
        journal_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            backend = JournalFileBackend(str(journal_path), lock_obj=FlockJournalLock(journal_path))
            storage = HeartbeatJournalStorage(
                backend, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                stale_callback=stale_callback,
            )
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot open journal storage {journal_path}: {exc}") from None
        return StorageHandle(storage, f"journal:///{journal_path}", "journal", _lock_path(journal_path))

    if "://" not in url:
        raise InputError(
            f"storage '{redact(url)}' is neither a database URL (sqlite:///…, postgresql://…) "
            "nor a journal file (journal:///path.log)"
        )
    is_sqlite = url.startswith("sqlite")
    if is_sqlite and workers > 1:
        raise InputError(
            f"--workers {workers} with SQLite storage: SQLite is not safe for parallel writers; "
            f"omit --storage (a journal file is used) or pass journal:///path.log or a postgresql:// URL"
        )
    url = _with_available_driver(url)
    engine_kwargs: dict = {}
    if url.startswith(("postgresql", "postgres")):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    elif url.startswith("mysql"):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    elif is_sqlite:
        db = _sqlite_file(url)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 30}}
    try:
        storage = RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period, heartbeat_stale_trial_callback=stale_callback,
        )
    except TypeError:  # pragma: no cover - Optuna < 4.9 has only failed_trial_callback
        storage = RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period, failed_trial_callback=stale_callback,
        )
    except ImportError as exc:
        raise InputError(f"storage '{redact(url)}' needs a database driver that is not installed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean "cannot use it"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot connect to storage '{redact(url)}' (timeout {CONNECT_TIMEOUT_S} s): {first_line}") from None
    kind = "sqlite" if is_sqlite else "rdb"
    db = _sqlite_file(url) if is_sqlite else None
    return StorageHandle(storage, url, kind, _lock_path(db) if db else None, engine=storage.engine)


def _with_available_driver(url: str) -> str:
    """``postgresql://`` → the installed driver. SQLAlchemy 2.1 defaults to psycopg 3, 2.0 to
    psycopg2; angioexp's extras install psycopg2-binary, so spell the driver out when needed."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}{sep}{rest}"
    raise InputError(f"storage '{redact(url)}' needs a PostgreSQL driver: pip install psycopg2-binary")


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal://"):
        rest = url[len("journal://"):]
        if not rest or rest == "/":
            raise InputError(f"journal storage URL '{url}' has no file path (journal:///abs/path.log)")
        # journal:///abs/path → /abs/path ; journal://rel/path → rel/path
        return Path(rest[1:] if rest.startswith("//") else rest).resolve()
    if "://" not in url and url.endswith((".log", ".jsonl", ".journal")):
        return Path(url).resolve()
    return None


def _sqlite_file(url: str) -> Path | None:
    path = url.split("///", 1)[1] if "///" in url else ""
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


class FlockJournalLock(BaseJournalFileLock):
    """The journal file's write lock as a kernel ``flock``: it vanishes with a killed holder.

    Optuna's own file locks (a lock file created with O_EXCL, or a symlink) outlive a SIGKILLed
    worker; the others then wait ``grace_period`` (30 s) before breaking it, long enough for their
    own heartbeats to go stale and a live trial to be failed. Each acquire opens its own file
    description, so two threads of one process exclude each other too.
    """

    def __init__(self, journal_path: Path):
        self.path = journal_path.with_name(journal_path.name + ".flock")
        self._held = threading.local()

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._held.fd = fd
        return True

    def release(self) -> None:
        fd = getattr(self._held, "fd", None)
        if fd is None:
            return
        self._held.fd = None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".budget.lock")


@contextlib.contextmanager
def budget_lock(handle: StorageHandle, study_name: str) -> Iterator[None]:
    """Exclusive section across every worker of ``study_name`` (count trials, then ask)."""
    if handle.lock_path is not None:
        handle.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(handle.lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released by the kernel if we die
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    engine = handle.engine
    if engine is not None and engine.dialect.name == "postgresql":
        import sqlalchemy

        key = int.from_bytes(hashlib.sha1(f"angioexp-sweep:{study_name}".encode()).digest()[:8], "big", signed=True)
        with engine.connect() as conn:  # session-level lock; dropped with the connection
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    yield  # other databases: best effort (a rare overshoot by one trial per extra worker)


def fail_stale_trials(study: optuna.Study) -> None:
    optuna.storages.fail_stale_trials(study)
