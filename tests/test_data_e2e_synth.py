"""The real pipeline on the shared synthetic fixture: synth → convert (Stage 1 and 2) → pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from skimage.measure import label as sk_label

from angioexp.data.coco import CocoSplit
from angioexp.data.convert import MIN_COMPONENT_AREA
from angioexp.data.index import read_index
from angioexp.data.register import dataset_digest

pytest.importorskip("angioexp.data.synthetic")


def _load(path) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(path.read_text())
    coco.createIndex()
    return coco


def test_stage1_counts_match_the_csv(synth_dir, coco_stage1):
    df = read_index(synth_dir / "index.csv")
    for split, rows in df.groupby("split"):
        coco = _load(coco_stage1 / split / "annotations.json")
        clean = _load(coco_stage1 / split / "annotations_gt.json")
        assert len(coco.getImgIds()) == len(coco.getAnnIds()) == len(clean.getAnnIds()) == len(rows)
        assert sorted(im["case_id"] for im in coco.dataset["images"]) == sorted(rows["case_id"])
        for image in coco.dataset["images"]:
            assert image["view"] and image["primary_angle"] is not None and image["pixel_spacing_mm"] > 0


def test_stage2_counts_match_the_segment_maps(synth_dir, coco_stage2):
    df = read_index(synth_dir / "index.csv", need_segments=True)
    categories = None
    for split, rows in df.groupby("split"):
        coco = _load(coco_stage2 / split / "annotations.json")
        categories = categories or coco.dataset["categories"]
        assert coco.dataset["categories"] == categories
        expected = 0
        for path in rows["segment_mask_path_abs"]:
            labels = np.load(path)
            for value in np.unique(labels[labels > 0]):
                pieces = sk_label(labels == value, connectivity=2)
                expected += int((np.bincount(pieces.ravel())[1:] >= MIN_COMPONENT_AREA).sum())
        assert len(coco.getAnnIds()) == expected


def test_reader_and_digest_on_synthetic_data(coco_stage1):
    split = CocoSplit.load(coco_stage1, "val", gt=True)
    record = split.images[0]
    ((category, mask),) = split.instances(record.id)
    assert category == 1 and 0 < mask.mean() < 0.5
    assert split.image(record.id).shape == mask.shape
    assert dataset_digest(coco_stage1) == json.loads((coco_stage1 / "manifest.json").read_text())["dataset_digest"]
