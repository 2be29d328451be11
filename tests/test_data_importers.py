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
from angioexp.data.importers.arcade import ARCADE_CATEGORIES
from angioexp.segments import BY_SYNTAX

from tests.helpers.arcade_replica import ARCADE_NAMES, SIZE, make_arcade, outline, rect, truth_json

def test_arcade_category_list_is_the_official_one():
    assert [name for _, name in ARCADE_CATEGORIES] == ARCADE_NAMES
    assert [cid for cid, _ in ARCADE_CATEGORIES] == list(range(1, 27))
    # the 25 segment names are SYNTAX segments; "stenosis" is not a segment and nothing is a catheter alias
    assert all(BY_SYNTAX[name].system in ("left", "right") for name in ARCADE_NAMES[:25])
    assert "stenosis" not in BY_SYNTAX and "catether" not in BY_SYNTAX


def test_arcade_import_round_trip(tmp_path):
    root = make_arcade(tmp_path / "in")
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root), "--out", str(out)]) == 0
    df = read_index(out / "index.csv", need_segments=True)
    assert sorted(df["split"].value_counts().items()) == [("test", 2), ("train", 2), ("val", 2)]
    assert (df["patient_id"] == df["case_id"]).all() and (df["source"] == "arcade").all()  # no patients published
    row = df[df["case_id"] == "arcade_train_1"].iloc[0]
    assert (row["source_image_id"], row["source_file_name"]) == ("1", "1.png")
    cine = np.load(row["cine_path_abs"])
    assert cine.shape == (1, SIZE, SIZE) and cine.dtype == np.uint8 and cine[0, 205, 150] == 70
    segments = np.load(row["segment_mask_path_abs"])
    lm, d1a, om2, lcx = (BY_SYNTAX[n].label for n in ("5", "9a", "12b", "13"))
    assert segments[205, 150] == lm and segments[100, 330] == d1a and segments[320, 172] == om2
    # "13" crosses the left main and is annotated first: the smaller segment keeps the crossing
    assert segments[205, 203] == lcx
    layers = np.load(out / "layers" / "arcade_train_1.npz")
    at = {int(label): layer[205, 203] for label, layer in zip(layers["labels"], layers["masks"])}
    assert at[lm] and at[lcx]  # both kept where they overlap
    mask = np.load(row["mask_path_abs"]).astype(bool)
    assert np.array_equal(mask, segments > 0)
    # stenosis is not a segment: not in the map, not in the tree; its polygon has its own file
    assert segments[199, 160] == 0 and not mask[199, 160]
    stenosis = json.loads((out / "stenosis" / "arcade_train_1.json").read_text())
    assert stenosis["source_file_name"] == "1.png"
    assert stenosis["stenoses"][0]["segmentation"] == [outline(rect(150, 198, 170, 214))]
    assert not (out / "stenosis" / "arcade_test_1.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stenosis"] == {"annotations": 4, "cases": 4, "folder": "stenosis"}
    assert manifest["overlaps"] == {"pixels": 144, "cases": 2, "per_case": {"arcade_train_1": 72, "arcade_train_2": 72}}
    assert manifest["skipped_annotations"] == [] and "smaller" in manifest["overlap_rule"]

    coco = convert(out / "index.csv", tmp_path / "coco", stage=2, workers=1)
    data = json.loads((coco / "test" / "annotations.json").read_text())
    assert [c["id"] for c in data["categories"]] == sorted([lm, BY_SYNTAX["6"].label, lcx, d1a, om2,
                                                           BY_SYNTAX["16c"].label])
    assert data["images"][0]["source_file_name"] == "1.png" and data["images"][0]["source_image_id"] == "1"


def test_arcade_old_challenge_layout(tmp_path):
    root = make_arcade(tmp_path / "in", images_per_split=1, layout="old")
    for where in (root, root / "dataset_phase_1", root / "dataset_phase_1" / "segmentation_dataset"):
        out = tmp_path / f"study_{where.name}"
        assert main(["import-arcade", "--root", str(where), "--out", str(out)]) == 0
        assert sorted(read_index(out / "index.csv")["case_id"]) == ["arcade_test_1", "arcade_train_1", "arcade_val_1"]


def test_arcade_split_map(tmp_path):
    root = make_arcade(tmp_path / "in", images_per_split=1)
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root / "arcade"), "--out", str(out),
                 "--split-map", "val=test,test=skip"]) == 0
    df = read_index(out / "index.csv")
    assert sorted(df["split"]) == ["test", "train"]
    assert set(df["case_id"]) == {"arcade_train_1", "arcade_val_1"}


def _stenosis_task(root: Path) -> Path:
    """arcade/stenosis/: the replica's images with only their stenosis annotations."""
    for split in ("train", "val", "test"):
        source, target = root / "arcade" / "syntax" / split, root / "arcade" / "stenosis" / split
        (target / "annotations").mkdir(parents=True)
        (source / "images").rename(target / "images")
        data = json.loads(truth_json(root, split).read_text())
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 26]
        (target / "annotations" / f"{split}.json").write_text(json.dumps(data))
    import shutil
    shutil.rmtree(root / "arcade" / "syntax")
    return root


