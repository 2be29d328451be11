"""angioexp predictions → ARCADE's submission format: ``angioexp export-arcade``. See docs/arcade.md.

``angioexp export-arcade --coco COCO/test --predictions preds.json --out submission.json
[--template empty_annotations.json] [--score-threshold 0.5]``

* ``--coco``: the converted Stage 2 split the predictions were made on (its folder or its
  ``annotations.json``); ``--predictions``: COCO results (RLE masks) on that split's ids, as
  ``angioexp evaluate --predictions`` reads them.
* Images get ARCADE's id and file name back from the image entries (``source_image_id``,
  ``source_file_name``, written by ``import-arcade``; otherwise the COCO id and file name).
* Categories are ARCADE's 26 (its template's list when ``--template`` is given, else
  :data:`~angioexp.data.importers.arcade.ARCADE_CATEGORIES`), matched **by SYNTAX name**:
  angioexp's label ids differ from ARCADE's for every lettered segment. angioexp categories
  without an ARCADE counterpart (the catheter) are left out.
* Per image and category, the detections at ``score ≥ --score-threshold`` are merged and written
  as one annotation with one polygon per piece (:func:`mask_polygons`: outlines half-way between
  inside and outside pixel centres, which rasterise back to the mask), largest first: ARCADE's
  scorer reads only the first polygon. Holes are filled (ARCADE's polygons have none). Masks are
  scaled to the template's image size when it differs.
* With ``--template`` (ARCADE's ``empty_annotations.json`` or a truth file) the submission lists
  the template's images and categories verbatim, as the scorer expects.

An existing ``--out`` is refused (one line, nothing written); the file is written atomically.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from angioexp.data.importers.arcade import ARCADE_CATEGORIES
from angioexp.errors import InputError
from angioexp.evaluate.evaluator import _read_json, check_predictions, load_ground_truth
from angioexp.evaluate.rle import decode
from angioexp.fileio import write_json_atomic
from angioexp.segments import BY_LABEL

log = logging.getLogger(__name__)


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def mask_polygons(mask: np.ndarray, scale_x: float = 1.0, scale_y: float = 1.0) -> list[np.ndarray]:
    """H×W bool → the outlines of its 8-connected pieces as N×2 (x, y) arrays, largest first.

    The outline runs half-way between inside and outside pixel centres (marching squares at 0.5),
    in COCO's coordinates (pixel (r, c) is the square [c, c+1]×[r, r+1]): smooth like a drawn
    outline, and rasterising it (pycocotools) gives the mask back. Holes are filled. Straight runs
    keep only their end points.
    """
    from skimage.measure import find_contours

    outlines = []
    for contour in find_contours(np.pad(mask.astype(np.uint8), 1), 0.5, fully_connected="high"):
        points = np.stack([contour[:-1, 1] - 0.5, contour[:-1, 0] - 0.5], axis=1)  # (row, col) → (x, y), unpadded
        if len(points) < 3 or _signed_area(points) <= 0:  # holes run the other way round
            continue
        before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
        turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        outlines.append(points[turn != 0] * (scale_x, scale_y))
    return sorted(outlines, key=lambda points: -_signed_area(points))


def _flat(points: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in points.ravel()]


def _arcade_image(image: dict) -> tuple[int, str]:
    """A converted image entry → (ARCADE image id, ARCADE file name)."""
    source_id = image.get("source_image_id")
    try:
        arcade_id = int(source_id) if source_id is not None else image["id"]
    except (TypeError, ValueError):
        arcade_id = image["id"]
    return arcade_id, str(image.get("source_file_name") or Path(image["file_name"]).name)


def _template(path: str | Path) -> dict:
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("categories"), list):
        raise InputError("template needs 'images' and 'categories' lists (ARCADE's empty_annotations.json)", file=path)
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not all(key in image for key in ("id", "file_name", "height", "width")):
            raise InputError(f"images[{k}] needs id, file_name, height, width", file=path)
    for k, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise InputError(f"categories[{k}] needs 'id' and 'name'", file=path)
    return data


def _coco_json(coco: str | Path) -> Path:
    path = Path(coco)
    return path / "annotations.json" if path.is_dir() else path


def export_arcade(coco: str | Path | dict, predictions: str | Path | list, out: str | Path, *,
                  template: str | Path | None = None, score_threshold: float = 0.5) -> Path:
    """Write ``predictions`` on the converted split ``coco`` (or its COCO dict: ``angioexp
    predict``'s frames) as an ARCADE submission at ``out``."""
    out = Path(out)
    if out.exists():
        raise InputError(f"output already exists (choose another --out): {out}")
    coco_file = None if isinstance(coco, dict) else _coco_json(coco)
    gt = load_ground_truth(coco if coco_file is None else coco_file)
    prediction_file = None
    if not isinstance(predictions, list):
        prediction_file = Path(predictions)
        predictions = _read_json(prediction_file)
    detections = check_predictions(gt, predictions, file=prediction_file)

    if template is not None:
        data = _template(template)
        images, categories = data["images"], data["categories"]
    else:
        images = [{"id": arcade_id, "file_name": name, "height": image["height"], "width": image["width"]}
                  for arcade_id, name, image in ((*_arcade_image(image), image) for image in gt.images.values())]
        categories = [{"id": cid, "name": name, "supercategory": ""} for cid, name in ARCADE_CATEGORIES]
    arcade_id_of_name = {str(c["name"]).strip(): c["id"] for c in categories}
    by_file = {image["file_name"]: image for image in images}

    category_of: dict[int, int] = {}  # angioexp label → ARCADE id
    for label, category in gt.categories.items():
        name = category.get("syntax") or (BY_LABEL[label].syntax if label in BY_LABEL else None)
        if name in arcade_id_of_name:
            category_of[label] = arcade_id_of_name[name]
    if not category_of:
        raise InputError("none of the split's segments is among the template's categories (expected ARCADE's "
                         "names '1' … '16c')", file=template)
    target_of: dict[int, dict] = {}  # angioexp image id → ARCADE image entry
    case_of_file: dict[str, str] = {}
    for image_id, image in gt.images.items():
        _, file_name = _arcade_image(image)
        if file_name in case_of_file:  # e.g. --split-map val=test: ARCADE's ids restart in every split
            raise InputError(f"cases {case_of_file[file_name]} and {image.get('case_id')} both come from ARCADE's "
                             f"{file_name!r}: this split mixes ARCADE splits; export one ARCADE split at a time",
                             file=coco_file)
        case_of_file[file_name] = image.get("case_id")
        if file_name not in by_file:
            raise InputError(f"image {file_name!r} (case {image.get('case_id')}) is not in the template", file=template)
        target_of[image_id] = by_file[file_name]

    merged: dict[tuple[int, int], list[dict]] = defaultdict(list)
    left_out = 0
    for det in detections:
        if det["score"] < score_threshold:
            continue
        if det["category_id"] not in category_of:
            left_out += 1
            continue
        merged[det["image_id"], det["category_id"]].append(det["segmentation"])
    if left_out:
        log.info("left out %d detection(s) of categories ARCADE does not have (e.g. the catheter)", left_out)

    annotations = []
    for (image_id, label), rles in sorted(merged.items(), key=lambda item: (item[0][0], category_of[item[0][1]])):
        image, target = gt.images[image_id], target_of[image_id]
        mask = decode(rles[0] if len(rles) == 1 else mask_utils.merge(rles))
        polygons = mask_polygons(mask, target["width"] / image["width"], target["height"] / image["height"])
        if not polygons:
            continue
        corners = np.concatenate(polygons)
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        annotations.append({
            "id": len(annotations) + 1, "image_id": target["id"], "category_id": category_of[label],
            "segmentation": [_flat(p) for p in polygons], "area": round(sum(_signed_area(p) for p in polygons), 3),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0,
        })
    write_json_atomic(out, {"images": images, "categories": categories, "annotations": annotations}, indent=None)
    log.info("wrote %d ARCADE annotations on %d images → %s", len(annotations), len(images), out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco", required=True, help="converted Stage 2 split (folder or its annotations.json)")
    parser.add_argument("--predictions", required=True, help="COCO results JSON (RLE masks) on that split")
    parser.add_argument("--out", required=True, help="submission JSON to write (must not exist)")
    parser.add_argument("--template", default=None,
                        help="ARCADE's empty_annotations.json (or a truth JSON): its images and categories are used")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="detections below this are left out")


def run(args: argparse.Namespace) -> int:
    print(export_arcade(args.coco, args.predictions, args.out, template=args.template,
                        score_threshold=args.score_threshold))
    return 0
