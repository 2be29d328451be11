"""Run SAM3's trainer on a generated config, in a subprocess of its own.

Why a subprocess per run (or sweep trial): SAM3's launcher calls
``torch.multiprocessing.set_start_method("spawn")`` (a second call in the same process raises)
and its trainer initialises ``torch.distributed`` without ever destroying the process group, so
a second run in the same process fails. The child also gets the CPU shims
(:mod:`angioexp.backends.sam3.cpu`) without touching the parent's torch.

Protocol: the child appends JSON lines to ``<out>/events.jsonl`` (train steps, evaluations, NaN
events, the init load report) and writes ``<out>/status.json`` when it ends:
``{"status": "ok" | "error" | "diverged", ...}``. The parent tails the events and hands them to
a callback, which may raise (e.g. ``optuna.TrialPruned``) to stop the child: the whole process
group (dataloader workers included) is terminated.

    python -m angioexp.backends.sam3.launch OUT/sam3_config/angioexp_sam3.yaml --status OUT/status.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_DIVERGED = 0, 1, 2, 3


# --- child side --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(config_path: str) -> None:
    import torch
    from hydra.utils import instantiate

    from angioexp.backends.sam3.config_gen import compose, register_resolvers
    from angioexp.backends.sam3.cpu import apply_cpu_shims

    apply_cpu_shims()
    register_resolvers()
    cfg = compose(config_path)
    try:
        trainer = instantiate(cfg.trainer, _recursive_=False)
        trainer.run()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def rank_status_path(status: Path, rank: int) -> Path:
    return status.with_name(f"{status.stem}.rank{rank}{status.suffix}")


def _run_rank(local_rank: int, port: int, world_size: int, status: str, target, *args) -> None:
    """One rank: what SAM3's ``single_proc_run`` does, plus shims and a clean process-group exit.

    With several ranks, ``torch.multiprocessing`` hands the parent only a
    ``ProcessRaisedException`` carrying the traceback text: a divergence would read as an error
    and a failed checkpoint load would lose its report. Each rank therefore writes its own
    status (the same payload as :func:`describe_exception`) before re-raising."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    try:
        target(*args)
    except BaseException as exc:
        if world_size > 1:
            payload, code = describe_exception(exc)
            _write_status(rank_status_path(Path(status), local_rank), {**payload, "rank": local_rank, "exit_code": code})
        raise


def _rank_failure(status: Path, world_size: int) -> tuple[dict, int] | None:
    """The failure to report from the ranks' own statuses: an angioexp error (divergence, a
    checkpoint that does not fit …) before a generic one, which is often just another rank
    losing its peer; then the lowest rank."""
    found = []
    for rank in range(world_size):
        payload = _read_status(rank_status_path(status, rank))
        if payload:
            code = int(payload.pop("exit_code", EXIT_ERROR))
            found.append((code == EXIT_ERROR, rank, payload, code))
    if not found:
        return None
    _, _, payload, code = min(found, key=lambda item: item[:2])
    return payload, code


