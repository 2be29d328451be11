"""prepare(): coco_dir / index_csv / synthetic default, caching, concurrency, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

import angioexp.data.convert as convert_module
from angioexp.cli import main
from angioexp.config import DataConfig
from angioexp.errors import ConfigError, InputError
from angioexp.data.prepare import prepare
from tests.helpers.study import write_study


def _refuse(*args, **kwargs):
    raise AssertionError("a cache hit must not convert or generate anything")


@pytest.fixture()
def study(tmp_path) -> Path:
    return write_study(tmp_path / "study", cases=8, size=48, frames=2)


def test_index_csv_is_converted_once_then_cached(study, tmp_path, monkeypatch):
    cfg = DataConfig(index_csv=str(study), cache_dir=str(tmp_path / "cache"))
    first = prepare(cfg, 1, workers=1)
    assert first.parent == (tmp_path / "cache").resolve() and first.name.startswith("coco-s1-")
    assert json.loads((first / "manifest.json").read_text())["stage"] == 1
    monkeypatch.setattr(convert_module, "convert", _refuse)
    assert prepare(cfg, 1, workers=1) == first
    monkeypatch.undo()

    second_stage = prepare(cfg, 2, workers=1)
    assert second_stage != first and second_stage.name.startswith("coco-s2-")
    mask = study.parent / "masks" / "c000.npy"  # an edited label file is a new dataset
    np.save(mask, np.load(mask))
    os.utime(mask, ns=(1, 1))
    assert prepare(cfg, 1, workers=1) != first


def test_convert_size_is_part_of_the_key(study, tmp_path):
    cfg = DataConfig(index_csv=str(study), cache_dir=str(tmp_path / "cache"))
    full = prepare(cfg, 1, workers=1)
    cfg.convert_size = 32
    small = prepare(cfg, 1, workers=1)
    assert small != full
    assert json.loads((small / "manifest.json").read_text())["image_shapes"] == [[32, 32]]


def test_coco_dir_is_validated(study, tmp_path):
    coco = convert_module.convert(study, tmp_path / "coco", stage=1, workers=1)
    assert prepare(DataConfig(coco_dir=str(coco)), 1) == coco.resolve()
    with pytest.raises(ConfigError, match="Stage 1, not Stage 2"):
        prepare(DataConfig(coco_dir=str(coco)), 2)
    with pytest.raises(InputError, match="split 'holdout' not found"):
        prepare(DataConfig(coco_dir=str(coco), val_split="holdout"), 1)
    with pytest.raises(ConfigError, match="not found"):
        prepare(DataConfig(coco_dir=str(tmp_path / "nothing")), 1)


def _prepare_in_process(args):
    csv_path, cache = args
    out = prepare(DataConfig(index_csv=csv_path, cache_dir=cache), 1, workers=1)
    return str(out), os.stat(out / "manifest.json").st_ino


def test_concurrent_preparers_build_one_entry(tmp_path):
    csv_path = write_study(tmp_path / "study", cases=16, size=48, frames=2)
    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_prepare_in_process, [(str(csv_path), str(cache))] * 2)
    (path_a, inode_a), (path_b, inode_b) = results
    assert path_a == path_b and inode_a == inode_b == os.stat(Path(path_a) / "manifest.json").st_ino
    assert sorted(p.name for p in cache.iterdir()) == [".prepare.lock", Path(path_a).name]


def test_stale_temporary_folders_are_cleaned(study, tmp_path):
    cfg = DataConfig(index_csv=str(study), cache_dir=str(tmp_path / "cache"))
    entry = prepare(cfg, 1, workers=1)
    import shutil

    shutil.rmtree(entry)
    stale = entry.parent / f".{entry.name}.tmp-killed"
    stale.mkdir()
    (stale / "half.png").write_bytes(b"x")
    assert prepare(cfg, 1, workers=1) == entry
    assert not stale.exists()


def test_prepare_cli_prints_the_coco_dir(study, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", "--index", str(study), "--stage", "2", "--cache-dir", str(cache), "--workers", "1"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.parent == cache.resolve() and (printed / "val" / "annotations.json").is_file()
    assert main(["prepare", "--coco", str(printed), "--stage", "1"]) == 2
    assert "Stage 2, not Stage 1" in capsys.readouterr().err


def test_synthetic_default_is_generated_once(tmp_path, monkeypatch):
    synthetic = pytest.importorskip("angioexp.data.synthetic")
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), synth_cases=3, synth_size=128, synth_frames=2)
    coco = prepare(cfg, 1, workers=1)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(entries) == 2 and entries[1].startswith("synth-") and coco.name == entries[0]
    manifest = json.loads((coco / "manifest.json").read_text())
    assert manifest["stage"] == 1 and sum(s["images"] for s in manifest["splits"].values()) == 3
    monkeypatch.setattr(synthetic, "generate", _refuse)
    monkeypatch.setattr(convert_module, "convert", _refuse)
    assert prepare(cfg, 1, workers=1) == coco
