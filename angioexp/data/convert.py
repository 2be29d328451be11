"""``index.csv`` → COCO (docs/design.md#coco-layout): ``angioexp convert --index CSV --out DIR --stage 1|2``.

Output, per split present in the CSV::

    {split}/images/<case_id>.png     8-bit grayscale annotated frame
    {split}/annotations.json         the TRAINING labels (Stage 1: mask_path; Stage 2: segment_mask_path)
    {split}/annotations_gt.json      Stage 1 only, when the split has gt_mask_path: clean labels, same image ids
    manifest.json                    stage, size, categories, counts, source sha256, version, dataset digest

Images: uint8 cines are written as they are. uint16 and float cines are windowed **per frame**
to the 0.5th–99.5th percentile of that frame's pixels (linear to 0–255, clipped): robust to a
few saturated or dead pixels, and it keeps the vessel contrast of each frame whatever the
detector's bit depth. ``--size N`` scales every frame so that its longer side is N
(anti-aliased bilinear for frames, nearest-neighbour for masks; ``pixel_spacing_mm`` is scaled
to match). Masks stored at another size than their frame (same aspect ratio) are resized to the
frame with nearest-neighbour.

Annotations: RLE (pycocotools, ``counts`` as str), ``bbox`` and ``area`` from the mask,
``iscrowd`` 0. Stage 1: one instance per frame, the whole tree, category
``angioexp.segments.STAGE1_CATEGORY``. Stage 2: one instance per 8-connected component of each
segment's mask; components smaller than :data:`MIN_COMPONENT_AREA` pixels (after resizing) are
dropped — specks left by nearest-neighbour resizing or label painting, not anatomy — and counted
in the manifest. Stage 2 categories are the segments present anywhere in the dataset, the same
list in every split, category id = segment label.

Frames are converted in parallel worker processes; the output depends only on the input (image
and annotation ids follow the CSV's row order), never on the number of workers. Everything is
written into a temporary sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import os
import struct
import threading
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from angioexp.data.index import ROW_COLUMN, abs_column, load_row, read_table
from angioexp.data.schema import PATH_COLUMNS
from angioexp.errors import InputError
from angioexp.fileio import atomic_dir, refuse_output_over_inputs, write_bytes_atomic, write_json_atomic
from angioexp.segments import STAGE1_CATEGORY, stage2_categories

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
MIN_COMPONENT_AREA = 4  # px; Stage 2 components below this are dropped (see module doc)
WINDOW_PERCENTILES = (0.5, 99.5)
WINDOWING = (
    "uint8 as is; uint16/float windowed per frame to the 0.5-99.5th percentile, linear to 0-255"
)
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
MIN_ROWS_FOR_PROCESSES = 24  # below this, starting worker processes costs more than it saves


# ---------------------------------------------------------------------------------------------
# Pixels


def _percentiles_uint16(frame: np.ndarray, quantiles) -> list[float]:
    """Linear-interpolated percentiles of a uint16 image from its histogram (no sort)."""
    cumulative = np.cumsum(np.bincount(frame.ravel(), minlength=1))
    n = int(cumulative[-1])
    out = []
    for q in quantiles:
        position = (n - 1) * q / 100.0
        below = int(np.floor(position))
        # value of the i-th smallest pixel (0-based): first bin whose cumulative count exceeds i
        low, high = np.searchsorted(cumulative, [below, min(below + 1, n - 1)], side="right")
        out.append(float(low) + (position - below) * float(high - low))
    return out


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """H×W uint8/uint16/float → H×W uint8 (uint16/float: per-frame robust percentile window).

    The window is [p0.5, p99.5] of the frame's pixels (linear interpolation between order
    statistics), mapped linearly to 0–255 and clipped; a constant frame becomes 0.
    """
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype == np.uint16:  # histogram + lookup table: ~5× cheaper than sorting floats
        low, high = _percentiles_uint16(frame, WINDOW_PERCENTILES)
        values = np.arange(int(frame.max()) + 1, dtype=np.float32)
    else:
        values = frame.astype(np.float32, copy=False)
        low, high = (float(v) for v in np.percentile(values, WINDOW_PERCENTILES))
    if not high > low:
        return np.zeros(frame.shape, dtype=np.uint8)
    scaled = (values - np.float32(low)) * np.float32(255.0 / (high - low)) + np.float32(0.5)
    mapped = np.clip(scaled, 0, 255).astype(np.uint8)
    return mapped[frame] if frame.dtype == np.uint16 else mapped


def output_shape(height: int, width: int, size: int | None) -> tuple[int, int]:
    """The frame's size, or the longer side scaled to ``size`` (aspect kept, rounded)."""
    if size is None:
        return height, width
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 H×W → shape (h, w), anti-aliased bilinear (Pillow widens the kernel when shrinking)."""
    if image.shape == shape:
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool or uint8 label map H'×W' → shape (h, w), nearest-neighbour (labels never blend)."""
    if labels.shape == shape:
        return labels
    as_u8 = labels.astype(np.uint8, copy=False)
    out = np.asarray(Image.fromarray(as_u8).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    return out.astype(bool) if labels.dtype == bool else out


def encode_png_gray8(image: np.ndarray) -> bytes:
    """H×W uint8 → PNG bytes (8-bit grayscale, 'Up' filter, Huffman-only deflate).

    Written by hand because Pillow's adaptive filtering + default deflate costs ~30 ms per 512²
    noisy frame here, a third of the whole per-frame budget. Angiograms are noisy, so string
    matching finds little: one vectorised 'Up' filter + Huffman coding is ~5× faster and the
    files are as small as Pillow's level 6 (±2 %).
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type "Up": each byte minus the byte above it (mod 256)
    rows[0, 1:] = image[0]
    np.subtract(image[1:], image[:-1], out=rows[1:, 1:])
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = packer.compress(rows.tobytes()) + packer.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def encode_instance(mask: np.ndarray, category_id: int) -> dict:
    """bool/uint8 H×W → COCO annotation body (no ids): RLE with str counts, bbox, area, iscrowd 0."""
    rle = mask_utils.encode(np.asfortranarray(mask.view(np.uint8) if mask.dtype == bool else mask, dtype=np.uint8))
    return _annotation(rle, category_id)


def _annotation(rle: dict, category_id: int) -> dict:
    return {
        "category_id": int(category_id),
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def encode_piece(piece: np.ndarray, top: int, left: int, height: int, width: int, category_id: int) -> dict:
    """Like :func:`encode_instance` for a mask that is zero outside ``piece`` (bool h×w at top/left).

    COCO RLE runs go down the columns of the full H×W mask. Columns left and right of the
    piece are all background, so only the piece's columns are scanned (full height); the
    outer columns just lengthen the first and last background runs. Same bytes as
    pycocotools.encode on the full mask, without building it (Stage 2 has ~15 pieces/frame).
    """
    h, w = piece.shape
    columns = np.zeros((w, height), dtype=bool)  # the piece's columns, column-major order
    columns[:, top : top + h] = piece.T
    flat = columns.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat[0]:  # COCO RLE starts with a background run, possibly empty
        runs = np.concatenate(([0], runs))
    runs[0] += left * height
    after = (width - left - w) * height
    if flat[-1]:
        if after:
            runs = np.concatenate((runs, [after]))
    else:
        runs[-1] += after
    rle = mask_utils.frPyObjects({"counts": runs.tolist(), "size": [height, width]}, height, width)
    return _annotation(rle, category_id)


def segment_instances(labels: np.ndarray) -> tuple[list[dict], int]:
    """uint8 label map H×W → (one annotation body per 8-connected piece of each label, #dropped).

    Pieces are ordered by label, then by raster order of their first pixel (deterministic).
    """
    height, width = labels.shape
    instances: list[dict] = []
    dropped = 0
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, count = ndimage.label(labels[box] == label, structure=EIGHT_CONNECTED)
        areas = np.bincount(pieces.ravel(), minlength=count + 1)
        # each piece is cut from its own bounding box: a long catheter split by crossing
        # vessels is not re-scanned whole for every one of its pieces
        for piece, sub in enumerate(ndimage.find_objects(pieces), start=1):
            if areas[piece] < MIN_COMPONENT_AREA:
                dropped += 1
                continue
            top, left = box[0].start + sub[0].start, box[1].start + sub[1].start
            instances.append(encode_piece(pieces[sub] == piece, top, left, height, width, label))
    return instances, dropped


# ---------------------------------------------------------------------------------------------
# One frame (runs in a worker process)


def _convert_row(task: tuple) -> dict:
    """Validate + convert one index row; write its PNG. Errors come back as data (picklable)."""
    row, csv_path, stage, size, out_root = task
    try:
        labels = ("mask_path", "gt_mask_path") if stage == 1 else ("segment_mask_path",)
        arrays = load_row(row, csv_path=csv_path, need_segments=stage == 2, labels=labels)
    except InputError as exc:
        return {"error": {"file": exc.file, "row": exc.row, "column": exc.column, "reason": exc.reason}}
    height, width = arrays.frame.shape
    shape = output_shape(height, width, size)
    image = resize_image(to_uint8(arrays.frame), shape)
    file_name = f"images/{row['case_id']}.png"
    (Path(out_root) / row["split"] / file_name).write_bytes(encode_png_gray8(image))

    result: dict = {"file_name": file_name, "shape": shape, "orig_shape": (height, width), "dropped": 0, "empty": []}
    if stage == 1:
        mask = resize_labels(arrays.mask, shape)
        result["instances"] = [encode_instance(mask, STAGE1_CATEGORY["id"])] if mask.any() else []
        if not mask.any():
            result["empty"].append("mask_path")
        if arrays.gt_mask is not None:
            gt = resize_labels(arrays.gt_mask, shape)
            result["gt_instances"] = [encode_instance(gt, STAGE1_CATEGORY["id"])] if gt.any() else []
            if not gt.any():
                result["empty"].append("gt_mask_path")
    else:
        labels = resize_labels(arrays.segment_map, shape)
        result["instances"], result["dropped"] = segment_instances(labels)
    return result


def _optional(value):
    """NaN / None → None (JSON null); numpy scalars → Python."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _image_entry(image_id: int, row: dict, result: dict) -> dict:
    height, width = result["shape"]
    spacing = _optional(row["pixel_spacing_mm"])
    if spacing is not None:
        spacing = round(spacing * result["orig_shape"][1] / width, 9)  # mm per output pixel
    return {
        "id": image_id,
        "file_name": result["file_name"],
        "height": int(height),
        "width": int(width),
        "case_id": row["case_id"],
        "patient_id": row["patient_id"],
        "frame_index": int(row["frame_index"]),
        "primary_angle": _optional(row["primary_angle"]),
        "secondary_angle": _optional(row["secondary_angle"]),
        "pixel_spacing_mm": spacing,
        "source": _optional(row["source"]),
        "view": _optional(row["view"]),
        "dominance": _optional(row["dominance"]),
        # where the frame came from in an imported dataset (export-arcade maps back by it)
        **{key: row[key] for key in ("source_image_id", "source_file_name") if _optional(row[key]) is not None},
    }


def _raise_worker_error(error: dict) -> None:
    raise InputError(error["reason"], file=error["file"], row=error["row"], column=error["column"])


def _pool_context():
    # A single-threaded caller can fork: the workers start in milliseconds with everything
    # imported. With other threads alive (MLflow's async logger …) a fork could copy a held
    # lock, so workers then fork from a clean forkserver that preloaded this module instead.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _run_rows(tasks: list[tuple], workers: int, progress) -> list[dict]:
    """Convert rows in order; stop at the first error (the lowest failing row)."""
    if workers <= 1:
        results = []
        for task in tasks:
            result = _convert_row(task)
            if "error" in result:
                _raise_worker_error(result["error"])
            results.append(result)
            progress.update(1)
        return results
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
    try:
        results = []
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        for result in executor.map(_convert_row, tasks, chunksize=chunk):
            if "error" in result:
                _raise_worker_error(result["error"])
            results.append(result)
            progress.update(1)
        return results
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Whole dataset


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_workers(num_rows: int) -> int:
    if num_rows < MIN_ROWS_FOR_PROCESSES:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _check_label_columns(df, stage: int, csv_path: str) -> dict[str, bool]:
    """Cheap up-front checks of which label columns each split has; returns split → has gt."""
    if stage == 2:
        missing = df[df["segment_mask_path"].isna()]
        if len(missing):
            raise InputError(
                "Stage 2 needs a segment label map on every row", file=csv_path,
                row=int(missing.iloc[0][ROW_COLUMN]), column="segment_mask_path",
            )
        return {split: False for split in df["split"].unique()}
    has_gt = {}
    for split, rows in df.groupby("split", sort=False):
        present = rows["gt_mask_path"].notna()
        if present.any() and not present.all():
            raise InputError(
                f"gt_mask_path is empty here but set on other rows of split {split!r} "
                "(clean labels must cover a whole split or none of it)",
                file=csv_path, row=int(rows[~present].iloc[0][ROW_COLUMN]), column="gt_mask_path",
            )
        has_gt[split] = bool(present.all())
    return has_gt


def _coco_json(stage: int, split: str, labels_from: str, images: list, annotations: list, categories: list) -> dict:
    return {
        "info": {
            "description": f"angioexp Stage {stage} ({split}), labels from {labels_from}",
            "version": CONVERTER_VERSION,
            "stage": stage,
            "split": split,
            "labels": labels_from,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _write_compact_json(path: Path, payload: dict) -> None:
    # json.dumps (one shot) runs CPython's C encoder; json.dump to a file runs the pure-Python
    # one, ~6× slower on annotation files with thousands of RLE strings.
    write_bytes_atomic(path, json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def convert(
    index_csv: str | Path,
    out_dir: str | Path,
    *,
    stage: int,
    size: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a validated ``index.csv`` to the COCO layout of this module's doc; return ``out_dir``.

    Raises :class:`InputError` (nothing is written) on any bad input.
    """
    from tqdm import tqdm

    class ProgressBar(tqdm):
        monitor_interval = 0  # no monitor thread: a live extra thread would rule out fork (see _pool_context)

    from angioexp.data.register import dataset_digest

    if stage not in (1, 2):
        raise InputError(f"stage must be 1 or 2, got {stage!r}", key="stage")
    if size is not None and not 16 <= int(size) <= 8192:
        raise InputError(f"size must be between 16 and 8192 px, got {size}", key="size")
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise InputError(f"workers must be >= 1, got {workers}", key="--workers")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"output already exists (pass --overwrite to replace it): {out_dir}")

    df = read_table(index_csv)
    csv_path = df.attrs["csv_path"]
    referenced = {p for c in PATH_COLUMNS if abs_column(c) in df for p in df[abs_column(c)].dropna()}
    refuse_output_over_inputs(out_dir, [csv_path, *sorted(referenced)])
    has_gt = _check_label_columns(df, stage, csv_path)
    rows = df.to_dict("records")
    splits = [s for s in ("train", "val", "test") if s in has_gt]
    workers = default_workers(len(rows)) if workers is None else int(workers)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for split in splits:
            (tmp / split / "images").mkdir(parents=True)
        tasks = [(row, csv_path, stage, size, str(tmp)) for row in rows]
        with ProgressBar(total=len(tasks), desc=f"convert stage {stage}", unit="frame", disable=None) as progress:
            results = _run_rows(tasks, workers, progress)

        if stage == 1:
            categories = [dict(STAGE1_CATEGORY)]
        else:
            present = sorted({inst["category_id"] for r in results for inst in r["instances"]})
            categories = stage2_categories(present)
        names = {c["id"]: c["name"] for c in categories}

        counts: dict[str, dict] = {}
        empty_after_resize: list[dict] = []
        for split in splits:
            images, annotations, gt_annotations = [], [], []
            for row, result in zip(rows, results):
                if row["split"] != split:
                    continue
                image_id = len(images) + 1
                images.append(_image_entry(image_id, row, result))
                for inst in result["instances"]:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, **inst})
                for inst in result.get("gt_instances", []):
                    gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": image_id, **inst})
                for column in result["empty"]:
                    empty_after_resize.append({"case_id": row["case_id"], "column": column})
                    log.warning("%s: row %s: %s becomes empty after resizing; no instance written",
                                csv_path, row[ROW_COLUMN], column)
            labels_from = "segment_mask_path" if stage == 2 else "mask_path"
            _write_compact_json(tmp / split / "annotations.json",
                                _coco_json(stage, split, labels_from, images, annotations, categories))
            if has_gt[split]:
                _write_compact_json(tmp / split / "annotations_gt.json",
                                    _coco_json(stage, split, "gt_mask_path", images, gt_annotations, categories))
            per_category = {names[c["id"]]: 0 for c in categories}
            for ann in annotations:
                per_category[names[ann["category_id"]]] += 1
            counts[split] = {
                "images": len(images),
                "annotations": len(annotations),
                "gt_annotations": len(gt_annotations) if has_gt[split] else None,
                "instances_per_category": per_category,
            }

        manifest = {
            "format": "angioexp-coco",
            "converter_version": CONVERTER_VERSION,
            "stage": stage,
            "size": size,
            "image_shapes": sorted({tuple(r["shape"]) for r in results}),
            "categories": categories,
            "splits": counts,
            "source_index": {"name": Path(csv_path).name, "sha256": file_sha256(csv_path), "rows": len(rows)},
            "windowing": WINDOWING,
            "min_component_area": MIN_COMPONENT_AREA if stage == 2 else None,
            "dropped_components": sum(r["dropped"] for r in results),
            "empty_after_resize": empty_after_resize,
            "dataset_digest": dataset_digest(tmp),
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("converted %d frames (stage %d) → %s; digest %s", len(rows), stage, out_dir, manifest["dataset_digest"])
    return out_dir


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index.csv (paths inside it are relative to its folder)")
    parser.add_argument("--out", required=True, help="COCO output folder (must not exist unless --overwrite)")
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True,
                        help="1: one full-tree instance per frame; 2: one instance per segment piece")
    parser.add_argument("--size", type=int, default=None, help="scale frames so the longer side is N px")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    out = convert(args.index, args.out, stage=args.stage, size=args.size, workers=args.workers,
                  overwrite=args.overwrite)
    print(out)
    return 0
