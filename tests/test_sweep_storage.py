"""Sweep storages: heartbeats on the journal file, stale trials failed and retried, clear errors
for storages that cannot work, and the real PostgreSQL server CI starts."""

from __future__ import annotations

import os
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from angioexp.errors import InputError
from angioexp.sweep.storage import HEARTBEAT_ATTR, budget_lock, open_storage, redact
from angioexp.sweep.workers import budget_used, counts_toward_budget

PG_URL = os.environ.get("ANGIOEXP_TEST_POSTGRES_URL")


def _stale_trial_is_failed_and_retried(handle, study_name: str, grace: int) -> None:
    study = optuna.create_study(study_name=study_name, storage=handle.storage, direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    handle.storage.record_heartbeat(trial._trial_id)  # a worker beat once, then died
    alive = study.ask()  # a trial that keeps beating must survive
    alive.suggest_float("x", 0.0, 1.0)
    deadline = time.time() + grace + 1.5
    while time.time() < deadline:
        handle.storage.record_heartbeat(alive._trial_id)
        time.sleep(0.3)
    optuna.storages.fail_stale_trials(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[trial.number].state == TrialState.FAIL
    assert trials[alive.number].state == TrialState.RUNNING
    retries = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert len(retries) == 1 and retries[0].system_attrs["failed_trial"] == trial.number
    assert retries[0].params == trials[trial.number].params
    # The dead trial does not use up the budget; its WAITING retry and the live one do.
    assert not counts_toward_budget(trials[trial.number])
    assert budget_used(list(trials.values())) == 2
    # failing it again is a no-op (another worker got there first)
    optuna.storages.fail_stale_trials(study)
    assert len([t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]) == 1


def test_journal_storage_has_heartbeats_and_retries_stale_trials(tmp_path):
    handle = open_storage(f"journal:///{tmp_path / 'j.log'}", workers=4, heartbeat_interval=1, grace_period=1)
    assert handle.kind == "journal" and handle.supports_parallel_workers
    _stale_trial_is_failed_and_retried(handle, "stale", grace=1)
    # a second handle (another worker) replays the same journal, heartbeat attrs included
    other = open_storage(f"journal:///{tmp_path / 'j.log'}", workers=4)
    study = optuna.load_study(study_name="stale", storage=other.storage)
    assert any(HEARTBEAT_ATTR in t.system_attrs for t in study.get_trials(deepcopy=False))


def test_sqlite_storage_has_heartbeats(tmp_path):
    handle = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=1)
    assert handle.kind == "sqlite" and handle.lock_path is not None
    _stale_trial_is_failed_and_retried(handle, "stale", grace=1)


def test_storages_that_cannot_work_are_refused_clearly(tmp_path):
    with pytest.raises(InputError, match="SQLite is not safe for parallel writers"):
        open_storage(f"sqlite:///{tmp_path / 'o.db'}", workers=2)
    with pytest.raises(InputError, match="neither a database URL"):
        open_storage("optuna.db", workers=1)
    with pytest.raises(InputError, match="no file path"):
        open_storage("journal://", workers=2)
    t0 = time.monotonic()
    with pytest.raises(InputError) as info:  # a closed port on 127.0.0.1: refused at once
        open_storage("postgresql://angio:secret@127.0.0.1:1/optuna", workers=2)
    message = str(info.value)
    assert "cannot connect" in message and "secret" not in message and "***" in message
    assert time.monotonic() - t0 < 60  # bounded by the connect timeout, never a hang
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def _threads_overlap(critical_section, rounds: int, pause: float) -> bool:
    """Three threads enter ``critical_section()`` (a context manager) ``rounds`` times each:
    did two ever hold it at once?"""
    import threading

    inside, overlaps = [], []

    def worker():
        for _ in range(rounds):
            with critical_section():
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                time.sleep(pause)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return bool(overlaps)


def test_budget_lock_serialises_workers(tmp_path):
    handle = open_storage(f"journal:///{tmp_path / 'j.log'}", workers=2)
    # fcntl locks are per process; each budget_lock call opens its own descriptor, so threads exclude too
    assert not _threads_overlap(lambda: budget_lock(handle, "s"), rounds=5, pause=0.01)


def test_journal_write_lock_dies_with_a_killed_holder(tmp_path):
    """A SIGKILLed worker that held the journal's write lock must not stall the others (Optuna's
    own lock files wait 30 s, long enough to fail live trials for want of heartbeats)."""
    import signal
    import subprocess
    import sys

    journal = tmp_path / "j.log"
    handle = open_storage(f"journal:///{journal}", workers=2)
    optuna.create_study(study_name="s", storage=handle.storage)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from angioexp.sweep.storage import FlockJournalLock;"
        f"FlockJournalLock(Path({str(journal)!r})).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    t0 = time.monotonic()
    study = optuna.load_study(study_name="s", storage=handle.storage)
    study.ask()  # writes to the journal: needs the lock the dead process held
    assert time.monotonic() - t0 < 5


def test_journal_write_lock_excludes_threads_of_one_process(tmp_path):
    from contextlib import contextmanager

    from angioexp.sweep.storage import FlockJournalLock

    lock = FlockJournalLock(tmp_path / "j.log")

    @contextmanager
    def held():
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    assert not _threads_overlap(held, rounds=20, pause=0.002)


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="ANGIOEXP_TEST_POSTGRES_URL not set (CI starts a PostgreSQL server; see .ci/run)")
def test_postgresql_storage_heartbeats_and_lock():
    handle = open_storage(PG_URL, workers=4, heartbeat_interval=1, grace_period=2)
    assert handle.kind == "rdb" and handle.supports_parallel_workers
    name = f"pg-stale-{uuid.uuid4().hex[:8]}"
    _stale_trial_is_failed_and_retried(handle, name, grace=2)
    with budget_lock(handle, name):  # advisory lock on the server
        pass
    optuna.delete_study(study_name=name, storage=handle.storage)
