"""Read one split of an angioexp COCO folder (written by :mod:`angioexp.data.convert`).

Shared by training and evaluation::

    split = CocoSplit.load(coco_dir, "val", gt=True)     # gt: annotations_gt.json (clean labels)
    for record in split.images:                           # ImageRecord: id, path, meta …
        image = split.image(record.id)                    # uint8 H×W
        for category_id, mask in split.instances(record.id):   # bool H×W per instance
            ...

pycocotools does the indexing and RLE decoding. Malformed files raise
:class:`~angioexp.errors.InputError` naming the file and the JSON entry.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from angioexp.errors import InputError
from angioexp.fileio import resolve_under


@dataclass(frozen=True)
class ImageRecord:
    """One image entry: the COCO fields as attributes, its absolute ``path`` and all of ``meta``.

    ``record["view"]`` reads any entry field (None when absent), like the COCO dict.
    """

    id: int
    file_name: str
    path: Path
    height: int
    width: int
    case_id: str | None
    patient_id: str | None
    frame_index: int | None
    primary_angle: float | None
    secondary_angle: float | None
    pixel_spacing_mm: float | None
    source: str | None
    view: str | None
    meta: dict = field(repr=False, compare=False)

    def __getitem__(self, key: str):
        if key == "path":
            return self.path
        return self.meta.get(key)

    def get(self, key: str, default=None):
        value = self[key]
        return default if value is None else value


def _check_structure(data, path: Path) -> None:
    """Enough structure for pycocotools and our readers; every problem names its JSON entry."""
    if not isinstance(data, dict):
        raise InputError("not a COCO object (expected a JSON object at the top)", file=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"missing or not a list: {key!r}", file=path, key=key)
    image_ids = set()
    for i, image in enumerate(data["images"]):
        for key in ("id", "file_name", "height", "width"):
            if not isinstance(image, dict) or key not in image:
                raise InputError(f"image entry lacks {key!r}", file=path, key=f"images[{i}]")
        if image["id"] in image_ids:
            raise InputError(f"duplicate image id {image['id']}", file=path, key=f"images[{i}].id")
        image_ids.add(image["id"])
    category_ids = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    seen_annotation_ids = set()
    for i, ann in enumerate(data["annotations"]):
        for key in ("id", "image_id", "category_id", "segmentation"):
            if not isinstance(ann, dict) or key not in ann:
                raise InputError(f"annotation lacks {key!r}", file=path, key=f"annotations[{i}]")
        if ann["id"] in seen_annotation_ids:
            raise InputError(f"duplicate annotation id {ann['id']}", file=path, key=f"annotations[{i}].id")
        seen_annotation_ids.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise InputError(f"unknown image_id {ann['image_id']}", file=path, key=f"annotations[{i}].image_id")
        if ann["category_id"] not in category_ids:
            raise InputError(f"unknown category_id {ann['category_id']}", file=path,
                             key=f"annotations[{i}].category_id")


class CocoSplit:
    """Images, categories and instance masks of ``<coco_dir>/<split>``."""

    def __init__(self, coco_dir: Path, split: str, annotations_path: Path, data: dict):
        self.coco_dir = coco_dir
        self.split = split
        self.annotations_path = annotations_path
        self.split_dir = annotations_path.parent
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.categories: list[dict] = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in self.categories]
        self.info: dict = data.get("info") or {}
        self.images: list[ImageRecord] = [self._record(i, im) for i, im in enumerate(data["images"])]
        self._by_id = {record.id: record for record in self.images}

    @classmethod
    def load(cls, coco_dir: str | Path, split: str, gt: bool = False) -> CocoSplit:
        """Read ``<split>/annotations.json`` (training labels) or, with ``gt``, ``annotations_gt.json``."""
        coco_dir = Path(coco_dir).resolve()
        split_dir = coco_dir / split
        path = split_dir / ("annotations_gt.json" if gt else "annotations.json")
        if not split_dir.is_dir():
            raise InputError(f"split {split!r} not found", file=coco_dir)
        if not path.is_file():
            what = "clean labels (annotations_gt.json; only Stage 1 data with gt_mask_path has them)" if gt else "annotations.json"
            raise InputError(f"{what} not found", file=path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON: {exc.msg} (line {exc.lineno})", file=path) from None
        _check_structure(data, path)
        return cls(coco_dir, split, path, data)

    def _record(self, index: int, image: dict) -> ImageRecord:
        try:  # file names come from a JSON file: keep them inside the split folder
            path = resolve_under(self.split_dir, str(image["file_name"]))
        except InputError as exc:
            raise InputError(exc.reason, file=self.annotations_path, key=f"images[{index}].file_name") from None

        def number(key):
            value = image.get(key)
            return None if value is None else float(value)

        return ImageRecord(
            id=int(image["id"]),
            file_name=image["file_name"],
            path=path,
            height=int(image["height"]),
            width=int(image["width"]),
            case_id=image.get("case_id"),
            patient_id=image.get("patient_id"),
            frame_index=image.get("frame_index"),
            primary_angle=number("primary_angle"),
            secondary_angle=number("secondary_angle"),
            pixel_spacing_mm=number("pixel_spacing_mm"),
            source=image.get("source"),
            view=image.get("view"),
            meta=dict(image),
        )

    # -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[int]:
        return [record.id for record in self.images]

    @property
    def category_names(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.categories}

    def record(self, image_id: int) -> ImageRecord:
        try:
            return self._by_id[image_id]
        except KeyError:
            raise KeyError(f"no image with id {image_id} in {self.annotations_path}") from None

    def image(self, image_id: int) -> np.ndarray:
        """uint8 H×W (the PNG as written by the converter; colour files are converted to gray)."""
        record = self.record(image_id)
        try:
            with Image.open(record.path) as handle:
                array = np.asarray(handle.convert("L") if handle.mode != "L" else handle)
        except FileNotFoundError:
            raise InputError("image file not found", file=record.path) from None
        if array.shape != (record.height, record.width):
            raise InputError(f"image is {array.shape[0]}×{array.shape[1]} but its entry says "
                             f"{record.height}×{record.width}", file=record.path)
        return array

    def annotations(self, image_id: int) -> list[dict]:
        """Raw COCO annotation dicts of an image, in id order."""
        return sorted(self.coco.imgToAnns.get(image_id, []), key=lambda a: a["id"])

    def instances(self, image_id: int) -> list[tuple[int, np.ndarray]]:
        """[(category_id, bool mask H×W)] for every annotation of the image, in id order."""
        record = self.record(image_id)
        out = []
        for ann in self.annotations(image_id):
            segmentation = ann["segmentation"]
            if isinstance(segmentation, list):  # polygons (foreign COCO files)
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, record.height, record.width))
            elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, record.height, record.width)
            else:
                rle = dict(segmentation)
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode("ascii")
            out.append((int(ann["category_id"]), mask_utils.decode(rle).astype(bool)))
        return out

    def semantic_mask(self, image_id: int, category_id: int | None = None) -> np.ndarray:
        """bool H×W union of the image's instances (of one category, or all)."""
        record = self.record(image_id)
        union = np.zeros((record.height, record.width), dtype=bool)
        for cat, mask in self.instances(image_id):
            if category_id is None or cat == category_id:
                union |= mask
        return union

    @property
    def gt_path(self) -> Path | None:
        """``annotations_gt.json`` of this split, if the dataset has clean labels."""
        path = self.split_dir / "annotations_gt.json"
        return path if path.is_file() else None

    def __repr__(self) -> str:
        return f"CocoSplit({self.annotations_path}, images={len(self.images)}, categories={len(self.categories)})"


