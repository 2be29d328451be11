"""Sweep workers: the ask → train → tell loop, and K local worker processes.

Why not ``study.optimize(n_trials=…)``: its ``n_trials`` counts per process, and
``MaxTrialsCallback`` is checked only after a trial ends, so K workers overshoot by up to K-1
trials and a killed worker's trial leaves a hole. Here each worker, holding the study's budget
lock (``storage.budget_lock``), counts the trials that use up the budget and only then asks for a
new one, so the study ends with exactly ``--n-trials`` of them:

* counted: COMPLETE, PRUNED (incl. NaN), RUNNING, WAITING, and FAIL trials whose failure is
  ours (crash / oom) — a trial that raises is an answer too;
* not counted: FAIL trials of a killed worker (stale heartbeat). Those are re-queued once as
  WAITING with the same parameters (``RetryFailedTrialCallback``) and run by whoever asks next.

A worker with nothing left to ask for waits while other trials are RUNNING (polling
``fail_stale_trials``), so a trial whose worker dies is still retried before the sweep ends.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from angioexp.sweep.objective import Objective
from angioexp.sweep.storage import StorageHandle, budget_lock, fail_stale_trials

log = logging.getLogger(__name__)

COUNTED_FAILURES = ("crash", "oom")


def counts_toward_budget(trial: FrozenTrial) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("failure") in COUNTED_FAILURES


def budget_used(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if counts_toward_budget(t))


def finished_count(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if counts_toward_budget(t) and t.state.is_finished())


class _Heartbeat:
    """Beats for one trial every ``interval`` s in a daemon thread (storages with heartbeats)."""

    def __init__(self, storage, trial_id: int):
        self.storage = storage if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() else None
        self.trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.storage is not None:
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.trial_id}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is not worth killing the trial
                log.debug("heartbeat of trial %d failed: %s", self.trial_id, exc)
            if self._stop.wait(interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass
class WorkerStats:
    ran: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> TrialState:
    """Run one asked trial to its end and tell the storage. KeyboardInterrupt is re-raised."""
    t0 = time.time()
    state, values, note = TrialState.FAIL, None, ""
    with _Heartbeat(study._storage, trial._trial_id):
        try:
            values = objective(trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned as exc:
            state, note = TrialState.PRUNED, str(exc)
        except KeyboardInterrupt:
            _tell(study, trial, TrialState.FAIL, None)
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker saw no heartbeat for too long, failed this trial and re-queued its
            # parameters; the retry is someone else's now, so this worker just moves on.
            log.warning("trial %d was declared stale by another worker (no heartbeat for too long); dropped here, retried as a new trial", trial.number)
            return TrialState.FAIL
        except Exception as exc:  # noqa: BLE001 - a trial that raises fails; the study goes on
            note = f"{type(exc).__name__}: {exc}"
            if "failure" not in trial.user_attrs:  # raised before the objective could classify it
                # (a FAIL without `failure` looks like a dead worker's: it would not count
                # towards --n-trials, and a deterministic error would loop forever)
                trial.set_user_attr("failure", "crash")
                trial.set_user_attr("outcome", "crash")
                trial.set_user_attr("error", note[:2000])
    _tell(study, trial, state, values)
    shown = ""
    if values is not None:
        shown = " ".join(f"{m}={v:.4g}" for m, v in zip(objective.ctx.space.metrics, values if isinstance(values, list) else [values]))
    outcome = trial.user_attrs.get("outcome", state.name.lower())
    log.info("trial %d %s%s%s (%.0f s)", trial.number, state.name, f" [{outcome}]" if outcome not in ("complete", "pruned") else "",
             f" {shown}" if shown else (f": {note}" if note else ""), time.time() - t0)
    return state


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        # "Heartbeat … supposed to be used with Study.optimize": we beat ourselves (_Heartbeat).
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


def _tell(study, trial, state, values) -> None:
    try:
        if state == TrialState.COMPLETE:
            study.tell(trial, values)
        else:
            study.tell(trial, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was declared stale by another worker (no heartbeat for too long); its result is dropped", trial.number)


def run_worker(
    study: optuna.Study,
    handle: StorageHandle,
    objective: Objective,
    *,
    n_trials: int,
    deadline: float | None = None,
    poll_seconds: float = 2.0,
    max_idle_wait: float = 3600.0,
) -> WorkerStats:
    """Ask/tell until the study holds ``n_trials`` budget-counted trials (or the deadline)."""
    stats = WorkerStats()
    idle_since: float | None = None
    last_running: set[int] = set()
    while True:
        if deadline is not None and time.time() >= deadline:
            log.info("worker %d: --timeout reached", objective.ctx.worker_index)
            break
        with budget_lock(handle, study.study_name):
            fail_stale_trials(study)  # a dead worker's trial → FAIL + a WAITING retry
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            trial = _ask(study) if waiting or budget_used(trials) < n_trials else None
        if trial is None:
            running = {t.number for t in trials if t.state == TrialState.RUNNING}
            if not running:
                break
            # Another worker's trial may still die and come back as WAITING: stay until it ends.
            if running != last_running:
                idle_since, last_running = time.time(), running
            elif time.time() - (idle_since or time.time()) > max_idle_wait:
                log.warning("worker %d: trials %s still RUNNING after %.0f s; leaving them", objective.ctx.worker_index, sorted(running), max_idle_wait)
                break
            time.sleep(poll_seconds)
            continue
        idle_since, last_running = None, set()
        state = run_trial(study, trial, objective)
        stats.ran += 1
        stats.complete += state == TrialState.COMPLETE
        stats.pruned += state == TrialState.PRUNED
        stats.failed += state == TrialState.FAIL
    return stats


# ---------------------------------------------------------------------------------------------
# K local worker processes


@dataclass
class WorkerProcess:
    index: int
    proc: subprocess.Popen


def spawn_workers(argv_for: list[list[str]], *, env: dict | None = None) -> list[WorkerProcess]:
    """Start one ``python -m angioexp.sweep …`` process per argument list."""
    workers = []
    for i, argv in enumerate(argv_for):
        proc = subprocess.Popen([sys.executable, "-m", "angioexp.sweep", *argv], env=env or os.environ.copy())
        workers.append(WorkerProcess(i, proc))
        log.info("worker %d: pid %d", i, proc.pid)
    return workers


def wait_workers(workers: list[WorkerProcess]) -> dict[int, int]:
    """Wait for every worker; Ctrl-C is passed on to them. Returns {index: return code}."""
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(workers):
            for w in workers:
                if w.index in codes:
                    continue
                rc = w.proc.poll()
                if rc is None:
                    continue
                codes[w.index] = rc
                if rc < 0:
                    name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
                    log.warning("worker %d (pid %d) was killed by %s; its trial is retried by the others", w.index, w.proc.pid, name)
                elif rc != 0:
                    log.warning("worker %d (pid %d) exited with code %d", w.index, w.proc.pid, rc)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGINT)
        for w in workers:
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
        raise
    return codes
