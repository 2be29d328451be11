"""A small ARCADE look-alike built from the published facts (no ARCADE file is copied here).

Facts: ``arcade/{syntax,stenosis}/{train,val,test}/{images,annotations}/``, one COCO JSON per
split named after it; 512×512 grayscale PNGs named ``{id}.png`` (ids restart at 1 per split);
26 categories, ids 1–25 SYNTAX segments in ARCADE's order and 26 "stenosis"; polygon
segmentations ``[[x1, y1, …]]``. The older challenge copy uses
``dataset_phase_1/segmentation_dataset/seg_{split}/annotations/seg_{split}.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# ARCADE's category names in id order (its data.yaml / submission template), written out here on
# purpose: the code's own copy is checked against it, not reused.
ARCADE_NAMES = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "9a", "10", "10a", "11", "12", "12a", "13",
                "14", "14a", "15", "16", "16a", "16b", "16c", "12b", "14b", "stenosis"]
ARCADE_ID = {name: i + 1 for i, name in enumerate(ARCADE_NAMES)}
SIZE = 512


def rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def outline(flat: list[float]) -> list[float]:
    """A polygon on pixel corners drawn the way an outline tool draws it: each corner cut 0.5 px
    back along both of its edges (the outline half-way between inside and outside pixel centres).
    pycocotools rasterises it to the same pixels as the sharp polygon."""
    points = np.asarray(flat, dtype=float).reshape(-1, 2)
    cut = []
    for i, point in enumerate(points):
        for neighbour in (points[i - 1], points[(i + 1) % len(points)]):
            step = neighbour - point
            cut.append(point + 0.5 * step / np.linalg.norm(step))
    return np.asarray(cut).ravel().tolist()


def segments_of(k: int) -> dict[str, list[list[float]]]:
    """Image k's segment outlines around whole pixels (rasterised exactly), none overlapping."""
    d = 8 * k
    return {
        "5": [outline(rect(100 + d, 200, 300, 212))],  # left main: a horizontal bar
        "6": [outline(rect(300, 120, 310, 420 - d))],  # LAD proximal: a vertical bar beside it
        # first diagonal branch a ("9a": ARCADE id 10, angioexp label 17): an L
        "9a": [outline([320, 50 + d, 340, 50 + d, 340, 150, 420, 150, 420, 160, 320, 160])],
        "16c": [outline(rect(40, 400, 52, 470))],  # ARCADE id 23, angioexp label 25
        # two pieces in one annotation ("12b": ARCADE id 24, angioexp label 20)
        "12b": [outline(rect(150, 300, 158, 380)), outline(rect(170, 300, 176, 340))],
    }


def make_arcade(root: Path, images_per_split: int = 2, *, layout: str = "released",
                stenosis_splits=("train", "val"), overlap_splits=("train",), extra=None) -> Path:
    """Write a replica under ``root`` and return ``root``.

    ``stenosis_splits`` get a stenosis polygon on the left main; ``overlap_splits`` a segment
    "13" bar crossing the left main (annotated *before* it, so file order would favour "5").
    ``extra(split, k)`` may return more annotations (name, segmentation) for image k.
    """
    categories = [{"id": ARCADE_ID[n], "name": n, "supercategory": ""} for n in ARCADE_NAMES]
    for split in ("train", "val", "test"):
        if layout == "released":
            base, json_name = root / "arcade" / "syntax" / split, f"{split}.json"
        else:
            base = root / "dataset_phase_1" / "segmentation_dataset" / f"seg_{split}"
            json_name = f"seg_{split}.json"
        (base / "images").mkdir(parents=True)
        (base / "annotations").mkdir()
        images, annotations = [], []
        for k in range(images_per_split):
            image_id = k + 1
            pixels = np.full((SIZE, SIZE), 190, np.uint8)
            pixels[200:212, 100:300] = 70
            Image.fromarray(pixels, mode="L").save(base / "images" / f"{image_id}.png")
            images.append({"id": image_id, "width": SIZE, "height": SIZE, "file_name": f"{image_id}.png",
                           "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0})
            named = []
            if split in overlap_splits:
                named.append(("13", [outline(rect(200, 150, 206, 260))]))
            named += list(segments_of(k).items())
            if split in stenosis_splits:
                named.append(("stenosis", [outline(rect(150, 198, 170, 214))]))
            named += list(extra(split, k) if extra else [])
            for name, segmentation in named:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ARCADE_ID[name],
                                    "segmentation": segmentation, "area": 0.0, "bbox": [0, 0, 0, 0],
                                    "iscrowd": 0, "attributes": {"occluded": False}})
        data = {"images": images, "categories": categories, "annotations": annotations}
        (base / "annotations" / json_name).write_text(json.dumps(data))
    return root


def truth_json(root: Path, split: str) -> Path:
    return root / "arcade" / "syntax" / split / "annotations" / f"{split}.json"
