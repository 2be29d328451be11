"""A fast per-test MLflow SQLite store for the tracking tests.

Creating a fresh MLflow database runs all of MLflow's schema migrations (seconds of CPU per
test). The store is migrated once per session and copied for each test — the copy is a real,
independent SQLite store, so nothing is shared or mocked. Artifacts go under the test's tmp_path.
"""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory):
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # creates + migrates the schema
    return path


@pytest.fixture()
def store_uri(_migrated_store, tmp_path, monkeypatch) -> str:
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_migrated_store, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ANGIOEXP_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
