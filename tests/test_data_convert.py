"""index.csv → COCO: counts, masks, image entries, determinism, resizing, atomic overwrite."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage.measure import label as sk_label

from angioexp.data.convert import MIN_COMPONENT_AREA, convert, encode_png_gray8, to_uint8
from angioexp.data.index import read_index
from angioexp.errors import InputError
from tests.helpers.study import write_study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    # masks stored at half size: conversion must resize them to the frame
    return write_study(tmp_path_factory.mktemp("study"), cases=12, size=64, frames=3, mask_scale=0.5)


@pytest.fixture(scope="module")
def stage1(study, tmp_path_factory) -> Path:
    return convert(study, tmp_path_factory.mktemp("c1") / "coco", stage=1, workers=1)


@pytest.fixture(scope="module")
def stage2(study, tmp_path_factory) -> Path:
    return convert(study, tmp_path_factory.mktemp("c2") / "coco", stage=2, workers=1)


def _coco(path: Path) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(path.read_text())
    coco.createIndex()
    return coco


def _nearest(mask: np.ndarray, shape) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(shape[::-1], Image.Resampling.NEAREST))


def test_stage1_counts_masks_and_entries(study, stage1):
    df = read_index(study)
    manifest = json.loads((stage1 / "manifest.json").read_text())
    assert manifest["stage"] == 1 and manifest["categories"] == [{"id": 1, "name": "coronary artery", "supercategory": "vessel"}]
    for split, rows in df.groupby("split"):
        coco = _coco(stage1 / split / "annotations.json")
        gt = _coco(stage1 / split / "annotations_gt.json")
        assert len(coco.getImgIds()) == len(rows) == len(coco.getAnnIds()) == len(gt.getAnnIds())
        assert manifest["splits"][split]["images"] == len(rows)
        assert sorted(coco.getImgIds()) == sorted(gt.getImgIds())
        for image in coco.dataset["images"]:
            row = rows[rows["case_id"] == image["case_id"]].iloc[0]
            assert image["file_name"] == f"images/{row['case_id']}.png"
            assert image["patient_id"] == row["patient_id"] and image["frame_index"] == row["frame_index"]
            assert image["primary_angle"] == row["primary_angle"] and image["view"] == row["view"]
            assert image["dominance"] is None  # absent column → null
            assert image["pixel_spacing_mm"] == pytest.approx(0.3)
            png = np.asarray(Image.open(stage1 / split / image["file_name"]))
            frame = np.load(row["cine_path_abs"])[row["frame_index"]]
            assert png.dtype == np.uint8 and png.shape == frame.shape == (image["height"], image["width"])
            assert np.array_equal(png, to_uint8(frame))
            (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
            decoded = coco.annToMask(ann).astype(bool)
            expected = _nearest(np.load(row["mask_path_abs"]), frame.shape).astype(bool)
            assert np.array_equal(decoded, expected)
            assert ann["area"] == expected.sum()
            ys, xs = np.nonzero(expected)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            (gt_ann,) = gt.loadAnns(gt.getAnnIds(imgIds=image["id"]))
            clean = _nearest(np.load(row["gt_mask_path_abs"]), frame.shape).astype(bool)
            assert np.array_equal(gt.annToMask(gt_ann).astype(bool), clean)
            assert not np.array_equal(clean, expected)  # training labels ≠ clean labels here


def test_stage2_one_instance_per_connected_piece(study, stage2):
    df = read_index(study)
    manifest = json.loads((stage2 / "manifest.json").read_text())
    all_categories = None
    dropped = 0
    present = set()
    for split, rows in df.groupby("split"):
        assert not (stage2 / split / "annotations_gt.json").exists()
        coco = _coco(stage2 / split / "annotations.json")
        categories = coco.dataset["categories"]
        all_categories = all_categories or categories
        assert categories == all_categories  # the same list in every split
        for image in coco.dataset["images"]:
            labels = np.load(rows[rows["case_id"] == image["case_id"]].iloc[0]["segment_mask_path_abs"])
            expected = []
            for value in np.unique(labels[labels > 0]):
                pieces = sk_label(labels == value, connectivity=2)  # independent 8-connectivity
                for piece in range(1, pieces.max() + 1):
                    if (pieces == piece).sum() >= MIN_COMPONENT_AREA:
                        expected.append((int(value), (pieces == piece).sum()))
                        present.add(int(value))
                    else:
                        dropped += 1
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            got = sorted((a["category_id"], a["area"]) for a in anns)
            assert got == sorted(expected)
            union = np.zeros(labels.shape, bool)
            for a in anns:
                m = coco.annToMask(a).astype(bool)
                assert (labels[m] == a["category_id"]).all()
                union |= m
    assert [c["id"] for c in all_categories] == sorted(present)
    assert manifest["dropped_components"] == dropped


def test_output_is_identical_for_any_worker_count(study, stage1, tmp_path):
    other = convert(study, tmp_path / "coco", stage=1, workers=2)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(other) == files(stage1)


def test_size_resizes_frames_masks_and_spacing(study, tmp_path):
    out = convert(study, tmp_path / "coco", stage=1, size=32, workers=1)
    coco = _coco(out / "train" / "annotations.json")
    for image in coco.dataset["images"]:
        assert (image["height"], image["width"]) == (32, 32)
        assert image["pixel_spacing_mm"] == pytest.approx(0.6)
        assert Image.open(out / "train" / image["file_name"]).size == (32, 32)
    assert coco.annToMask(coco.dataset["annotations"][0]).shape == (32, 32)
    assert json.loads((out / "manifest.json").read_text())["size"] == 32


def test_existing_output_needs_overwrite(study, tmp_path):
    out = tmp_path / "coco"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="--overwrite"):
        convert(study, out, stage=1, workers=1)
    assert (out / "keep.txt").exists()
    convert(study, out, stage=1, workers=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_uint16_frames_are_windowed_by_percentiles():
    rng = np.random.default_rng(0)
    frame = rng.integers(1000, 3000, (64, 64)).astype(np.uint16)
    frame[0, 0] = 65535  # one hot pixel must not squash the window
    out = to_uint8(frame)
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    assert np.median(out) == pytest.approx(128, abs=10)
    order = np.argsort(frame.ravel())
    assert (np.diff(out.ravel()[order].astype(int)) >= 0).all()  # monotone
    assert (to_uint8(np.full((8, 8), 7.0, np.float32)) == 0).all()  # constant frame


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (5, 300)])
def test_png_encoder_round_trips(shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png_gray8(image)))
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), image)


def test_manifest_records_source_and_digest(study, stage1):
    from angioexp.data.register import dataset_digest

    manifest = json.loads((stage1 / "manifest.json").read_text())
    assert manifest["source_index"]["rows"] == 12 and len(manifest["source_index"]["sha256"]) == 64
    assert manifest["dataset_digest"] == dataset_digest(stage1)
    assert manifest["converter_version"]


def test_uses_cli_and_prints_path(study, tmp_path, capsys):
    from angioexp.cli import main

    out = tmp_path / "cli"
    assert main(["convert", "--index", str(study), "--out", str(out), "--stage", "2", "--workers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    rle = json.loads((out / "val" / "annotations.json").read_text())["annotations"][0]["segmentation"]
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) > 0


def test_piece_encoder_matches_pycocotools():
    from angioexp.data.convert import encode_instance, encode_piece

    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        h, w = int(rng.integers(1, height - top + 1)), int(rng.integers(1, width - left + 1))
        full = np.zeros((height, width), bool)
        full[top : top + h, left : left + w] = rng.random((h, w)) < rng.random()
        assert encode_piece(full[top : top + h, left : left + w], top, left, height, width, 4) == encode_instance(full, 4)


def test_uint16_percentiles_match_numpy():
    from angioexp.data.convert import WINDOW_PERCENTILES, _percentiles_uint16

    rng = np.random.default_rng(2)
    for size in (1, 2, 5, 333):
        frame = rng.integers(0, 4096, size).astype(np.uint16).reshape(1, -1)
        expected = np.percentile(frame.astype(np.float64), WINDOW_PERCENTILES)
        assert np.allclose(_percentiles_uint16(frame, WINDOW_PERCENTILES), expected)


def test_output_shape_keeps_aspect():
    from angioexp.data.convert import output_shape

    assert output_shape(1016, 1016, 512) == (512, 512)
    assert output_shape(600, 800, 400) == (300, 400)
    assert output_shape(600, 800, None) == (600, 800)
