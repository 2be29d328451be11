"""Shared fixtures. Owned by the lead; area-specific fixtures live in each test module.

The session fixtures run the real pipeline once (``angioexp synth`` → ``convert``) at a small
size so that every area tests against the same realistic data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests single-threaded and reproducible on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_SIZE = 128  # px; synthetic studies are generated at this size for tests
TEST_CASES = 18


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


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store (real MLflow, no mocks) with artifacts under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ANGIOEXP_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
