"""Tracking URI defaults, the up-front reachability check, experiment creation."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")


from angioexp.errors import InputError  # noqa: E402
from angioexp.tracking.uri import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, check_tracking_server, ensure_experiment, tracking_uri  # noqa: E402


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_default_uri_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(InputError, match="unreachable") as info:
        check_tracking_server(uri, timeout=2.0)
    assert info.value.key == "MLFLOW_TRACKING_URI"
    assert time.monotonic() - t0 < 30  # not MLflow's minutes of retries (generous: shared CI box)


def test_bad_local_stores(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_tracking_server(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    with pytest.raises(InputError, match="plain file store"):
        check_tracking_server(str(tmp_path / "mlruns"))
    check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")  # fine: SQLite creates the file


def test_experiment_gets_artifact_root_and_deleted_one_is_refused(store_uri, tmp_path):
    client = mlflow.MlflowClient()
    exp_id = ensure_experiment("angioexp-stage1")
    assert ensure_experiment("angioexp-stage1") == exp_id
    location = client.get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "mlartifacts" / "angioexp-stage1").resolve().as_uri()
    client.delete_experiment(exp_id)
    with pytest.raises(InputError, match="deleted") as info:
        ensure_experiment("angioexp-stage1")
    assert info.value.key == "tracking.experiment"
    assert Path(tmp_path / "mlflow.db").is_file()


def test_experiments_are_tagged_as_model_training_also_when_they_exist_already(store_uri):
    client = mlflow.MlflowClient()
    created = client.get_experiment(ensure_experiment("angioexp-stage1"))
    assert created.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # an experiment made elsewhere (an older angioexp, `mlflow run --experiment-name`) gets the tag
    older = client.create_experiment("angioexp-stage2")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert ensure_experiment("angioexp-stage2") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
