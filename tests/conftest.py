"""Shared fixtures. Owned by the lead; area-specific fixtures live in each test module, shared
helpers (plain functions) in tests/helpers/.

The session fixtures run the real pipeline once (``angioexp synth`` → ``convert``) at a small
size so that every area tests against the same realistic data.

The suite runs on every core with pytest-xdist (``-n auto --dist loadgroup`` in pyproject.toml).
Each worker is its own process with its own session fixtures, temp folder (so its own model
cache and SQLite stores) and ``OMP_NUM_THREADS=1``; browsers and servers take free ports. What
workers could still share is grouped onto one worker in :func:`pytest_collection_modifyitems`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per test process: reproducible, and xdist's workers fill the cores instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_SIZE = 128  # px; synthetic studies are generated at this size for tests
TEST_CASES = 18


def pytest_collection_modifyitems(config, items):
    """xdist groups (``--dist loadgroup``): the tests of one module stay on one worker, so its
    module-scoped fixtures (trained models, datasets) are built once, not once per worker; and
    the tests marked ``postgres`` share one worker, since they share one PostgreSQL database
    (Optuna's schema is created on first use, and two creators at once race)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        group = "postgres" if item.get_closest_marker("postgres") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic study in the raw index.csv layout."""
    from angioexp.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth") / "study"
    generate(out, cases=TEST_CASES, seed=7, size=TEST_SIZE, frames=4)
    return out


@pytest.fixture(scope="session")
def coco_stage1(synth_dir, tmp_path_factory) -> Path:
    from angioexp.data.convert import convert

    out = tmp_path_factory.mktemp("coco1") / "coco"
    convert(synth_dir / "index.csv", out, stage=1)
    return out


@pytest.fixture(scope="session")
def coco_stage2(synth_dir, tmp_path_factory) -> Path:
    from angioexp.data.convert import convert

    out = tmp_path_factory.mktemp("coco2") / "coco"
    convert(synth_dir / "index.csv", out, stage=2)
    return out


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """models:/ and runs:/ downloads go to the session's temp folder, never the user's ~/.cache
    (session scope: module fixtures that train and resolve models run inside it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANGIOEXP_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        yield


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory):
    """An MLflow SQLite store migrated once per session (per xdist worker): creating a fresh one
    runs all of MLflow's schema migrations, seconds of CPU each time."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # creates + migrates the schema
    return path


@pytest.fixture()
def store_uri(_migrated_store, tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store (real MLflow, no mocks: a copy of the migrated template, an
    independent store) with artifacts under tmp_path."""
    import mlflow

    from tests.helpers.tracking_store import copy_of_migrated_store

    uri = copy_of_migrated_store(_migrated_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ANGIOEXP_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def mlflow_uri(store_uri) -> str:
    """The same store as ``store_uri`` (both names are used by the tests)."""
    return store_uri
