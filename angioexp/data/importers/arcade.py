"""ARCADE (syntax task, COCO polygons) → the raw index.csv layout.

``angioexp import-arcade --root DIR --out DIR [--split-map train=train,val=val,test=test]``

ARCADE layout (``--root`` may be the folder holding ``syntax/``, ``arcade/syntax/`` or ``syntax/``
itself)::

    syntax/{train,val,test}/annotations/<one>.json     COCO: images, categories, polygon annotations
    syntax/{train,val,test}/images/<file_name>         512² grayscale PNGs

Category names are SYNTAX segments ("1" … "16c", and ARCADE's "catether") and map to
:mod:`angioexp.segments` labels. Per image the importer writes:

* ``cines/<case>.npy`` — the image as a 1-frame cine (1×H×W, frame_index 0);
* ``segments/<case>.npy`` — uint8 label map. Annotations are painted in id order with the
  catheter first, so where polygons overlap the later segment wins and vessels win over the
  catheter;
* ``masks/<case>.npy`` — Stage 1 label: the union of the vessel segments (catheter excluded).

No clean labels (``gt_mask_path``) and no view angles: ARCADE publishes neither. ARCADE has no
patient ids either, so each image is its own patient (``patient_id = case_id``); ARCADE's own
split assignment is kept (remap with ``--split-map``, e.g. ``val=test``; ``test=skip`` drops a
split). Duplicate annotation ids (present in the public release) are renumbered with a warning;
images without any vessel annotation are skipped and listed in ``manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from angioexp.data.importers import read_gray, safe_case_id, write_study
from angioexp.data.schema import SPLITS
from angioexp.errors import InputError
from angioexp.fileio import atomic_dir, refuse_output_over_inputs, resolve_under
from angioexp.segments import BY_SYNTAX

log = logging.getLogger(__name__)

IMPORTER_VERSION = "1"
CATHETER_LABEL = BY_SYNTAX["catheter"].label


def find_syntax_root(root: Path) -> Path:
    for candidate in (root / "syntax", root / "arcade" / "syntax", root):
        if any((candidate / split / "annotations").is_dir() for split in SPLITS):
            return candidate
    raise InputError("no ARCADE syntax folders found (expected syntax/{train,val,test}/annotations/*.json)", file=root)


def parse_split_map(text: str | None) -> dict[str, str | None]:
    """``"train=train,val=test,test=skip"`` → {arcade split: our split or None (skip)}."""
    mapping: dict[str, str | None] = {s: s for s in SPLITS}
    if not text:
        return mapping
    for item in text.split(","):
        if "=" not in item:
            raise InputError(f"expected SOURCE=TARGET, got {item!r}", key="--split-map")
        source, target = (part.strip() for part in item.split("=", 1))
        if source not in SPLITS:
            raise InputError(f"unknown ARCADE split {source!r}", key="--split-map")
        if target in ("skip", "none", ""):
            mapping[source] = None
        elif target in SPLITS:
            mapping[source] = target
        else:
            raise InputError(f"unknown target split {target!r} (use {', '.join(SPLITS)} or skip)", key="--split-map")
    return mapping


def _load_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} (line {exc.lineno})", file=path) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", file=path) from None
    if not isinstance(data, dict):
        raise InputError("not a COCO object (expected a JSON object at the top)", file=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"missing or not a list: {key!r}", file=path, key=key)
    return data


def _category_labels(data: dict, path: Path) -> dict:
    labels = {}
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise InputError("category needs 'id' and 'name'", file=path, key=f"categories[{i}]")
        name = str(category["name"]).strip()
        if name not in BY_SYNTAX:
            raise InputError(f"unknown segment name {name!r} (expected SYNTAX names '1' … '16c' or 'catether')",
                             file=path, key=f"categories[{i}].name")
        labels[category["id"]] = BY_SYNTAX[name].label
    return labels


def _polygons(segmentation, path: Path, key: str) -> list[list[float]]:
    if not isinstance(segmentation, list) or not segmentation:
        raise InputError("expected a non-empty list of polygons", file=path, key=key)
    polygons = []
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            raise InputError("each polygon must be a flat list [x1, y1, x2, y2, …] of at least 3 points",
                             file=path, key=key)
        try:
            values = [float(v) for v in polygon]
        except (TypeError, ValueError):
            raise InputError("polygon coordinates must be numbers", file=path, key=key) from None
        if not np.isfinite(values).all():
            raise InputError("polygon coordinates must be finite", file=path, key=key)
        polygons.append(values)
    return polygons


def _import_split(split_dir: Path, target: str, out: Path, report: dict) -> list[dict]:
    jsons = sorted((split_dir / "annotations").glob("*.json"))
    if len(jsons) != 1:
        raise InputError(f"expected one annotations JSON, found {len(jsons)}", file=split_dir / "annotations")
    path = jsons[0]
    data = _load_coco(path)
    labels = _category_labels(data, path)

    images = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not all(k in image for k in ("id", "file_name", "height", "width")):
            raise InputError("image entry needs id, file_name, height, width", file=path, key=f"images[{i}]")
        if image["id"] in images:
            raise InputError(f"duplicate image id {image['id']}", file=path, key=f"images[{i}].id")
        images[image["id"]] = (i, image)

    by_image: dict = {image_id: [] for image_id in images}
    seen_ids: set = set()
    duplicates = 0
    for i, ann in enumerate(data["annotations"]):
        key = f"annotations[{i}]"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "segmentation")):
            raise InputError("annotation needs image_id, category_id, segmentation", file=path, key=key)
        if ann["image_id"] not in images:
            raise InputError(f"unknown image_id {ann['image_id']}", file=path, key=f"{key}.image_id")
        if ann["category_id"] not in labels:
            raise InputError(f"unknown category_id {ann['category_id']}", file=path, key=f"{key}.category_id")
        if ann.get("id") in seen_ids or "id" not in ann:
            duplicates += 1  # ids are not used below, only the order; renumbering is enough
        seen_ids.add(ann.get("id"))
        by_image[ann["image_id"]].append((i, ann))
    if duplicates:
        log.warning("%s: %d duplicate/missing annotation id(s) renumbered", path, duplicates)
        report["repaired_annotation_ids"][str(path)] = duplicates

    rows = []
    for image_id, (i, image) in images.items():
        stem = Path(str(image["file_name"])).stem
        case_id = safe_case_id(f"arcade_{split_dir.name}_{stem}")
        try:
            image_path = resolve_under(split_dir / "images", str(image["file_name"]))
        except InputError as exc:
            raise InputError(exc.reason, file=path, key=f"images[{i}].file_name") from None
        if not image_path.is_file():
            raise InputError(f"image file not found: {image_path}", file=path, key=f"images[{i}].file_name")
        pixels = read_gray(image_path)
        height, width = pixels.shape
        if (height, width) != (int(image["height"]), int(image["width"])):
            raise InputError(f"image is {height}×{width} but its entry says {image['height']}×{image['width']}",
                             file=path, key=f"images[{i}]")
        segment_map = np.zeros((height, width), dtype=np.uint8)
        # catheter first, then annotation order: later segments win, vessels over the catheter
        ordered = sorted(by_image[image_id], key=lambda item: (labels[item[1]["category_id"]] != CATHETER_LABEL, item[0]))
        for j, ann in ordered:
            polygons = _polygons(ann["segmentation"], path, f"annotations[{j}].segmentation")
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            segment_map[mask_utils.decode(rle).astype(bool)] = labels[ann["category_id"]]
        vessels = (segment_map > 0) & (segment_map != CATHETER_LABEL)
        if not vessels.any():
            report["skipped_images"].append({"file": str(image_path), "reason": "no vessel annotation"})
            continue
        np.save(out / "cines" / f"{case_id}.npy", pixels[None])
        np.save(out / "masks" / f"{case_id}.npy", vessels.astype(np.uint8))
        np.save(out / "segments" / f"{case_id}.npy", segment_map)
        rows.append({
            "case_id": case_id, "patient_id": case_id, "split": target,
            "cine_path": f"cines/{case_id}.npy", "frame_index": 0,
            "mask_path": f"masks/{case_id}.npy", "segment_mask_path": f"segments/{case_id}.npy",
            "source": "arcade",
        })
    return rows


def import_arcade(root: str | Path, out_dir: str | Path, *, split_map: str | dict | None = None,
                  overwrite: bool = False) -> Path:
    """Convert ARCADE's syntax task under ``root`` to an index.csv study in ``out_dir``."""
    refuse_output_over_inputs(out_dir, [root])
    syntax = find_syntax_root(Path(root).resolve())
    mapping = split_map if isinstance(split_map, dict) else parse_split_map(split_map)
    report: dict = {"importer": "arcade", "version": IMPORTER_VERSION, "source": str(syntax),
                    "split_map": mapping, "repaired_annotation_ids": {}, "skipped_images": []}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for folder in ("cines", "masks", "segments"):
            (tmp / folder).mkdir()
        rows = []
        for source, target in mapping.items():
            if target is not None and (syntax / source / "annotations").is_dir():
                rows += _import_split(syntax / source, target, tmp, report)
        if not rows:
            raise InputError("no annotated image imported", file=syntax)
        write_study(tmp, rows, report)
    log.info("imported %d ARCADE images → %s", len(rows), out_dir)
    return Path(out_dir) / "index.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="ARCADE folder (holding syntax/)")
    parser.add_argument("--out", required=True, help="output study folder (index.csv layout)")
    parser.add_argument("--split-map", default=None,
                        help="ARCADE split → angioexp split, e.g. train=train,val=val,test=skip")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    print(import_arcade(args.root, args.out, split_map=args.split_map, overwrite=args.overwrite))
    return 0
