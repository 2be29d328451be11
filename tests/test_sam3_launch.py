"""angioexp.backends.sam3.launch: the parent side of the subprocess protocol (events tailed live,
a callback that raises stops the whole child process group, status read back), with a light child
that speaks the protocol instead of SAM3's trainer. Needs no sam3 package."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest

from angioexp.backends.sam3.launch import EventTail, describe_exception, launch
from angioexp.errors import CheckpointLoadError, TrainingDiverged

FAKE_CHILD = textwrap.dedent('''
    """Writes one train event per 0.2 s, a val event at step 3; spawns a grandchild; status at the end."""
    import argparse, json, os, subprocess, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("config"); parser.add_argument("--status"); parser.add_argument("--num-gpus")
    args = parser.parse_args()
    out = os.path.dirname(args.status)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(os.path.join(out, "grandchild.pid"), "w").write(str(grandchild.pid))
    mode = open(args.config).read().strip()
    events = open(os.path.join(out, "events.jsonl"), "a")
    for step in range(6):
        kind = "val" if step == 3 else "train"
        line = json.dumps({"kind": kind, "step": step, "metrics": {f"{kind}/x": step}})
        events.write(line[:10]); events.flush(); time.sleep(0.05)  # a line written in two parts
        events.write(line[10:] + "\\n"); events.flush(); time.sleep(0.2)
    grandchild.kill()
    status = {"status": "ok"} if mode == "ok" else {"status": "diverged", "step": 5, "lr": 0.1, "events": 4, "history": []}
    json.dump(status, open(args.status, "w"))
''')


class Pruned(Exception):
    pass


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    (tmp_path / "fake_sam3_child.py").write_text(FAKE_CHILD)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    def run(mode: str, on_event=None):
        config = tmp_path / f"{mode}.txt"
        config.write_text(mode)
        return launch(config, tmp_path / f"out-{mode}", on_event=on_event, poll_seconds=0.05, module="fake_sam3_child")

    return run


def test_events_stream_and_status(fake):
    seen = []
    result = fake("ok", on_event=seen.append)
    assert result.returncode == 0 and result.status == {"status": "ok"}
    assert [(e["kind"], e["step"]) for e in seen] == [("train", 0), ("train", 1), ("train", 2), ("val", 3), ("train", 4), ("train", 5)]


def test_a_raising_callback_stops_the_process_group(fake, tmp_path):
    def on_event(event):
        if event["kind"] == "val":
            raise Pruned("val/AP75 too low")

    started = time.monotonic()
    result = fake("ok", on_event=on_event)
    assert isinstance(result.stopped_by_callback, Pruned)
    assert time.monotonic() - started < 20
    assert result.returncode != 0 and result.status["status"] == "stopped"
    pid = int((tmp_path / "out-ok" / "grandchild.pid").read_text())
    assert not _alive(pid)  # the dataloader-worker stand-in is gone too


def _alive(pid: int) -> bool:
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):  # killed; waits to be reaped by whoever adopted it
            return False
        time.sleep(0.1)
    return True


def test_diverged_status_is_reported(fake):
    result = fake("diverged")
    assert result.status["status"] == "diverged" and result.status["events"] == 4


def test_event_tail_waits_for_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []
    path.write_text('{"kind": "train", "st')
    assert tail.read() == []
    with open(path, "a") as handle:
        handle.write('ep": 1}\nnot json\n')
    assert tail.read() == [{"kind": "train", "step": 1}]


def test_child_errors_are_described():
    payload, code = describe_exception(TrainingDiverged("diverged", step=7, lr=0.01, events=9, history=[{"a": 1}]))
    assert code == 3 and payload["status"] == "diverged" and payload["step"] == 7
    payload, code = describe_exception(CheckpointLoadError("too few tensors"))
    assert code == 2 and payload["error_type"] == "CheckpointLoadError"
    payload, code = describe_exception(RuntimeError("boom"))
    assert code == 1 and json.dumps(payload)


def test_train_sam3_without_the_package_is_a_clear_error(monkeypatch):
    import angioexp.backends.sam3 as backend
    from angioexp.backends.sam3.run import train_sam3
    from angioexp.config import load_config
    from angioexp.errors import InputError

    monkeypatch.setattr(backend, "sam3_available", lambda: False)
    with pytest.raises(InputError, match="pip install 'angioexp\\[sam3\\]'"):
        train_sam3(load_config(overrides=["backend=sam3"]))


def test_errors_wrapped_by_hydra_are_unwrapped():
    try:
        try:
            raise CheckpointLoadError("refusing to start")
        except CheckpointLoadError as inner:
            raise RuntimeError("Error in call to target 'build_sam3_model'") from inner
    except RuntimeError as outer:
        payload, code = describe_exception(outer)
    assert code == 2 and payload["error_type"] == "CheckpointLoadError" and payload["message"] == "refusing to start"


# --- several GPU processes: a rank's error keeps its type and its report -------------------------------


def fail_on_a_rank(kind: str) -> None:
    """A rank body for spawn_ranks: rank 1 fails with ``kind``; rank 0 with what a peer's
    failure looks like from the other side."""
    from angioexp.checkpoints import LoadReport

    if int(os.environ["RANK"]) == 0:
        time.sleep(0.5)
        raise RuntimeError("Connection closed by peer")
    if kind == "diverged":
        raise TrainingDiverged("diverged", step=12, lr=0.001, events=9, history=[{"step": 12}])
    report = LoadReport(source="stage1.pth", model_tensors=10, loaded=["a"], unexpected=["seg_head.weight"])
    raise CheckpointLoadError("refusing to start from stage1.pth", report)


def diverge_now(rank: int) -> None:
    raise TrainingDiverged("diverged", step=12, lr=0.001, events=9)


def test_torch_multiprocessing_loses_the_error_type():
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException) as info:
        mp.start_processes(diverge_now, args=(), nprocs=1, start_method="spawn")
    assert not isinstance(info.value, TrainingDiverged) and "TrainingDiverged" in str(info.value)


@pytest.mark.parametrize("kind", ["diverged", "checkpoint"])
def test_rank_errors_reach_the_status(tmp_path, kind):
    import torch.multiprocessing as mp

    from angioexp.backends.sam3.launch import _rank_failure, spawn_ranks

    status = tmp_path / "status.json"
    with pytest.raises(mp.ProcessRaisedException):
        spawn_ranks(2, status, fail_on_a_rank, kind)
    payload, code = _rank_failure(status, 2)
    if kind == "diverged":
        assert code == 3 and payload["status"] == "diverged" and payload["step"] == 12 and payload["rank"] == 1
    else:
        assert code == 2 and payload["error_type"] == "CheckpointLoadError"
        assert payload["report"]["unexpected"] == ["seg_head.weight"]  # the load report survives
