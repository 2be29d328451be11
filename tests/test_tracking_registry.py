"""LoggedModel → registry → aliases, resolving models:/ URIs back to weights, `angioexp promote`.

Real MLflow on a temp SQLite store; the "trained" checkpoints are small real torch modules.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

mlflow = pytest.importorskip("mlflow")

torch = pytest.importorskip("torch")

from angioexp.checkpoints import extract_state_dict, read_checkpoint  # noqa: E402
from angioexp.config import load_config, to_dict  # noqa: E402
from angioexp.errors import InputError  # noqa: E402
from angioexp.tracking.models import (  # noqa: E402
    CHALLENGER,
    CHAMPION,
    TAG_DECISION,
    log_trained_model,
    register_and_alias,
    resolve_model,
)
from angioexp.tracking.promote import promote  # noqa: E402
from angioexp.tracking.uri import ensure_experiment  # noqa: E402


def _checkpoint(tmp_path, seed: int, step: int = 20):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = load_config()
    path = tmp_path / f"ckpt_{seed}.pt"
    torch.save({"model": net.state_dict(), "optimizer": {}, "step": step, "config": to_dict(cfg)}, path)
    return path, net.state_dict(), cfg


def _train_and_register(tmp_path, seed: int, ap75_tol: float, stage: int = 1):
    path, state, cfg = _checkpoint(tmp_path, seed)
    cfg.stage = stage
    with mlflow.start_run(experiment_id=ensure_experiment(f"angioexp-stage{stage}")) as run:
        mlflow.log_metrics({"val/AP75_tol": ap75_tol, "val/AP75": ap75_tol / 4}, step=20)
        info = log_trained_model(path, cfg)
        reg = register_and_alias(info, cfg, metrics={"val/AP75_tol": ap75_tol, "val/AP75": ap75_tol / 4})
    return reg, state, run.info.run_id, info


def test_versions_aliases_and_decisions(store_uri, tmp_path):
    client = mlflow.MlflowClient()
    first, state1, run1, info1 = _train_and_register(tmp_path, seed=1, ap75_tol=0.40)
    assert (first.name, first.version, first.champion) == ("angio-stage1", "1", True)

    worse, *_ = _train_and_register(tmp_path, seed=2, ap75_tol=0.30)
    assert worse.champion is False and worse.previous_champion == "1"
    assert str(client.get_model_version_by_alias("angio-stage1", CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias("angio-stage1", CHALLENGER).version) == "2"
    assert client.get_model_version("angio-stage1", "2").tags[TAG_DECISION].startswith("kept v1")

    better, state3, *_ = _train_and_register(tmp_path, seed=3, ap75_tol=0.55)
    assert better.champion is True
    mv3 = client.get_model_version_by_alias("angio-stage1", CHAMPION)
    assert str(mv3.version) == "3" and set(mv3.aliases) == {CHAMPION, CHALLENGER}
    assert "promoted" in mv3.tags[TAG_DECISION] and "beats v1" in mv3.tags[TAG_DECISION]
    assert mv3.tags["primary_metric"] == "val/AP75_tol" and float(mv3.tags["primary_value"]) == 0.55
    assert "moved to v3" in client.get_model_version("angio-stage1", "1").tags["alias.champion"]
    assert client.get_registered_model("angio-stage1").description.startswith("Stage 1")

    # the LoggedModel carries the run's metrics at its step, and is the run's output
    logged = client.get_logged_model(info1.model_id)
    assert logged.source_run_id == run1
    assert {m.key for m in logged.metrics} >= {"val/AP75_tol", "val/AP75"}

    # the champion's weights come back as a plain state dict (weights_only=True)
    resolved = resolve_model("models:/angio-stage1@champion", dst=tmp_path / "dl")
    assert (resolved.model_name, resolved.version, resolved.short) == ("angio-stage1", "3", "s1v3")
    weights = read_checkpoint(resolved.weights)
    assert set(weights) == set(state3)
    assert all(torch.equal(weights[k], state3[k]) for k in state3)
    assert resolved.config["stage"] == 1
    assert torch.load(resolved.weights, weights_only=True).keys() == state3.keys()

    by_version = resolve_model("models:/angio-stage1/1", dst=tmp_path / "dl1")
    assert all(torch.equal(extract_state_dict(read_checkpoint(by_version.weights))[k], state1[k]) for k in state1)
    by_id = resolve_model(f"models:/{info1.model_id}", dst=tmp_path / "dl2")
    assert by_id.run_id == run1


def test_downloads_go_to_one_cache_entry_per_model(store_uri, tmp_path, monkeypatch):
    """Without dst, models:/ downloads land in the model cache once per model (registered and
    logged models are immutable) and leave nothing behind in the temp dir; runs:/ artifacts can
    change, so they are fetched again into the same entry."""
    import os
    import tempfile

    from angioexp.tracking.models import model_cache_dir

    cache = tmp_path / "cache"
    monkeypatch.setenv("ANGIOEXP_MODEL_CACHE", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    _, state1, run1, info1 = _train_and_register(tmp_path, seed=1, ap75_tol=0.4)
    assert model_cache_dir() == cache

    first = resolve_model("models:/angio-stage1@champion")
    again = resolve_model("models:/angio-stage1/1")
    by_id = resolve_model(f"models:/{info1.model_id}")
    assert first.weights == again.weights == by_id.weights  # one entry: the version's logged model
    assert first.weights.parent.parent == cache and first.config["stage"] == 1 and first.info
    assert all(torch.equal(extract_state_dict(read_checkpoint(first.weights))[k], state1[k]) for k in state1)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith(info1.model_id), entries
    mtime = os.stat(first.weights).st_mtime_ns
    assert os.stat(resolve_model("models:/angio-stage1@champion").weights).st_mtime_ns == mtime  # not re-downloaded

    # runs:/: a changed artifact is seen on the next resolve, in the same cache entry
    client = mlflow.MlflowClient()
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    client.log_artifact(run1, str(tmp_path / "weights.pt"), artifact_path="init")
    one = resolve_model(f"runs:/{run1}/init/weights.pt")
    assert torch.equal(torch.load(one.weights, weights_only=True)["w"], torch.zeros(2)) and one.run_id == run1
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    client.log_artifact(run1, str(tmp_path / "weights.pt"), artifact_path="init")
    two = resolve_model(f"runs:/{run1}/init/weights.pt")
    assert two.weights == one.weights and torch.equal(torch.load(two.weights, weights_only=True)["w"], torch.ones(2))
    assert len(list(cache.iterdir())) == 2  # no half-written or superseded entries left
    assert list((tmp_path / "tmp").iterdir()) == []

    # a failed download names the URI and leaves no entry; an unusable cache names its variable
    with pytest.raises(InputError, match="cannot download") as info:
        resolve_model(f"runs:/{run1}/init/missing.pt")
    assert f"runs:/{run1}/init/missing.pt" in str(info.value) and len(list(cache.iterdir())) == 2
    assert not any(p.name.startswith(".") for p in cache.iterdir())
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("ANGIOEXP_MODEL_CACHE", str(tmp_path / "a-file" / "models"))
    with pytest.raises(InputError, match="as the model cache") as info:
        resolve_model("models:/angio-stage1/1")
    assert info.value.key == "ANGIOEXP_MODEL_CACHE" and str(tmp_path / "a-file") in str(info.value)


def test_non_finite_primary_metric_never_becomes_champion(store_uri, tmp_path):
    _train_and_register(tmp_path, seed=1, ap75_tol=0.2)
    reg, *_ = _train_and_register(tmp_path, seed=2, ap75_tol=float("nan"))
    assert reg.champion is False and "no finite" in reg.decision


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("models:/angio-stage1@champion", "registered model 'angio-stage1' does not exist"),
        ("models:/angio-stage7/1", "does not exist"),
        ("models:/m-0123456789abcdef", "logged model"),
        ("/no/such/file.pt", "no such file"),
        ("models:/justaname", "expected models:/"),
    ],
)
def test_unresolvable_init_from_is_a_clear_error(store_uri, uri, fragment):
    with pytest.raises(InputError) as info:
        resolve_model(uri)
    assert fragment in str(info.value) and info.value.key == "init_from"


def test_missing_alias_or_version_lists_what_exists(store_uri, tmp_path):
    client = mlflow.MlflowClient()
    _train_and_register(tmp_path, seed=1, ap75_tol=0.4)
    client.delete_registered_model_alias("angio-stage1", CHAMPION)
    with pytest.raises(InputError) as info:
        resolve_model("models:/angio-stage1@champion")
    message = str(info.value)
    assert "alias 'champion' is not set" in message and "versions: 1" in message and "challenger→v1" in message
    assert "angioexp promote" in message
    with pytest.raises(InputError, match="has no version 9"):
        resolve_model("models:/angio-stage1/9")


def test_promote_by_version_and_from_alias(store_uri, tmp_path):
    client = mlflow.MlflowClient()
    _train_and_register(tmp_path, seed=1, ap75_tol=0.5)
    _train_and_register(tmp_path, seed=2, ap75_tol=0.1)  # challenger v2, champion stays v1
    assert promote("angio-stage1", CHAMPION, from_alias=CHALLENGER) == ("2", "1")
    assert str(client.get_model_version_by_alias("angio-stage1", CHAMPION).version) == "2"
    assert "manual" in client.get_model_version("angio-stage1", "2").tags["alias.champion"]
    with pytest.raises(InputError, match="no version 5"):
        promote("angio-stage1", CHAMPION, version="5")
    with pytest.raises(InputError, match="does not exist"):
        promote("angio-stage9", CHAMPION, version="1")

    # the CLI: one line out, exit 0; bad input → one line, exit 2
    ok = subprocess.run([sys.executable, "-m", "angioexp", "promote", "--model", "angio-stage1", "--version", "1"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "angio-stage1@champion → v1 (was v2)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "angioexp", "promote", "--model", "angio-stage1", "--from-alias", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "alias 'nope' is not set" in bad.stderr
    assert str(client.get_model_version_by_alias("angio-stage1", CHAMPION).version) == "1"
