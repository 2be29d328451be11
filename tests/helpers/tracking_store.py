"""MLflow stores for tests: a copy of the session's migrated SQLite store, and a real
``mlflow server`` (the per-test stores ``store_uri`` / ``mlflow_uri`` are fixtures of
tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def copy_of_migrated_store(template: Path, folder: Path) -> str:
    """URI of a new SQLite store in ``folder``: a copy of ``template`` (the ``_migrated_store``
    fixture), so it skips MLflow's schema migrations — seconds of CPU per store — yet is a real,
    independent store."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, startup_timeout_s: float = 240):
    """A real ``mlflow server`` on a free 127.0.0.1 port over ``backend_store_uri``; yields its
    base URL once /health answers, and stops the whole process group on exit."""
    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
