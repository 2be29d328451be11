"""CocoSplit: the reader training and evaluation share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from angioexp.data.coco import CocoSplit
from angioexp.data.convert import convert
from angioexp.data.index import read_index
from angioexp.errors import InputError
from tests.helpers.study import write_study


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    study = write_study(tmp_path_factory.mktemp("study"), cases=8, size=48, frames=2)
    root = tmp_path_factory.mktemp("coco")
    return study, convert(study, root / "s1", stage=1, workers=1), convert(study, root / "s2", stage=2, workers=1)


def test_stage1_records_images_and_instances(converted):
    study, stage1, _ = converted
    df = read_index(study)
    split = CocoSplit.load(stage1, "train")
    assert len(split) == (df["split"] == "train").sum()
    assert split.categories == [{"id": 1, "name": "coronary artery", "supercategory": "vessel"}]
    assert split.annotations_path == (stage1 / "train" / "annotations.json").resolve()
    assert split.gt_path is not None
    for record in split.images:
        row = df[df["case_id"] == record.case_id].iloc[0]
        assert record.path.is_absolute() and record.path.is_file()
        assert record.patient_id == row["patient_id"] and record["view"] == row["view"]
        assert record.primary_angle == row["primary_angle"]
        image = split.image(record.id)
        assert image.dtype == np.uint8 and image.shape == (record.height, record.width)
        assert np.array_equal(image, np.asarray(Image.open(record.path)))
        ((category, mask),) = split.instances(record.id)
        assert category == 1 and mask.dtype == bool
        assert np.array_equal(mask, np.load(row["mask_path_abs"]).astype(bool))
    clean = CocoSplit.load(stage1, "train", gt=True)
    assert clean.image_ids == split.image_ids
    first = split.image_ids[0]
    assert not np.array_equal(clean.instances(first)[0][1], split.instances(first)[0][1])


def test_stage2_instances_and_semantic_mask(converted):
    study, _, stage2 = converted
    df = read_index(study)
    split = CocoSplit.load(stage2, "val")
    with pytest.raises(InputError, match="clean labels"):
        CocoSplit.load(stage2, "val", gt=True)
    for record in split.images:
        labels = np.load(df[df["case_id"] == record.case_id].iloc[0]["segment_mask_path_abs"])
        for category, mask in split.instances(record.id):
            assert category in split.category_ids and (labels[mask] == category).all()
        union = split.semantic_mask(record.id)
        assert union.sum() <= (labels > 0).sum()


def test_missing_split_and_malformed_files(converted, tmp_path):
    _, stage1, _ = converted
    with pytest.raises(InputError, match="split 'nope' not found"):
        CocoSplit.load(stage1, "nope")
    broken = tmp_path / "coco"
    shutil.copytree(stage1, broken)
    path = broken / "train" / "annotations.json"
    data = json.loads(path.read_text())

    data["annotations"][0]["image_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        CocoSplit.load(broken, "train")
    assert info.value.key == "annotations[0].image_id" and info.value.file == str(path)

    data = json.loads((stage1 / "train" / "annotations.json").read_text())
    data["images"][1]["file_name"] = "../../outside.png"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="escapes") as info:
        CocoSplit.load(broken, "train")
    assert info.value.key == "images[1].file_name"

    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        CocoSplit.load(broken, "train")


def test_reads_polygon_annotations_of_foreign_files(tmp_path):
    split_dir = tmp_path / "coco" / "train"
    (split_dir / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(split_dir / "images" / "a.png")
    data = {
        "images": [{"id": 7, "file_name": "images/a.png", "height": 20, "width": 30}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0,
                         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]}],
        "categories": [{"id": 3, "name": "x"}],
    }
    (split_dir / "annotations.json").write_text(json.dumps(data))
    split = CocoSplit.load(tmp_path / "coco", "train")
    ((category, mask),) = split.instances(7)
    assert category == 3 and mask.shape == (20, 30) and 70 <= mask.sum() <= 120
    assert split.record(7).case_id is None and split.record(7).get("view", "n/a") == "n/a"
    with pytest.raises(KeyError):
        split.record(8)
    assert isinstance(split.images[0].path, Path)
