"""angioexp.backends.sam3.weights: BPE vocabulary lookup and verified checkpoint loading.

SAM3's ``_load_checkpoint`` (what ``build_sam3_image_model(checkpoint_path=…)`` calls) loads
zero tensors from a trainer checkpoint; ours loads all of them or fails.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)
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


# --- a foreign state dict: SAM3 inside the researcher's own wrapper ------------------------------------


def _sam3_parts_model(seed: int):
    """SAM3's real image-model wiring with its real geometry encoder, segmentation head and scoring
    (SAM3's key names and shapes); backbone and transformer stubbed to stay small."""
    from sam3 import model_builder as mb

    from angioexp.backends.sam3.cpu import cpu_shims
    from angioexp.backends.sam3.model import assemble_model

    torch.manual_seed(seed)
    transformer = torch.nn.Module()
    transformer.d_model = 256
    transformer.decoder = torch.nn.Linear(256, 256)
    transformer.decoder.num_queries, transformer.decoder.num_o2m_queries, transformer.decoder.dac = 4, 4, True
    with cpu_shims():
        parts = {"backbone": torch.nn.Linear(8, 8), "transformer": transformer,
                 "input_geometry_encoder": mb._create_geometry_encoder(),
                 "segmentation_head": mb._create_segmentation_head(),
                 "dot_prod_scoring": mb._create_dot_product_scoring()}
    return assemble_model(parts, matcher=None)


class ResearcherWrapper(torch.nn.Module):
    """A custom Stage 1 model: SAM3 under its own prefix, a conv segmentation head and a
    categorical view encoder of its own."""

    def __init__(self, seed: int):
        super().__init__()
        self.sam = _sam3_parts_model(seed)
        self.seg_head = torch.nn.Sequential(torch.nn.Conv2d(256, 64, 3), torch.nn.Conv2d(64, 1, 1))
        self.view_encoder = torch.nn.Embedding(12, 256)


@pytest.fixture(scope="module")
def researcher_pth(tmp_path_factory):
    wrapper = ResearcherWrapper(seed=11)
    path = tmp_path_factory.mktemp("stage1") / "stage1_dice080.pth"
    torch.save({"model": {f"module.{k}": v for k, v in wrapper.state_dict().items()}}, path)  # saved under DDP too
    return path, wrapper


def test_foreign_state_dict_loads_by_suffix_and_shape(researcher_pth):
    path, wrapper = researcher_pth
    model = _sam3_parts_model(seed=12)
    report = load_sam3_weights(model, str(path), min_loaded_fraction=0.99)
    assert report.loaded_fraction == 1.0 and "prefix 'module.sam.'" in report.source
    assert _params_equal(model, wrapper.sam)
    foreign = {"module.seg_head.0.weight", "module.seg_head.0.bias", "module.seg_head.1.weight",
               "module.seg_head.1.bias", "module.view_encoder.weight"}
    assert set(report.unexpected) == foreign  # the wrapper's own tensors, listed as left out


def test_explicit_checkpoint_prefix(researcher_pth):
    path, wrapper = researcher_pth
    model = _sam3_parts_model(seed=13)
    report = load_sam3_weights(model, str(path), prefix="module.sam.")
    assert report.loaded_fraction == 1.0 and _params_equal(model, wrapper.sam)
    with pytest.raises(CheckpointLoadError, match="checkpoint_prefix 'sam3.'"):
        load_sam3_weights(model, str(path), prefix="sam3.")
    # a prefix that names the wrong sub-tree loads too little and is refused, model untouched
    fresh, before = _sam3_parts_model(seed=14), _sam3_parts_model(seed=14)
    with pytest.raises(CheckpointLoadError, match="min_loaded_fraction"):
        load_sam3_weights(fresh, str(path), prefix="module.sam.segmentation_head.")
    assert _params_equal(fresh, before)


def test_foreign_checkpoint_with_too_little_of_sam3_is_refused(tmp_path):
    """Only the wrapper's mask head and SAM3's geometry encoder saved: below min_loaded_fraction."""
    wrapper = ResearcherWrapper(seed=15)
    state = {k: v for k, v in wrapper.state_dict().items()
             if k.startswith(("seg_head.", "view_encoder.", "sam.geometry_encoder."))}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = _sam3_parts_model(seed=16)
    with pytest.raises(CheckpointLoadError, match="min_loaded_fraction") as info:
        load_sam3_weights(model, str(path), min_loaded_fraction=0.9)
    report = info.value.report
    assert report.loaded and all(n.startswith("geometry_encoder.") for n in report.loaded)
    assert "view_encoder.weight" in report.unexpected and report.missing


def test_checkpoints_are_memory_mapped(trainer_checkpoint, monkeypatch):
    """Several GPU processes each load the init checkpoint: mmap, not a full copy each."""
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path, trained = trainer_checkpoint
    model = TinyDetector(seed=2)
    load_sam3_weights(model, str(path))
    assert calls and calls[0].get("mmap") is True and calls[0].get("weights_only") is True
    assert _params_equal(model, trained)
