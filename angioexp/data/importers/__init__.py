"""Importers: datasets users bring → the raw index.csv layout (docs/design.md#raw-layout), ready for ``convert``.

* :mod:`.arcade` — ARCADE's COCO polygons (the syntax task: segments "1" … "16c" and
  "stenosis"; the stenosis task on request).
* :mod:`.masks` — image/mask folder pairs (DCA1, XCAD, DeepSA's FS-CAD …).

Both write ``index.csv``, ``cines/<case>.npy`` (a 1-frame T×H×W cine of the image, frame_index
0), ``masks/<case>.npy`` and (ARCADE) ``segments/<case>.npy``, ``layers/<case>.npz`` and
``stenosis/<case>.json`` plus ``manifest.json`` with what was skipped or repaired, atomically, and validate their own output with
:func:`angioexp.data.index.read_index` before it is renamed into place.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

from angioexp.data.index import read_index
from angioexp.data.schema import REQUIRED_COLUMNS, SPLITS
from angioexp.errors import InputError
from angioexp.fileio import write_json_atomic

IMAGE_SUFFIXES = (".png", ".pgm", ".tif", ".tiff", ".npy", ".bmp", ".jpg", ".jpeg")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_case_id(text: str) -> str:
    """A file-name-safe case id (see ``angioexp.data.index.CASE_ID_PATTERN``)."""
    cleaned = _UNSAFE.sub("_", text).strip("._-") or "case"
    return cleaned[:128] if cleaned[0].isalnum() else f"c{cleaned}"[:128]


def read_gray(path: Path) -> np.ndarray:
    """An image file → H×W array: uint8, uint16 (16-bit PNG/TIFF) or float32 (float TIFF/npy).

    Colour images are converted to luminance (angiograms saved as RGB are gray anyway).
    """
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"not a readable .npy array: {exc}", file=path) from None
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
            array = array[..., :3].mean(axis=-1) if array.shape[-1] > 1 else array[..., 0]
        if array.ndim != 2:
            raise InputError(f"expected a 2-D image, got shape {array.shape}", file=path)
        if array.dtype.kind == "b":
            return array.astype(np.uint8)
        if array.dtype.kind == "f" or array.dtype not in (np.uint8, np.uint16):
            return array.astype(np.float32)
        return array
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(image, dtype=np.uint16)
            if image.mode == "I":
                array = np.asarray(image)
                return array.astype(np.uint16) if array.min() >= 0 and array.max() < 65536 else array.astype(np.float32)
            if image.mode == "F":
                return np.asarray(image, dtype=np.float32)
            return np.asarray(image.convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable image: {exc}", file=path) from None


def write_study(out: Path, rows: list[dict], report: dict | None = None) -> Path:
    """Write ``index.csv`` for ``rows`` (dicts with index columns) and validate the study; with
    ``report``, add the per-split counts to it and write it as ``manifest.json``."""
    columns = list(REQUIRED_COLUMNS)
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    csv_path = out / "index.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    read_index(csv_path)  # an importer must never hand convert an invalid study
    if report is not None:
        report["counts"] = {split: sum(row["split"] == split for row in rows) for split in SPLITS}
        write_json_atomic(out / "manifest.json", report)
    return csv_path
