"""Importers on fixtures generated here: ARCADE-shaped COCO and image/mask folder pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from angioexp.cli import main
from angioexp.data.convert import convert
from angioexp.data.importers.masks import assign_splits, binarise
from angioexp.data.index import read_index
from angioexp.segments import BY_SYNTAX

ARCADE_NAMES = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "9a", "10", "10a", "11", "12", "12a", "13",
                "14", "14a", "15", "16", "16a", "16b", "16c", "12b", "14b", "catether"]
SIZE = 64


def _rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_arcade(root: Path, images_per_split: int = 3) -> Path:
    """ARCADE-like syntax/{split}/annotations/{split}.json + images/*.png with known polygons.

    Image k of each split: segment "5" as a horizontal bar, "9a" as a vertical bar crossing it
    (annotated after "5", so it wins on the overlap), a catheter bar (annotated first), and in
    train a duplicated annotation id (as in the public release).
    """
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(ARCADE_NAMES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    for split in ("train", "val", "test"):
        base = root / "arcade" / "syntax" / split
        (base / "images").mkdir(parents=True)
        (base / "annotations").mkdir()
        images, annotations = [], []
        for k in range(images_per_split):
            image_id = k + 1
            pixels = np.full((SIZE, SIZE, 3), 200, np.uint8)
            pixels[20:30, 5:60] = 60
            Image.fromarray(pixels).save(base / "images" / f"{image_id}.png")  # RGB on purpose
            images.append({"id": image_id, "file_name": f"{image_id}.png", "height": SIZE, "width": SIZE})
            ann_id = 100 * image_id
            annotations += [
                {"id": ann_id, "image_id": image_id, "category_id": cat_id["catether"], "iscrowd": 0,
                 "segmentation": [_rect(0, 50, 40, 54)], "area": 0, "bbox": [0, 0, 0, 0]},
                {"id": ann_id + 1, "image_id": image_id, "category_id": cat_id["5"], "iscrowd": 0,
                 "segmentation": [_rect(5, 20, 60, 30)], "area": 0, "bbox": [0, 0, 0, 0]},
                {"id": ann_id + 1 if split == "train" else ann_id + 2, "image_id": image_id,
                 "category_id": cat_id["9a"], "iscrowd": 0,
                 "segmentation": [_rect(30 + k, 10, 36 + k, 56)], "area": 0, "bbox": [0, 0, 0, 0]},
            ]
        data = {"images": images, "annotations": annotations, "categories": categories}
        (base / "annotations" / f"{split}.json").write_text(json.dumps(data))
    return root


def test_arcade_import_round_trip(tmp_path):
    root = make_arcade(tmp_path / "in")
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root), "--out", str(out)]) == 0
    df = read_index(out / "index.csv", need_segments=True)
    assert sorted(df["split"].value_counts().items()) == [("test", 3), ("train", 3), ("val", 3)]
    assert (df["patient_id"] == df["case_id"]).all() and (df["source"] == "arcade").all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["repaired_annotation_ids"].values()) == [3]  # one duplicate per train image
    row = df[df["case_id"] == "arcade_train_1"].iloc[0]
    cine = np.load(row["cine_path_abs"])
    assert cine.shape == (1, SIZE, SIZE) and cine.dtype == np.uint8 and cine[0, 25, 10] == 60
    segments = np.load(row["segment_mask_path_abs"])
    lm, d1a, cath = BY_SYNTAX["5"].label, BY_SYNTAX["9a"].label, BY_SYNTAX["catheter"].label
    assert segments[25, 10] == lm and segments[15, 32] == d1a
    assert segments[25, 32] == d1a  # overlap: the later annotation wins
    assert segments[52, 10] == cath and segments[52, 32] == d1a  # vessels win over the catheter
    mask = np.load(row["mask_path_abs"]).astype(bool)
    assert np.array_equal(mask, (segments > 0) & (segments != cath))

    coco = convert(out / "index.csv", tmp_path / "coco", stage=2, workers=1)
    categories = json.loads((coco / "train" / "annotations.json").read_text())["categories"]
    assert [c["id"] for c in categories] == sorted([lm, d1a, cath])


def test_arcade_split_map(tmp_path):
    root = make_arcade(tmp_path / "in", images_per_split=1)
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root / "arcade"), "--out", str(out),
                 "--split-map", "val=test,test=skip"]) == 0
    df = read_index(out / "index.csv")
    assert sorted(df["split"]) == ["test", "train"]
    assert set(df["case_id"]) == {"arcade_train_1", "arcade_val_1"}


def _break(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


MALFORMED = {
    "unknown_category_name": (lambda d: d["categories"][3].update(name="17"), "categories[3].name"),
    "odd_polygon": (lambda d: d["annotations"][1]["segmentation"][0].pop(), "annotations[1].segmentation"),
    "unknown_image_id": (lambda d: d["annotations"][2].update(image_id=77), "annotations[2].image_id"),
    "unknown_category_id": (lambda d: d["annotations"][0].update(category_id=999), "annotations[0].category_id"),
    "missing_image_file": (lambda d: d["images"][1].update(file_name="nope.png"), "images[1].file_name"),
    "escaping_image_file": (lambda d: d["images"][0].update(file_name="../../x.png"), "images[0].file_name"),
    "no_annotations_key": (lambda d: d.pop("annotations"), "annotations"),
    "image_size_mismatch": (lambda d: d["images"][0].update(height=32), "images[0]"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_arcade_coco(name, tmp_path, capsys):
    root = make_arcade(tmp_path / "in", images_per_split=2)
    path = root / "arcade" / "syntax" / "val" / "annotations" / "val.json"
    edit, key = MALFORMED[name]
    _break(path, edit)
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root), "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert str(path) in message and f"key '{key}'" in message, message
    assert not out.exists() and not list(tmp_path.glob(".study.tmp-*"))


def test_arcade_invalid_json(tmp_path, capsys):
    root = make_arcade(tmp_path / "in", images_per_split=1)
    path = root / "arcade" / "syntax" / "test" / "annotations" / "test.json"
    path.write_text('{"images": [')
    assert main(["import-arcade", "--root", str(root), "--out", str(tmp_path / "study")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


# --- image/mask folder pairs --------------------------------------------------------------------


def make_pairs(root: Path) -> tuple[Path, Path]:
    """DCA1/XCAD-like folders: png, pgm, tif (16-bit) and npy images; 0/255 and 0/1 masks."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        stem = f"pat{i // 2:02d}_view{i % 2}"
        mask = np.zeros((40, 40), np.uint8)
        mask[5 + i : 30, 18:22] = 1
        pixels = (180 - 100 * mask + rng.integers(0, 20, mask.shape)).astype(np.uint8)
        kind = i % 4
        if kind == 0:
            Image.fromarray(pixels).save(images / f"{stem}.png")
            Image.fromarray(mask * 255).save(masks / f"{stem}_gt.png")
        elif kind == 1:
            Image.fromarray(pixels).save(images / f"{stem}.pgm")
            Image.fromarray(mask * 255).save(masks / f"{stem}_gt.pgm")
        elif kind == 2:
            Image.fromarray(pixels.astype(np.uint16) * 200).save(images / f"{stem}.tif")
            # a 20×20 mask for a 40×40 image: same aspect, resized at conversion
            Image.fromarray(mask[::2, ::2] * 255).save(masks / f"{stem}_gt.tif")
        else:
            np.save(images / f"{stem}.npy", pixels)
            np.save(masks / f"{stem}_gt.npy", mask.astype(bool))
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(images / "lonely.png")  # no mask
    (masks / "notes.txt").write_text("ignored")
    return images, masks


def test_masks_import_pairs_binarises_and_splits_by_patient(tmp_path):
    images, masks = make_pairs(tmp_path / "in")
    out = tmp_path / "study"
    assert main(["import-masks", "--images", str(images), "--masks", str(masks), "--out", str(out),
                 "--mask-suffix", "_gt", "--patient-regex", r"^(pat\d+)_", "--seed", "3"]) == 0
    df = read_index(out / "index.csv")
    assert len(df) == 12
    assert df.groupby("patient_id")["split"].nunique().max() == 1  # patient-level splits
    assert set(df["split"]) == {"train", "val", "test"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unpaired_images"] == ["lonely.png"] and manifest["unpaired_masks"] == []
    for _, row in df.iterrows():
        mask = np.load(row["mask_path_abs"])
        assert set(np.unique(mask)) == {0, 1}
    tif_row = df[df["case_id"] == "pat01_view0"].iloc[0]
    assert np.load(tif_row["cine_path_abs"]).dtype == np.uint16
    assert np.load(tif_row["mask_path_abs"]).shape == (20, 20)
    convert(out / "index.csv", tmp_path / "coco", stage=1, workers=1)

    again = tmp_path / "again"
    assert main(["import-masks", "--images", str(images), "--masks", str(masks), "--out", str(again),
                 "--mask-suffix", "_gt", "--patient-regex", r"^(pat\d+)_", "--seed", "3"]) == 0
    assert (again / "index.csv").read_bytes() == (out / "index.csv").read_bytes()


def test_masks_import_shared_folder_and_errors(tmp_path, capsys):
    images, masks = make_pairs(tmp_path / "in")
    for path in masks.iterdir():  # DCA1 keeps images and *_gt masks in one folder
        path.rename(images / path.name)
    out = tmp_path / "study"
    assert main(["import-masks", "--images", str(images), "--masks", str(images), "--out", str(out),
                 "--mask-suffix", "_gt"]) == 0
    assert len(read_index(out / "index.csv")) == 12

    assert main(["import-masks", "--images", str(images), "--masks", str(images), "--out", str(tmp_path / "x")]) == 2
    assert "--mask-suffix" in capsys.readouterr().err
    assert main(["import-masks", "--images", str(images), "--masks", str(images), "--out", str(tmp_path / "x"),
                 "--mask-suffix", "_gt", "--patient-regex", r"^nomatch(\d)"]) == 2
    assert "does not match" in capsys.readouterr().err
    Image.fromarray(np.ones((40, 10), np.uint8) * 255).save(images / "pat00_view0_gt.png")
    assert main(["import-masks", "--images", str(images), "--masks", str(images), "--out", str(tmp_path / "x"),
                 "--mask-suffix", "_gt"]) == 2
    message = capsys.readouterr().err
    assert "pat00_view0_gt.png" in message and "aspect" in message
    assert not (tmp_path / "x").exists()


def test_binarise_thresholds():
    assert binarise(np.array([[0, 1]], np.uint8)).tolist() == [[False, True]]
    assert binarise(np.array([[0, 100, 128, 255]], np.uint8)).tolist() == [[False, False, True, True]]
    assert binarise(np.array([[0.0, 0.4, 0.6]], np.float32)).tolist() == [[False, False, True]]
    assert binarise(np.array([[0.0, 0.4, 0.6]], np.float32) * 3).tolist() == [[False, True, True]]
    assert binarise(np.array([[0, 30000, 65535]], np.uint16)).tolist() == [[False, False, True]]
    assert binarise(np.array([[0, 1]], bool)).tolist() == [[False, True]]


def test_assign_splits_every_split_nonempty_and_seeded():
    patients = [f"p{i}" for i in range(5)]
    first = assign_splits(patients, (0.7, 0.15, 0.15), seed=1)
    assert set(first.values()) == {"train", "val", "test"}
    assert assign_splits(patients, (0.7, 0.15, 0.15), seed=1) == first
    assert assign_splits(list(reversed(patients)), (0.7, 0.15, 0.15), seed=1) == first
    assert set(assign_splits(patients, (0.8, 0.2, 0.0), seed=0).values()) == {"train", "val"}
