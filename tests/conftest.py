"""Shared fixtures. Owned by the lead; area-specific fixtures live in each test module, shared
helpers (plain functions) in tests/helpers/.

The session fixtures run the real pipeline once (``angioexp synth`` → ``convert``) at a small
size so that every area tests against the same realistic data.

The suite runs on every core with pytest-xdist (``-n auto --dist loadfile`` in pyproject.toml).
Each worker is its own process with its own session fixtures, temp folder (so its own model
cache and SQLite stores) and ``OMP_NUM_THREADS=1``; browsers and servers take free ports. What
workers could still share is kept on one worker by :func:`pytest_xdist_make_scheduler`.
"""

from __future__ import annotations

import os
import sys
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


# Test files whose tests share the one PostgreSQL test database (ANGIOEXP_TEST_POSTGRES_URL):
# Optuna creates its schema there on first use, and two creators at once race. (The MLflow-server
# test of test_reliability_load.py makes a database of its own.)
SHARED_POSTGRES_DATABASE = {"tests/test_sweep_run.py", "tests/test_sweep_storage.py"}


def pytest_sessionfinish(session, exitstatus):
    """Stop the test process's shared headless Chromium, if a browser test started one."""
    browser_check = sys.modules.get("tests.helpers.browser_check")
    if browser_check is not None:
        browser_check.close_browser()


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, plus one unit for the files in :data:`SHARED_POSTGRES_DATABASE`.

    A test file runs whole on one worker, so its module-scoped fixtures (trained models,
    datasets) are built once, not once per worker. (Not ``--dist loadgroup`` with
    ``xdist_group`` marks: with pytest 9.2 and pytest-xdist 3.8.0 the group suffix xdist writes
    into ``item._nodeid`` is ignored — ``Node.nodeid`` now reads ``_id`` — so every test would be
    scheduled on its own.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_unit(nodeid)

    return FileScheduling(config, log)


def scheduling_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or one unit for the PostgreSQL files."""
    file = nodeid.split("::", 1)[0]
    return "postgres-database" if file in SHARED_POSTGRES_DATABASE else file


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
