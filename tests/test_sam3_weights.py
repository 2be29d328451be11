"""angioexp.backends.sam3.weights: BPE vocabulary lookup and verified checkpoint loading.

SAM3's ``_load_checkpoint`` (what ``build_sam3_image_model(checkpoint_path=…)`` calls) loads
zero tensors from a trainer checkpoint; ours loads all of them or fails.
"""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("sam3", reason="needs the sam3 package (run with /work/venv-sam3/bin/python -m pytest -m sam3)")
import torch  # noqa: E402

from angioexp.backends.sam3.weights import (  # noqa: E402
    BPE_MD5,
    checkpoint_format,
    export_model_state,
    find_bpe_vocab,
    load_sam3_weights,
    resolve_checkpoint,
)
from angioexp.errors import CheckpointLoadError, InputError  # noqa: E402

pytestmark = pytest.mark.sam3


class TinyDetector(torch.nn.Module):
    """Stands in for Sam3Image: SAM3-like names, and the attribute SAM3's loader reads."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        self.transformer = torch.nn.Linear(8, 2)
        self.inst_interactive_predictor = None


def _params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bpe_vocab_found_in_an_installed_package():
    path = find_bpe_vocab()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz"
    assert hashlib.md5(path.read_bytes()).hexdigest() == BPE_MD5


def test_bpe_user_path_must_exist(tmp_path):
    with pytest.raises(InputError, match="sam3.bpe_path"):
        find_bpe_vocab(tmp_path / "missing.txt.gz")
    bad = tmp_path / "vocab.txt.gz"
    bad.write_text("not gzip")
    with pytest.raises(InputError, match="gzip"):
        find_bpe_vocab(bad)


@pytest.fixture()
def trainer_checkpoint(tmp_path):
    """What SAM3's Trainer.save_checkpoint writes: model state unprefixed under 'model'."""
    trained = TinyDetector(seed=1)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": trained.state_dict(), "optimizer": {}, "epoch": 3, "steps": {"train": 30}}, path)
    return path, trained


def test_sam3_loader_loads_nothing_from_a_trainer_checkpoint(trainer_checkpoint, capsys):
    from sam3.model_builder import _load_checkpoint

    path, trained = trainer_checkpoint
    model, fresh = TinyDetector(seed=2), TinyDetector(seed=2)
    _load_checkpoint(model, str(path))  # SAM3: no error, only a printed list of missing keys
    assert "missing" in capsys.readouterr().out
    assert _params_equal(model, fresh) and not _params_equal(model, trained)  # still random


def test_trainer_checkpoint_loads_completely(trainer_checkpoint):
    path, trained = trainer_checkpoint
    model = TinyDetector(seed=2)
    report = load_sam3_weights(model, str(path), min_loaded_fraction=0.9)
    assert report.loaded_fraction == 1.0 and not report.missing and not report.unexpected
    assert _params_equal(model, trained)


def test_vanilla_checkpoint_format(tmp_path):
    trained = TinyDetector(seed=3)
    state = {f"detector.{k}": v for k, v in trained.state_dict().items()}
    state["tracker.maskmem.weight"] = torch.zeros(2)  # video-only weights in sam3.pt
    path = tmp_path / "sam3.pt"
    torch.save(state, path)
    assert checkpoint_format(state) == "vanilla"
    model = TinyDetector(seed=4)
    report = load_sam3_weights(model, str(path))
    assert report.loaded_fraction == 1.0 and report.skipped_by_rule == ["tracker.maskmem.weight"]
    assert _params_equal(model, trained)


def test_wrong_checkpoint_fails_before_training(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, path)
    model, fresh = TinyDetector(seed=5), TinyDetector(seed=5)
    with pytest.raises(CheckpointLoadError, match="min_loaded_fraction") as info:
        load_sam3_weights(model, str(path), min_loaded_fraction=0.9)
    assert info.value.report.loaded == [] and len(info.value.report.missing) == 6
    assert _params_equal(model, fresh)  # left untouched


def test_corrupt_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_sam3_weights(TinyDetector(0), str(corrupt))
    with pytest.raises(InputError, match="not found"):
        load_sam3_weights(TinyDetector(0), str(tmp_path / "nope.pt"))


def test_export_model_state_is_weights_only(trainer_checkpoint, tmp_path):
    path, trained = trainer_checkpoint
    out = export_model_state(path, tmp_path / "model_weights.pt")
    state = torch.load(out, weights_only=True)
    assert set(state) == set(trained.state_dict())


def test_mlflow_uri(trainer_checkpoint, tmp_path):
    """runs:/ (and models:/) URIs resolve through real MLflow (temporary SQLite store)."""
    import mlflow

    path, trained = trainer_checkpoint
    weights = export_model_state(path, tmp_path / "export" / "weights.pt")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("sam3-weights", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifact(str(weights), artifact_path="init")
        uri = f"runs:/{run.info.run_id}/init/weights.pt"
        assert resolve_checkpoint(uri).name == "weights.pt"
        model = TinyDetector(seed=9)
        report = load_sam3_weights(model, uri)
        assert report.loaded_fraction == 1.0 and _params_equal(model, trained)
        with pytest.raises(InputError):
            resolve_checkpoint("models:/no-such-model/1")
    finally:
        mlflow.set_tracking_uri(None)
