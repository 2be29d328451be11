"""ARCADE (COCO polygons) → the raw index.csv layout. See docs/arcade.md.

``angioexp import-arcade --root DIR --out DIR [--task syntax|stenosis] [--split-map …]
[--patient-regex RE] [--resplit 0.7,0.15,0.15 --seed 0]``

Layouts accepted (``--root`` may be any folder down to the task folder itself)::

    arcade/{syntax,stenosis}/{train,val,test}/{images,annotations}/     the released dataset
    dataset_phase_1/segmentation_dataset/seg_{train,val,test}/{images,annotations}/   the older
                                                                         challenge copy (syntax only)

One COCO JSON per split's ``annotations/`` folder. ARCADE's 26 categories are
:data:`ARCADE_CATEGORIES`: ids 1–25 are SYNTAX segments, matched **by name** to
:mod:`angioexp.segments` labels (which number the lettered segments differently); id 26 is
``"stenosis"`` — a lesion, not a segment: it never enters the segment map and its polygons are
kept per case in ``stenosis/<case>.json``. The stenosis task folder is read only with
``--task stenosis``; its label (``mask_path``) is then the stenosis regions, not the vessels.

Per image the syntax import writes:

* ``cines/<case>.npy`` — the image as a 1-frame cine (1×H×W, frame_index 0);
* ``layers/<case>.npz`` — every segment's own mask (``labels`` K, ``masks`` K×H×W bool): what
  ARCADE says, overlaps included;
* ``segments/<case>.npy`` — uint8 label map for training. Where segments overlap, the segment
  with the smaller area in that image gets the pixel (a thin branch crossing or leaving a wide
  one is not erased; file order plays no part); overlapping pixels are counted per case in the
  manifest;
* ``masks/<case>.npy`` — Stage 1 label: the union of the segments;
* ``stenosis/<case>.json`` — the image's stenosis polygons, when it has any.

A malformed annotation (a polygon with < 3 points or an odd coordinate count, an empty
segmentation, an RLE where a polygon is expected, an unknown image or category id) is skipped
and listed in ``manifest.json`` with its file, annotation id and reason; an unreadable file still
stops the import with one line. Duplicate annotation ids (present in the public release) are
renumbered with a warning; images without any annotation of the task are skipped and listed.

``index.csv`` keeps what an export needs to map back: ``source_image_id`` and
``source_file_name`` (ARCADE's image id and file name; ``convert`` copies both into the COCO
image entries). ARCADE publishes no patient ids: each image is its own patient unless
``--patient-regex`` finds one in the file name (earlier copies carried it). ARCADE's own split
is kept (``--split-map val=test,test=skip`` remaps or drops splits); a patient found in two of
ARCADE's splits stops the import unless ``--resplit`` draws new splits by patient. No clean
labels and no view angles: ARCADE publishes neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from angioexp.data.importers import read_gray, safe_case_id, write_study
from angioexp.data.importers.masks import assign_splits, parse_ratios
from angioexp.data.schema import SPLITS
from angioexp.errors import InputError
from angioexp.fileio import atomic_dir, refuse_output_over_inputs, resolve_under
from angioexp.segments import BY_SYNTAX

log = logging.getLogger(__name__)

IMPORTER_VERSION = "2"
STENOSIS = "stenosis"
# ARCADE's category list, as in its data.yaml and submission template: (id, name).
ARCADE_CATEGORIES: tuple[tuple[int, str], ...] = tuple(enumerate((
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "9a", "10", "10a", "11", "12", "12a", "13",
    "14", "14a", "15", "16", "16a", "16b", "16c", "12b", "14b", STENOSIS), start=1))
TASKS = ("syntax", STENOSIS)
# the older challenge copy: dataset_phase_1/segmentation_dataset/seg_{split}/
OLD_LAYOUT = ("dataset_phase_1", "segmentation_dataset")
OLD_SPLIT_PREFIX = "seg_"
OVERLAP_RULE = "smaller segment wins (area in that image; ties: lower label)"


def _has_splits(folder: Path, prefix: str = "") -> bool:
    return any((folder / f"{prefix}{split}" / "annotations").is_dir() for split in SPLITS)


def find_split_dirs(root: Path, task: str = "syntax") -> tuple[Path, dict[str, Path]]:
    """``root`` → (task folder, {ARCADE split: its folder}) in the released or the older layout.

    A task folder other than ``task`` is refused (ARCADE's stenosis task must be asked for).
    """
    if task not in TASKS:
        raise InputError(f"unknown ARCADE task {task!r} (expected {' or '.join(TASKS)})", key="--task")
    for candidate in (root / task, root / "arcade" / task, root):
        if _has_splits(candidate):
            if candidate.name in TASKS and candidate.name != task:
                raise InputError(f"this is ARCADE's {candidate.name} task folder; pass --task {candidate.name} "
                                 f"to import it", file=candidate)
            return candidate, {s: candidate / s for s in SPLITS if (candidate / s / "annotations").is_dir()}
    if task == "syntax":
        for candidate in (root.joinpath(*OLD_LAYOUT), root / OLD_LAYOUT[1], root):
            if _has_splits(candidate, OLD_SPLIT_PREFIX):
                return candidate, {s: candidate / f"{OLD_SPLIT_PREFIX}{s}" for s in SPLITS
                                   if (candidate / f"{OLD_SPLIT_PREFIX}{s}" / "annotations").is_dir()}
    others = [t for t in TASKS if t != task and any(_has_splits(c) for c in (root / t, root / "arcade" / t))]
    hint = f"; found ARCADE's {others[0]} task: pass --task {others[0]}" if others else ""
    raise InputError(f"no ARCADE {task} folders found (expected {task}/{{train,val,test}}/annotations/*.json or "
                     f"{'/'.join(OLD_LAYOUT)}/seg_{{train,val,test}}/annotations/*.json){hint}", file=root)


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
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=path) from None
    if not isinstance(data, dict):
        raise InputError("not a COCO object (expected a JSON object at the top)", file=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"missing or not a list: {key!r}", file=path, key=key)
    return data


def _category_kinds(data: dict, path: Path) -> dict:
    """category id → segment label (int) or :data:`STENOSIS`, matched by ARCADE's names."""
    kinds = {}
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise InputError("category needs 'id' and 'name'", file=path, key=f"categories[{i}]")
        name = str(category["name"]).strip()
        if name == STENOSIS:
            kinds[category["id"]] = STENOSIS
        elif name in BY_SYNTAX and BY_SYNTAX[name].system != "device":
            kinds[category["id"]] = BY_SYNTAX[name].label
        else:
            raise InputError(f"unknown category name {name!r} (expected ARCADE's: SYNTAX segments "
                             f"'1' … '16c' and '{STENOSIS}')", file=path, key=f"categories[{i}].name")
    return kinds


def polygon_problem(segmentation) -> tuple[list[list[float]], list[str]]:
    """An annotation's ``segmentation`` → (its usable polygons, what is wrong with the others)."""
    if isinstance(segmentation, dict):
        return [], ["RLE where a polygon is expected"]
    if not isinstance(segmentation, list) or not segmentation:
        return [], ["empty segmentation"]
    polygons, problems = [], []
    for k, polygon in enumerate(segmentation):
        where = f"polygon {k + 1} of {len(segmentation)}: " if len(segmentation) > 1 else ""
        if not isinstance(polygon, list):
            problems.append(f"{where}not a flat coordinate list")
        elif len(polygon) % 2:
            problems.append(f"{where}odd number of coordinates ({len(polygon)})")
        elif len(polygon) < 6:
            problems.append(f"{where}fewer than 3 points ({len(polygon) // 2})")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
            problems.append(f"{where}coordinates are not numbers")
        elif not np.isfinite(np.asarray(polygon, dtype=float)).all():
            problems.append(f"{where}coordinates are not finite")
        else:
            polygons.append([float(v) for v in polygon])
    return polygons, problems


def _check_annotation(ann, images: dict, kinds: dict) -> str | None:
    if not isinstance(ann, dict):
        return "not an object"
    missing = [k for k in ("image_id", "category_id", "segmentation") if k not in ann]
    if missing:
        return f"missing {', '.join(missing)}"
    if ann["image_id"] not in images:
        return f"unknown image_id {ann['image_id']!r}"
    if ann["category_id"] not in kinds:
        return f"unknown category_id {ann['category_id']!r}"
    return None


def _rasterise(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def label_map(layers: dict[int, np.ndarray]) -> tuple[np.ndarray, int]:
    """{label: H×W bool} → (uint8 label map under :data:`OVERLAP_RULE`, pixels in ≥ 2 segments)."""
    shape = next(iter(layers.values())).shape
    labels = np.zeros(shape, dtype=np.uint8)
    # paint the largest first so that smaller segments end up on top
    for label in sorted(layers, key=lambda lb: (-int(layers[lb].sum()), -lb)):
        labels[layers[label]] = label
    coverage = np.sum([layer.astype(np.uint8) for layer in layers.values()], axis=0)
    return labels, int(np.count_nonzero(coverage > 1))


class _SplitImport:
    """One ARCADE split's JSON → rows and files under ``out``; problems go to ``report``."""

    def __init__(self, split_dir: Path, split_name: str, target: str, task: str, out: Path, report: dict,
                 patient_pattern):
        jsons = sorted((split_dir / "annotations").glob("*.json"))
        if len(jsons) != 1:
            raise InputError(f"expected one annotations JSON, found {len(jsons)}", file=split_dir / "annotations")
        self.path = jsons[0]
        self.split_dir, self.target, self.task, self.out = split_dir, target, task, out
        self.report, self.patient_pattern = report, patient_pattern
        self.split_name = split_name  # ARCADE's: train / val / test, in either layout

    def skip(self, index: int, ann, reason: str, dropped: str = "annotation") -> None:
        """List a malformed annotation (``dropped``: "annotation", or "polygons" when some remain)."""
        annotation_id = ann.get("id") if isinstance(ann, dict) else None
        self.report["skipped_annotations"].append({"file": str(self.path), "annotation_id": annotation_id,
                                                   "index": index, "reason": reason, "dropped": dropped})
        log.warning("%s: annotations[%d] (id %s): %s dropped: %s", self.path, index, annotation_id, dropped, reason)

    def run(self) -> list[dict]:
        path = self.path
        data = _load_coco(path)
        kinds = _category_kinds(data, path)
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
            problem = _check_annotation(ann, images, kinds)
            if problem is not None:
                self.skip(i, ann, problem)
                continue
            polygons, problems = polygon_problem(ann["segmentation"])
            if problems:
                self.skip(i, ann, "; ".join(problems), "polygons" if polygons else "annotation")
            if not polygons:
                continue
            if ann.get("id") in seen_ids or "id" not in ann:
                duplicates += 1  # ids are only reported, never used to pair anything: renumbering is enough
            seen_ids.add(ann.get("id"))
            by_image[ann["image_id"]].append((kinds[ann["category_id"]], polygons, ann.get("id")))
        if duplicates:
            log.warning("%s: %d duplicate/missing annotation id(s) renumbered", path, duplicates)
            self.report["repaired_annotation_ids"][str(path)] = duplicates
        return [row for image_id, (i, image) in images.items()
                if (row := self.image(i, image, by_image[image_id])) is not None]

    def image(self, i: int, image: dict, annotations: list) -> dict | None:
        path = self.path
        file_name = str(image["file_name"])
        stem = Path(file_name).stem
        prefix = "arcade" if self.task == "syntax" else f"arcade_{self.task}"
        case_id = safe_case_id(f"{prefix}_{self.split_name}_{stem}")
        try:
            image_path = resolve_under(self.split_dir / "images", file_name)
        except InputError as exc:
            raise InputError(exc.reason, file=path, key=f"images[{i}].file_name") from None
        if not image_path.is_file():
            raise InputError(f"image file not found: {image_path}", file=path, key=f"images[{i}].file_name")
        pixels = read_gray(image_path)
        height, width = pixels.shape
        if (height, width) != (int(image["height"]), int(image["width"])):
            raise InputError(f"image is {height}×{width} but its entry says {image['height']}×{image['width']}",
                             file=path, key=f"images[{i}]")

        layers: dict[int, np.ndarray] = {}
        stenoses = []
        for kind, polygons, annotation_id in annotations:
            if kind == STENOSIS:
                stenoses.append({"annotation_id": annotation_id, "segmentation": polygons})
            elif self.task == "syntax":  # segment polygons in the stenosis task are not its label
                mask = _rasterise(polygons, height, width)
                layers[kind] = layers[kind] | mask if kind in layers else mask
        if self.task == STENOSIS:
            label = _rasterise([p for s in stenoses for p in s["segmentation"]], height, width) if stenoses else None
        else:
            label = np.logical_or.reduce(list(layers.values())) if layers else None
        if label is None or not label.any():
            self.report["skipped_images"].append({"file": str(image_path), "reason": f"no {self.task} annotation"})
            return None

        np.save(self.out / "cines" / f"{case_id}.npy", pixels[None])
        np.save(self.out / "masks" / f"{case_id}.npy", label.astype(np.uint8))
        row = {
            "case_id": case_id, "patient_id": self.patient_of(stem, path, i) or case_id, "split": self.target,
            "cine_path": f"cines/{case_id}.npy", "frame_index": 0, "mask_path": f"masks/{case_id}.npy",
            "source": "arcade" if self.task == "syntax" else f"arcade-{self.task}",
            "source_image_id": image["id"], "source_file_name": file_name,
        }
        if layers:
            segment_map, overlap = label_map(layers)
            np.save(self.out / "segments" / f"{case_id}.npy", segment_map)
            order = sorted(layers)
            np.savez_compressed(self.out / "layers" / f"{case_id}.npz", labels=np.array(order, dtype=np.uint8),
                                masks=np.stack([layers[lb] for lb in order]))
            row["segment_mask_path"] = f"segments/{case_id}.npy"
            if overlap:
                self.report["overlaps"]["per_case"][case_id] = overlap
        if stenoses:
            (self.out / STENOSIS / f"{case_id}.json").write_text(json.dumps(
                {"source_image_id": image["id"], "source_file_name": file_name, "height": height, "width": width,
                 "stenoses": stenoses}), encoding="utf-8")
            counts = self.report["stenosis"]
            counts["annotations"] += len(stenoses)
            counts["cases"] += 1
        return row

    def patient_of(self, stem: str, path: Path, i: int) -> str | None:
        if self.patient_pattern is None:
            return None
        match = self.patient_pattern.search(stem)
        if match is None:
            raise InputError(f"--patient-regex {self.patient_pattern.pattern!r} does not match {stem!r}",
                             file=path, key=f"images[{i}].file_name")
        return safe_case_id(f"arcade_{match.group(1) if match.groups() else match.group(0)}")


def _check_patients(rows: list[dict]) -> None:
    split_of: dict[str, str] = {}
    for row in rows:
        first = split_of.setdefault(row["patient_id"], row["split"])
        if first != row["split"]:
            raise InputError(f"patient {row['patient_id']!r} has images in ARCADE's {first!r} and {row['split']!r} "
                             "splits; pass --resplit to draw splits by patient", key="--patient-regex")


def import_arcade(root: str | Path, out_dir: str | Path, *, split_map: str | dict | None = None,
                  task: str = "syntax", patient_regex: str | None = None, resplit: str | None = None,
                  seed: int = 0, overwrite: bool = False) -> Path:
    """Convert ARCADE's ``task`` under ``root`` to an index.csv study in ``out_dir``."""
    refuse_output_over_inputs(out_dir, [root])
    task_root, split_dirs = find_split_dirs(Path(root).resolve(), task)
    mapping = split_map if isinstance(split_map, dict) else parse_split_map(split_map)
    try:
        pattern = re.compile(patient_regex) if patient_regex else None
    except re.error as exc:
        raise InputError(f"not a valid regular expression: {exc}", key="--patient-regex") from None
    ratios = parse_ratios(resplit) if resplit else None
    report: dict = {
        "importer": "arcade", "version": IMPORTER_VERSION, "task": task, "source": str(task_root),
        "split_map": mapping, "resplit": {"ratios": ratios, "seed": seed} if ratios else None,
        "patients": "from --patient-regex" if pattern else "none published: one per image",
        "overlap_rule": OVERLAP_RULE, "overlaps": {"pixels": 0, "cases": 0, "per_case": {}},
        "stenosis": {"annotations": 0, "cases": 0, "folder": STENOSIS},
        "repaired_annotation_ids": {}, "skipped_annotations": [], "skipped_images": [],
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for folder in ("cines", "masks", "segments", "layers", STENOSIS):
            (tmp / folder).mkdir()
        rows = []
        for source, target in mapping.items():
            if target is not None and source in split_dirs:
                rows += _SplitImport(split_dirs[source], source, target, task, tmp, report, pattern).run()
        if not rows:
            raise InputError("no annotated image imported", file=task_root)
        if ratios:
            split_of = assign_splits([row["patient_id"] for row in rows], ratios, seed)
            for row in rows:
                row["split"] = split_of[row["patient_id"]]
        _check_patients(rows)
        overlaps = report["overlaps"]
        overlaps["pixels"], overlaps["cases"] = sum(overlaps["per_case"].values()), len(overlaps["per_case"])
        write_study(tmp, rows, report)
    log.info("imported %d ARCADE images → %s (%d skipped annotations, %d cases with overlaps)", len(rows), out_dir,
             len(report["skipped_annotations"]), report["overlaps"]["cases"])
    return Path(out_dir) / "index.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="downloaded ARCADE folder (holding arcade/, syntax/ or "
                                                      "dataset_phase_1/), or the task folder itself")
    parser.add_argument("--out", required=True, help="output study folder (index.csv layout)")
    parser.add_argument("--task", choices=TASKS, default="syntax",
                        help="syntax: the segments (default); stenosis: the stenosis task folder")
    parser.add_argument("--split-map", default=None,
                        help="ARCADE split → angioexp split, e.g. train=train,val=val,test=skip")
    parser.add_argument("--patient-regex", default=None,
                        help="regex on the file stem whose first group is the patient (default: one per image)")
    parser.add_argument("--resplit", default=None, metavar="RATIOS",
                        help="draw new train,val,test splits by patient, e.g. 0.7,0.15,0.15")
    parser.add_argument("--seed", type=int, default=0, help="seed of --resplit")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    print(import_arcade(args.root, args.out, split_map=args.split_map, task=args.task,
                        patient_regex=args.patient_regex, resplit=args.resplit, seed=args.seed,
                        overwrite=args.overwrite))
    return 0