def spawn_ranks(world_size: int, status: Path, target, *args) -> None:
    """``target(*args)`` in ``world_size`` spawned ranks (one per GPU) on a free local port."""
    import torch.multiprocessing as mp

    for rank in range(world_size):  # a resumed run: no stale rank status
        rank_status_path(status, rank).unlink(missing_ok=True)
    mp.start_processes(_run_rank, args=(free_port(), world_size, str(status), target, *args),
                       nprocs=world_size, start_method="spawn")


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run SAM3's trainer on a generated config")
    parser.add_argument("config")
    parser.add_argument("--status", required=True)
    parser.add_argument("--num-gpus", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    status = Path(args.status)
    try:
        if args.num_gpus > 1:
            spawn_ranks(args.num_gpus, status, _train, args.config)
        else:
            _run_rank(0, free_port(), 1, str(status), _train, args.config)
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        payload, code = describe_exception(exc)
        if args.num_gpus > 1:
            payload, code = _rank_failure(status, args.num_gpus) or (payload, code)
        _write_status(status, payload)
        traceback.print_exc()
        return code
    _write_status(status, {"status": "ok"})
    return EXIT_OK


def _angioexp_cause(exc: BaseException) -> BaseException:
    """Hydra wraps errors raised while instantiating (a bad checkpoint in the model builder) in
    InstantiationException; report the angioexp error underneath, if there is one."""
    from angioexp.errors import AngioexpError

    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        if isinstance(current, AngioexpError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return exc


def describe_exception(exc: BaseException) -> tuple[dict, int]:
    from angioexp.errors import AngioexpError, CheckpointLoadError, TrainingDiverged

    exc = _angioexp_cause(exc)
    if isinstance(exc, TrainingDiverged):
        return {"status": "diverged", "message": str(exc), "step": exc.step, "lr": exc.lr,
                "events": exc.events, "history": exc.history}, EXIT_DIVERGED
    payload = {"status": "error", "error_type": type(exc).__name__, "message": str(exc),
               "traceback": traceback.format_exc(limit=30)}
    if isinstance(exc, CheckpointLoadError) and exc.report is not None:
        payload["report"] = exc.report.as_dict()
    if isinstance(exc, AngioexpError):
        return payload, EXIT_INPUT
    return payload, EXIT_ERROR


def _write_status(path: Path, payload: dict) -> None:
    from angioexp.fileio import write_json_atomic

    write_json_atomic(path, json.loads(json.dumps(payload, default=str)))


# --- parent side -------------------------------------------------------------------------------


@dataclass
class LaunchResult:
    returncode: int
    status: dict
    events: list[dict] = field(default_factory=list)
    stopped_by_callback: BaseException | None = None
    log_path: Path | None = None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


class EventTail:
    """Reads the JSON lines appended to ``events.jsonl`` since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
            self.offset = handle.tell()
        text = self.partial + chunk
        lines = text.split("\n")
        self.partial = lines.pop()  # an incomplete last line waits for the next read
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("ignoring a malformed event line: %.200s", line)
        return out


def launch(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    on_event: Callable[[dict], None] | None = None,
    num_gpus: int = 1,
    poll_seconds: float = 1.0,
    env: dict[str, str] | None = None,
    timeout_seconds: float | None = None,
    module: str = "angioexp.backends.sam3.launch",
) -> LaunchResult:
    """Start the trainer subprocess, stream its events to ``on_event``, wait for it to end.

    If ``on_event`` raises, the child's process group is terminated and the exception is kept in
    ``LaunchResult.stopped_by_callback`` (the caller re-raises it after cleaning up). ``module`` is
    the child's entry point (tests substitute a light one that speaks the same protocol).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    status_path = out_dir / "status.json"
    status_path.unlink(missing_ok=True)
    log_path = out_dir / "sam3_train.log"
    cmd = [sys.executable, "-m", module, str(config_path),
           "--status", str(status_path), "--num-gpus", str(num_gpus)]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", **(env or {})}
    events_path = out_dir / "events.jsonl"
    if events_path.exists():  # a resumed run: keep the old events, read only the new ones
        events_path.rename(out_dir / f"events.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    tail = EventTail(events_path)
    events: list[dict] = []
    stopped: BaseException | None = None
    started = time.monotonic()
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        try:
            while True:
                done = proc.poll() is not None
                for event in tail.read():
                    events.append(event)
                    if on_event is not None and stopped is None:
                        try:
                            on_event(event)
                        except BaseException as exc:  # noqa: BLE001 - pruning, KeyboardInterrupt …
                            stopped = exc
                if stopped is not None or done:
                    break
                if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
                    stopped = TimeoutError(f"SAM3 training exceeded {timeout_seconds:.0f} s")
                    break
                time.sleep(poll_seconds)
        except BaseException as exc:  # noqa: BLE001 - e.g. Ctrl-C in the parent
            stopped = exc
        finally:
            if proc.poll() is None:
                terminate_group(proc)
    status = _read_status(status_path)
    if not status:
        status = {"status": "error" if stopped is None else "stopped", "error_type": "ChildExited",
                  "message": f"the SAM3 trainer exited with code {proc.returncode} without a status"}
    return LaunchResult(proc.returncode, status, events, stopped, log_path)


def terminate_group(proc: subprocess.Popen, grace_seconds: float = 30.0) -> None:
    """SIGTERM the child's process group (it was started in a new session), SIGKILL if it lingers."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


if __name__ == "__main__":
    sys.exit(child_main())