def test_arcade_stenosis_task_only_when_asked(tmp_path, capsys):
    root = _stenosis_task(make_arcade(tmp_path / "in", images_per_split=1, stenosis_splits=("train", "test")))
    for where in (root, root / "arcade" / "stenosis"):
        assert main(["import-arcade", "--root", str(where), "--out", str(tmp_path / "x")]) == 2
        assert "--task stenosis" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root), "--task", "stenosis", "--out", str(out)]) == 0
    df = read_index(out / "index.csv")
    assert sorted(df["case_id"]) == ["arcade_stenosis_test_1", "arcade_stenosis_train_1"]  # val has none
    assert (df["source"] == "arcade-stenosis").all() and df["segment_mask_path"].isna().all()
    mask = np.load(df.iloc[0]["mask_path_abs"]).astype(bool)
    assert mask.sum() == 20 * 16 and mask[199, 160]  # the stenosis region is the label
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "stenosis" and manifest["stenosis"]["annotations"] == 2
    assert [s["reason"] for s in manifest["skipped_images"]] == ["no stenosis annotation"]


def test_arcade_patients_from_file_names(tmp_path, capsys):
    root = make_arcade(tmp_path / "in", images_per_split=2)
    for split in ("train", "val", "test"):  # earlier copies carried the patient: "p<patient>_<frame>.png"
        path = truth_json(root, split)
        data = json.loads(path.read_text())
        for image in data["images"]:
            name = f"p{image['id']}_{split}.png"
            (path.parent.parent / "images" / image["file_name"]).rename(path.parent.parent / "images" / name)
            image["file_name"] = name
        path.write_text(json.dumps(data))
    args = ["import-arcade", "--root", str(root), "--patient-regex", r"^p(\d+)_"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "patient 'arcade_1' has images in ARCADE's 'train' and 'val' splits" in capsys.readouterr().err
    out = tmp_path / "study"
    assert main([*args, "--resplit", "0.4,0.3,0.3", "--out", str(out)]) == 0
    df = read_index(out / "index.csv")
    assert sorted(set(df["patient_id"])) == ["arcade_1", "arcade_2"]
    assert df.groupby("patient_id")["split"].nunique().max() == 1 and len(df) == 6


def _break(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# annotation-level faults: skipped, listed with file, annotation id and reason; the rest is imported
SKIPPED = {
    "odd_polygon": (lambda d: d["annotations"][0]["segmentation"][0].pop(), "odd number of coordinates (15)"),
    "two_points": (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]]), "fewer than 3 points (2)"),
    "empty_segmentation": (lambda d: d["annotations"][0].update(segmentation=[]), "empty segmentation"),
    "rle": (lambda d: d["annotations"][0].update(segmentation={"size": [SIZE, SIZE], "counts": "0"}),
            "RLE where a polygon is expected"),
    "unknown_image_id": (lambda d: d["annotations"][0].update(image_id=77), "unknown image_id 77"),
    "unknown_category_id": (lambda d: d["annotations"][0].update(category_id=999), "unknown category_id 999"),
    "one_bad_polygon_of_two": (lambda d: d["annotations"][4]["segmentation"][1].pop(),
                               "polygon 2 of 2: odd number of coordinates (15)"),
}


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_malformed_arcade_annotation_is_skipped_and_listed(name, tmp_path):
    root = make_arcade(tmp_path / "in", images_per_split=2)
    path = truth_json(root, "val")
    edit, reason = SKIPPED[name]
    _break(path, edit)
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    index = 4 if name == "one_bad_polygon_of_two" else 0
    assert manifest["skipped_annotations"] == [{"file": str(path), "annotation_id": index + 1, "index": index,
                                                "reason": reason, "dropped": "polygons" if index else "annotation"}]
    assert len(read_index(out / "index.csv")) == 6
    if name == "one_bad_polygon_of_two":  # the good polygon of the annotation is kept
        segments = np.load(out / "segments" / "arcade_val_1.npy")
        assert segments[320, 152] == BY_SYNTAX["12b"].label and segments[320, 172] == 0
    elif name == "odd_polygon":  # "13", the crossing bar, is gone from image 1 only
        assert not (np.load(out / "segments" / "arcade_val_1.npy") == BY_SYNTAX["13"].label).any()


# file-level faults: the import stops with one line naming the file and key, nothing written
MALFORMED = {
    "unknown_category_name": (lambda d: d["categories"][3].update(name="17"), "categories[3].name"),
    "catheter_category_name": (lambda d: d["categories"][25].update(name="catether"), "categories[25].name"),
    "missing_image_file": (lambda d: d["images"][1].update(file_name="nope.png"), "images[1].file_name"),
    "escaping_image_file": (lambda d: d["images"][0].update(file_name="../../x.png"), "images[0].file_name"),
    "no_annotations_key": (lambda d: d.pop("annotations"), "annotations"),
    "image_size_mismatch": (lambda d: d["images"][0].update(height=32), "images[0]"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_arcade_coco(name, tmp_path, capsys):
    root = make_arcade(tmp_path / "in", images_per_split=2)
    path = truth_json(root, "val")
    edit, key = MALFORMED[name]
    _break(path, edit)
    out = tmp_path / "study"
    assert main(["import-arcade", "--root", str(root), "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert str(path) in message and f"key '{key}'" in message and "\n" not in message, message
    assert not out.exists() and not list(tmp_path.glob(".study.tmp-*"))


def test_arcade_invalid_json(tmp_path, capsys):
    root = make_arcade(tmp_path / "in", images_per_split=1)
    path = truth_json(root, "test")
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
