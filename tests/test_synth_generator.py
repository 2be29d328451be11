"""``angioexp synth`` / ``generate()``: layout, dtypes, determinism, splits, labels, errors."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from angioexp.cli import main as cli_main
from angioexp.data.schema import OPTIONAL_COLUMNS, PATH_COLUMNS, REQUIRED_COLUMNS, SPLITS
from angioexp.data.synthetic import GENERATOR_VERSION, generate
from angioexp.errors import InputError
from angioexp.segments import BY_LABEL

SIZE = 128


def _rows(folder: Path) -> list[dict]:
    with open(folder / "index.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "study"
    generate(out, cases=9, seed=11, size=SIZE, frames=4, preview=True, workers=1)
    return out


def test_layout_and_columns(study):
    names = sorted(p.name for p in study.iterdir())
    assert names == ["cines", "gt_masks", "index.csv", "manifest.json", "masks", "preview.png", "segments"]
    with open(study / "index.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    rows = _rows(study)
    assert len(rows) == 9 and len({r["case_id"] for r in rows}) == 9
    for r in rows:
        assert r["source"] == "synthetic" and r["dominance"] in ("right", "left", "co")
        for col in PATH_COLUMNS:
            rel = r[col]
            assert not Path(rel).is_absolute() and ".." not in Path(rel).parts
            assert (study / rel).is_file()
        assert -180 <= float(r["primary_angle"]) <= 180 and -90 <= float(r["secondary_angle"]) <= 90
        assert 0.05 < float(r["pixel_spacing_mm"]) < 2.0
    # Nothing else was written next to the study (no leftover temporary folders).
    assert sorted(p.name for p in study.parent.iterdir()) == ["study"]


def test_manifest_records_version_seed_args_and_measured_dice(study):
    m = json.loads((study / "manifest.json").read_text())
    assert m["version"] == GENERATOR_VERSION and m["seed"] == 11
    assert m["args"] == {"cases": 9, "size": SIZE, "frames": 4, "preview": True, "pseudo_dice": 0.83}
    assert "gap_rate" in m["knobs"] and "fov_mm" in m["knobs"]
    rows = _rows(study)
    assert sum(v["cases"] for v in m["splits"].values()) == 9
    assert sum(m["dominance_patients"].values()) == m["patients"] == len({r["patient_id"] for r in rows})
    # The recorded Dice is the Dice of the files on disk.
    measured = [
        _dice(np.load(study / r["mask_path"]).astype(bool), np.load(study / r["gt_mask_path"]).astype(bool))
        for r in rows
    ]
    assert m["pseudo_label_dice"]["mean"] == pytest.approx(np.mean(measured), abs=1e-3)
    assert m["pseudo_label_dice"]["std"] == pytest.approx(np.std(measured), abs=1e-3)
    assert [c["case_id"] for c in m["cases"]] == [r["case_id"] for r in rows]


def test_arrays_have_the_documented_dtypes_and_shapes(study):
    rows = _rows(study)
    dtypes = set()
    for i, r in enumerate(rows):
        cine = np.load(study / r["cine_path"])
        assert cine.ndim == 3 and cine.shape == (4, SIZE, SIZE)
        # Every 4th case is a 12-bit uint16 cine, the rest uint8.
        expected = np.uint16 if (i + 1) % 4 == 0 else np.uint8
        assert cine.dtype == expected
        dtypes.add(cine.dtype)
        if cine.dtype == np.uint16:
            assert cine.max() <= 4095
        assert cine.std() > 5 if cine.dtype == np.uint8 else cine.std() > 80  # an image, not a constant
        assert 0 <= int(r["frame_index"]) < 4
        for col in ("mask_path", "gt_mask_path"):
            m = np.load(study / r[col])
            assert m.dtype == np.uint8 and m.shape == (SIZE, SIZE) and set(np.unique(m)) == {0, 1}
        seg = np.load(study / r["segment_mask_path"])
        assert seg.dtype == np.uint8 and seg.shape == (SIZE, SIZE)
    assert dtypes == {np.dtype(np.uint8), np.dtype(np.uint16)}


def test_segments_are_known_labels_whose_union_is_the_clean_mask(study):
    catheter_seen = 0
    for r in _rows(study):
        seg = np.load(study / r["segment_mask_path"])
        clean = np.load(study / r["gt_mask_path"]).astype(bool)
        labels = set(int(v) for v in np.unique(seg)) - {0}
        assert labels <= set(BY_LABEL)
        vessels = (seg > 0) & (seg != 26)
        assert np.array_equal(vessels, clean)  # the catheter is not vessel
        catheter_seen += int((seg == 26).any())
        # One coronary system per injection.
        systems = {BY_LABEL[v].system for v in labels if v != 26}
        assert len(systems) == 1
        expected = "right" if r["view"] in ("LAO40", "RAO30", "AP_CRA25") else "left"
        assert systems == {expected}
    assert catheter_seen >= 5


def test_vessels_cover_a_few_percent_and_are_dark(study):
    fractions = []
    for r in _rows(study):
        clean = np.load(study / r["gt_mask_path"]).astype(bool)
        fractions.append(clean.mean())
        frame = np.load(study / r["cine_path"])[int(r["frame_index"])].astype(np.float32)
        ring = ndi.binary_dilation(clean, iterations=3) & ~ndi.binary_dilation(clean)
        assert frame[clean].mean() < frame[ring].mean()  # vessels darker than their surroundings
    assert 0.015 < np.mean(fractions) < 0.10  # ARCADE: ~5% of pixels


def test_frame_index_is_the_peak_opacification_frame(study):
    for r in _rows(study):
        cine = np.load(study / r["cine_path"]).astype(np.float32)
        region = ndi.binary_dilation(np.load(study / r["gt_mask_path"]).astype(bool))
        darkness = [-cine[t][region].mean() for t in range(cine.shape[0])]
        assert int(np.argmax(darkness)) == int(r["frame_index"]), r["case_id"]


def test_splits_are_patient_disjoint_and_non_empty(study, tmp_path):
    rows = _rows(study)
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {r["split"] for r in rows} == set(SPLITS)
    # The smallest study still fills every split.
    out = generate(tmp_path / "min", cases=3, seed=5, size=SIZE, frames=1, workers=1)
    small = _rows(out)
    assert sorted(r["split"] for r in small) == ["test", "train", "val"]
    assert len({r["patient_id"] for r in small}) == 3


def test_same_seed_gives_identical_bytes_for_any_worker_count(study, tmp_path):
    again = generate(tmp_path / "again", cases=9, seed=11, size=SIZE, frames=4, preview=True, workers=2)
    assert _digest(again) == _digest(study)
    other = generate(tmp_path / "other", cases=9, seed=12, size=SIZE, frames=4, workers=1)
    a, b = _rows(study), _rows(other)
    assert not np.array_equal(np.load(study / a[0]["cine_path"]), np.load(other / b[0]["cine_path"]))


def test_preview_is_a_valid_png(study):
    data = (study / "preview.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(study / "preview.png") as img:
        img.verify()
    with Image.open(study / "preview.png") as img:
        assert img.mode == "RGB" and img.width == 4 * 256 and img.height > 256
        assert np.asarray(img).std() > 10


@pytest.mark.parametrize("target", [0.83, 0.75])
def test_pseudo_label_dice_is_calibrated_to_the_target(tmp_path, target):
    out = generate(tmp_path / "cal", cases=30, seed=21, size=256, frames=1, workers=1, pseudo_dice=target)
    values = []
    for r in _rows(out):
        pseudo = np.load(out / r["mask_path"]).astype(bool)
        clean = np.load(out / r["gt_mask_path"]).astype(bool)
        values.append(_dice(pseudo, clean))
    assert abs(np.mean(values) - target) <= 0.03
    assert np.std(values) > 0.01  # per-case variation, not one fixed error level
    details = json.loads((out / "manifest.json").read_text())["cases"]
    kinds = set().union(*(d["pseudo_errors"] for d in details))
    assert {"missed_distal", "gap"} <= kinds  # structural errors, not only boundary noise


def test_pseudo_dice_one_means_clean_labels(tmp_path):
    out = generate(tmp_path / "exact", cases=3, seed=3, size=SIZE, frames=1, workers=1, pseudo_dice=1.0)
    for r in _rows(out):
        assert np.array_equal(np.load(out / r["mask_path"]), np.load(out / r["gt_mask_path"]))


def test_sizes_scale_vessels_with_pixel_spacing(tmp_path):
    """The same seed at two sizes is the same projection: spacing halves, masks agree."""
    small = generate(tmp_path / "s", cases=3, seed=9, size=256, frames=1, workers=1)
    large = generate(tmp_path / "l", cases=3, seed=9, size=512, frames=1, workers=1)
    for rs, rl in zip(_rows(small), _rows(large)):
        assert float(rs["pixel_spacing_mm"]) == pytest.approx(2 * float(rl["pixel_spacing_mm"]), rel=1e-3)
        a = np.load(small / rs["gt_mask_path"]).astype(bool)
        b = np.load(large / rl["gt_mask_path"]).reshape(256, 2, 256, 2).mean(axis=(1, 3)) >= 0.5
        both = np.load(small / rs["cine_path"]).shape[1] == 256
        assert both and _dice(a, b) > 0.75


@pytest.mark.slow
def test_size_1024_works(tmp_path):
    out = generate(tmp_path / "big", cases=3, seed=4, size=1024, frames=2, workers=1)
    r = _rows(out)[0]
    assert np.load(out / r["cine_path"]).shape == (2, 1024, 1024)
    assert 0.01 < np.load(out / r["gt_mask_path"]).mean() < 0.12


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"cases": 2}, "cases must be an integer ≥ 3"),
        ({"size": 100}, "size 100 is not supported"),
        ({"size": 1040}, "size 1040 is not supported"),
        ({"size": 250}, "size 250 is not supported"),
        ({"frames": 0}, "frames must be"),
        ({"seed": -1}, "seed must be"),
        ({"pseudo_dice": 1.5}, "pseudo-label Dice target"),
        ({"workers": 0}, "workers must be"),
        ({"gap_rat": 2}, "did you mean 'gap_rate'"),
        ({"fov_mm": "200"}, "expected two numbers"),
        ({"miss_prob": 1.5}, "probability"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(tmp_path, kwargs, needle):
    args = {"cases": 3, "seed": 1, "size": SIZE, "frames": 1, **kwargs}
    with pytest.raises(InputError, match=needle):
        generate(tmp_path / "out", **args)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        generate(out, cases=3, seed=1, size=SIZE, frames=1, workers=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    generate(out, cases=3, seed=1, size=SIZE, frames=1, workers=1, overwrite=True)
    assert (out / "index.csv").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_leaves_nothing_behind(tmp_path, monkeypatch):
    from angioexp.data.synthetic import generator

    calls = {"n": 0}
    real = generator.render_case

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(generator, "render_case", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(tmp_path / "out", cases=6, seed=2, size=SIZE, frames=1, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_study_and_reports_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["synth", "--out", str(out), "--cases", "3", "--seed", "4", "--size", "128", "--frames", "2",
                     "--workers", "1", "--set", "gap_rate=0", "--pseudo-dice", "0.9"])
    assert code == 0 and (out / "index.csv").is_file() and not (out / "preview.png").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["knobs"]["gap_rate"] == 0.0 and m["args"]["pseudo_dice"] == 0.9
    capsys.readouterr()
    code = cli_main(["synth", "--out", str(out), "--cases", "3", "--seed", "4", "--size", "128"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already exists" in err and len(err.splitlines()) == 1
    code = cli_main(["synth", "--out", str(tmp_path / "x"), "--cases", "3", "--seed", "4", "--set", "nonsense"])
    assert code == 2 and "KNOB=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