# ---------------------------------------------------------------------------------------------
# Where predictions came from: image ids restart at 1 in every split (and every dataset), so a
# predictions file scored against another split would otherwise pass silently.

SOURCE_KEYS = ("split", "dataset_digest")


def prediction_source(coco_dir: str | Path, split: str) -> dict:
    """``{"split", "dataset_digest"}`` that every prediction made on this split carries."""
    manifest = Path(coco_dir) / "manifest.json"
    digest = None
    if manifest.is_file():
        with contextlib.suppress(OSError, ValueError):
            digest = json.loads(manifest.read_text(encoding="utf-8")).get("dataset_digest")
    return {"split": split, "dataset_digest": digest}


def check_prediction_source(predictions, coco_dir: str | Path, split: str, *, file=None) -> None:
    """Refuse predictions that record another split or dataset than the one being scored
    (entries without the record — from other tools — are accepted)."""
    if not isinstance(predictions, list):
        return  # the evaluator reports the structure
    expected = prediction_source(coco_dir, split)
    for k, pred in enumerate(predictions):
        if not isinstance(pred, dict):
            continue
        for key in SOURCE_KEYS:
            if key in pred and expected[key] is not None and pred[key] != expected[key]:
                what = "split" if key == "split" else "dataset (digest)"
                raise InputError(f"prediction {k} was made on {what} {pred[key]!r}, but this is {expected[key]!r} "
                                 f"of {coco_dir}: score it against the data it was predicted on", file=file)
