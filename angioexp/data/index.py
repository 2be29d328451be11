"""Read and validate the researcher's ``index.csv`` (docs/design.md#raw-layout; columns in :mod:`.schema`).

Two levels of checks, both raising :class:`~angioexp.errors.InputError`:

* :func:`read_table` — the CSV itself: header, one value per cell, splits, unique case ids,
  patient-disjoint splits, numbers, and that every referenced file exists inside the CSV's
  folder. Cheap: no array is opened.
* :func:`load_row` — one row's arrays: the cine header (``np.load(mmap_mode="r")``, so only the
  annotated frame is ever read), dtype/ndim, NaN/Inf in float frames, frame_index range, binary
  non-empty masks, equal aspect ratio of mask and frame, known segment labels, truncated files.

:func:`read_index` runs both. The converter runs :func:`read_table` up front and
:func:`load_row` inside its workers, so that each file is read once.

**Row numbers** in messages are the CSV's line numbers with the header on row 1 — the number a
text editor or a spreadsheet shows for that row (the first data row is row 2).
"""

from __future__ import annotations

import csv
import difflib
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from angioexp.data.schema import OPTIONAL_COLUMNS, PATH_COLUMNS, REQUIRED_COLUMNS, SPLITS
from angioexp.errors import InputError
from angioexp.fileio import resolve_under
from angioexp.segments import BY_LABEL

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pandas is imported lazily: converter workers only need load_row
    import pandas as pd

ALL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
ROW_COLUMN = "csv_row"  # added to the returned frame: the row number used in messages
CINE_DTYPES = ("uint8", "uint16", "float16", "float32", "float64")
NUMERIC_COLUMNS = {
    # column → (lowest, highest) accepted value; C-arm angles follow the DICOM convention
    "primary_angle": (-180.0, 180.0),  # LAO +, RAO −
    "secondary_angle": (-90.0, 90.0),  # CRA +, CAU −
    "pixel_spacing_mm": (1e-4, 10.0),
}
DOMINANCE_VALUES = ("right", "left", "co")
# A mask may be stored at another resolution than its frame (DeepSA: 512² for 1016² frames);
# it is resized with nearest-neighbour, which is only meaningful for the same aspect ratio.
ASPECT_TOLERANCE = 0.01
# case_id becomes a file name in the COCO output: keep it portable and unable to escape.
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def abs_column(column: str) -> str:
    """Name of the column holding the resolved absolute path of a path column."""
    return f"{column}_abs"


# ---------------------------------------------------------------------------------------------
# Table-level validation


def _parse_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (row number, cells) of every non-blank record; row number = first line."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # Excel writes a BOM
    except FileNotFoundError:
        raise InputError("file not found", file=csv_path) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=csv_path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=csv_path) from None
    lines = text.splitlines(keepends=True)
    reader = csv.reader(lines, delimiter=_delimiter(lines, csv_path), strict=True)
    records: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    line = 1
    try:
        for cells in reader:
            start, line = line, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in cells]
                header_row = start
            else:
                records.append((start, [c.strip() for c in cells]))
    except csv.Error as exc:
        raise InputError(f"malformed CSV: {exc}", file=csv_path, row=reader.line_num) from None
    if header is None:
        raise InputError("empty file (expected a header row)", file=csv_path)
    if header_row != 1:
        raise InputError("the header must be the first line", file=csv_path, row=header_row)
    return header, records


def _delimiter(lines: list[str], csv_path: Path) -> str:
    """',' — or ';', which Excel writes in locales with a decimal comma, when the header has no
    comma but holds the required columns separated by semicolons."""
    first = next((line for line in lines if line.strip()), "")
    names = [c.strip() for c in first.split(";")]
    if "," not in first and all(name in names for name in REQUIRED_COLUMNS):
        log.info("%s: semicolon-separated (Excel's CSV in many locales); reading it as such", csv_path)
        return ";"
    return ","


def _check_header(header: list[str], csv_path: Path) -> None:
    seen: set[str] = set()
    for name in header:
        if not name:
            raise InputError("empty column name in the header", file=csv_path, row=1)
        if name in seen:
            raise InputError("column appears twice in the header", file=csv_path, row=1, column=name)
        seen.add(name)
        if name not in ALL_COLUMNS:
            if ";" in name:
                raise InputError("the header looks separated by ';' but does not hold every required column "
                                 f"({', '.join(REQUIRED_COLUMNS)}); save the file as comma-separated CSV",
                                 file=csv_path, row=1, column=name)
            close = difflib.get_close_matches(name, ALL_COLUMNS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; valid columns: {', '.join(ALL_COLUMNS)}"
            raise InputError(f"unknown column{hint}", file=csv_path, row=1, column=name)
    for name in REQUIRED_COLUMNS:
        if name not in seen:
            raise InputError("required column is missing", file=csv_path, row=1, column=name)


def _parse_int(text: str, **where) -> int:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"expected an integer, got {text!r}", **where) from None
    if not math.isfinite(value) or not value.is_integer():
        raise InputError(f"expected an integer, got {text!r}", **where)
    return int(value)


def _parse_number(text: str, column: str, **where) -> float:
    if text == "":
        return math.nan  # optional value absent
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"expected a number, got {text!r}", column=column, **where) from None
    low, high = NUMERIC_COLUMNS[column]
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{text!r} is outside the valid range [{low:g}, {high:g}]", column=column, **where)
    return value


class _PathResolver:
    """``resolve_under(root, path)`` with the folders' resolution cached.

    Rows reference a few folders many times (cines/, masks/ …); resolving each folder once and
    then only checking that the file itself is not a symlink gives the same answer with one
    ``lstat`` per file instead of one per path component.
    """

    def __init__(self, root: Path):
        self.root = root
        self.folders: dict[str, Path] = {}

    def __call__(self, text: str, **where) -> Path:
        folder, name = os.path.split(text.strip())
        if name in ("", ".", ".."):
            return resolve_under(self.root, text, **where)
        if folder not in self.folders:
            try:
                self.folders[folder] = resolve_under(self.root, folder or ".", **where)
            except InputError:
                return resolve_under(self.root, text, **where)  # the message quotes the whole value
        candidate = self.folders[folder] / name
        if candidate.is_symlink():  # a link may point anywhere: check where it lands
            return resolve_under(self.root, text, **where)
        return candidate


def read_table(csv_path: str | Path) -> pd.DataFrame:
    """Parse and validate ``index.csv`` without opening any array file.

    Returns one row per CSV record with every schema column (absent optional ones are None /
    NaN), ``frame_index`` as int, angles and spacing as float, ``csv_row`` (row number used in
    messages), and ``<path column>_abs`` absolute paths. ``df.attrs`` holds ``csv_path`` and
    ``root`` (the CSV's folder; every path must stay inside it).
    """
    import pandas as pd

    csv_path = Path(csv_path).resolve()
    root = csv_path.parent
    header, records = _parse_rows(csv_path)
    _check_header(header, csv_path)
    resolve = _PathResolver(root)
    if not records:
        raise InputError("no data rows", file=csv_path)

    rows: list[dict] = []
    first_row_of_case: dict[str, int] = {}
    split_of_patient: dict[str, tuple[str, int]] = {}
    for row_number, cells in records:
        where = {"file": csv_path, "row": row_number}
        if len(cells) != len(header):
            raise InputError(f"expected {len(header)} values, found {len(cells)}", **where)
        raw = dict(zip(header, cells))
        for name in REQUIRED_COLUMNS:
            if raw[name] == "":
                raise InputError("empty value in a required column", column=name, **where)

        case_id = raw["case_id"]
        if not CASE_ID_PATTERN.match(case_id):
            raise InputError(
                f"case_id {case_id!r} must be letters, digits, '.', '_' or '-' (it becomes a file name)",
                column="case_id", **where,
            )
        if case_id in first_row_of_case:
            raise InputError(
                f"duplicate case_id {case_id!r} (first used on row {first_row_of_case[case_id]})",
                column="case_id", **where,
            )
        first_row_of_case[case_id] = row_number

        split = raw["split"]
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})", column="split", **where)
        patient = raw["patient_id"]
        if patient in split_of_patient and split_of_patient[patient][0] != split:
            other_split, other_row = split_of_patient[patient]
            raise InputError(
                f"patient {patient!r} is in split {split!r} here but in {other_split!r} on row {other_row}"
                " (a patient must stay in one split)",
                column="split", **where,
            )
        split_of_patient.setdefault(patient, (split, row_number))

        frame_index = _parse_int(raw["frame_index"], column="frame_index", **where)
        if frame_index < 0:
            raise InputError(f"frame_index must be >= 0, got {frame_index}", column="frame_index", **where)

        record: dict = {name: None for name in ALL_COLUMNS}
        record.update({k: (v if v != "" else None) for k, v in raw.items()})
        record["frame_index"] = frame_index
        for name in NUMERIC_COLUMNS:
            record[name] = _parse_number(raw.get(name, ""), name, **where)
        dominance = record["dominance"]
        if dominance is not None and dominance not in DOMINANCE_VALUES:
            raise InputError(
                f"unknown dominance {dominance!r} (expected one of {', '.join(DOMINANCE_VALUES)})",
                column="dominance", **where,
            )
        for name in PATH_COLUMNS:
            record[abs_column(name)] = None
            if record[name] is None:
                continue
            path = resolve(record[name], column=name, **where)
            if not path.is_file():
                raise InputError(f"file not found: {record[name]}", column=name, **where)
            if path.suffix.lower() != ".npy":
                raise InputError(f"expected a .npy file, got {record[name]}", column=name, **where)
            record[abs_column(name)] = str(path)
        record[ROW_COLUMN] = row_number
        rows.append(record)

    df = pd.DataFrame(rows)
    df.attrs["csv_path"] = str(csv_path)
    df.attrs["root"] = str(root)
    return df


# ---------------------------------------------------------------------------------------------
# Per-row array validation


@dataclass
class RowArrays:
    """The arrays of one index row, validated. Masks are at their stored size (not resized).

    frame:       H×W, the cine's dtype (uint8, uint16 or float)
    mask:        H'×W' bool, the training label (``mask_path``; None when not loaded)
    gt_mask:     H''×W'' bool or None (``gt_mask_path``)
    segment_map: H'''×W''' uint8 label map or None (``segment_mask_path``; 0 = background)
    num_frames:  T of the cine
    """

    frame: np.ndarray
    mask: np.ndarray | None
    gt_mask: np.ndarray | None
    segment_map: np.ndarray | None
    num_frames: int


def _open_npy(path: str, **where) -> np.ndarray:
    """Memory-map a .npy (header only until indexed); corrupt or truncated files → InputError."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"not a readable .npy array (truncated or corrupt?): {exc}", **where) from None
    if not isinstance(array, np.ndarray):  # e.g. an .npz archive renamed to .npy
        raise InputError("not a single .npy array", **where)
    return array


def _check_aspect(shape: tuple[int, int], frame_shape: tuple[int, int], **where) -> None:
    (h, w), (fh, fw) = shape, frame_shape
    if (h, w) == (fh, fw):
        return
    if abs((h / w) / (fh / fw) - 1.0) > ASPECT_TOLERANCE:
        raise InputError(
            f"mask is {h}×{w} but the frame is {fh}×{fw}: aspect ratios differ "
            "(only same-aspect masks are resized to the frame)",
            **where,
        )


def _binary_mask(path: str, frame_shape: tuple[int, int], **where) -> np.ndarray:
    mask = np.asarray(_open_npy(path, **where))
    if mask.ndim != 2:
        raise InputError(f"mask must be 2-D (H×W), got shape {mask.shape}", **where)
    if mask.dtype == bool:
        binary = mask
    elif mask.dtype.kind in "uif":
        if mask.dtype.kind == "f" and not np.isfinite(mask).all():
            raise InputError("mask contains NaN or Inf", **where)
        if mask.dtype == np.uint8:  # the common case: a 256-bin count is ~10× faster than unique
            present = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=2)).tolist())
        else:
            present = set(np.unique(mask).tolist())
        if not (present <= {0, 1} or present <= {0, 255}):
            shown = sorted(present)[:6]
            raise InputError(f"mask is not binary: values {shown}{' …' if len(present) > 6 else ''}", **where)
        binary = mask != 0
    else:
        raise InputError(f"mask dtype {mask.dtype} is not supported (expected bool or integers 0/1)", **where)
    if not binary.any():
        raise InputError("mask is empty (no foreground pixel)", **where)
    _check_aspect(binary.shape, frame_shape, **where)
    return binary


def _segment_map(path: str, frame_shape: tuple[int, int], **where) -> np.ndarray:
    labels = np.asarray(_open_npy(path, **where))
    if labels.ndim != 2:
        raise InputError(f"segment map must be 2-D (H×W), got shape {labels.shape}", **where)
    if labels.dtype.kind not in "ui":
        raise InputError(f"segment map must hold integer labels, got dtype {labels.dtype}", **where)
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError(f"segment map has a negative label {int(labels.min())}", **where)
    highest = int(labels.max()) if labels.size else 0
    if highest > max(BY_LABEL):
        raise InputError(f"unknown segment id {highest} (valid: 1–{max(BY_LABEL)}, see angioexp.segments)", **where)
    present = np.flatnonzero(np.bincount(labels.ravel().astype(np.int64, copy=False))).tolist()
    unknown = [v for v in present if v != 0 and v not in BY_LABEL]
    if unknown:
        raise InputError(
            f"unknown segment id(s) {unknown[:6]} (valid: 1–{max(BY_LABEL)}, see angioexp.segments)", **where
        )
    if present == [0]:
        raise InputError("segment map is empty (no labelled segment)", **where)
    _check_aspect(labels.shape, frame_shape, **where)
    return labels.astype(np.uint8, copy=False)


def load_row(
    row,
    *,
    csv_path: str | Path | None = None,
    need_segments: bool = False,
    labels: tuple[str, ...] = ("mask_path", "gt_mask_path", "segment_mask_path"),
) -> RowArrays:
    """Open and validate the files of one :func:`read_table` row (a mapping or a pandas row).

    Reads only the annotated frame of the cine, and only the label columns in ``labels`` (the
    converter skips the ones its stage does not use; absent ones come back as None).
    ``need_segments`` makes a missing ``segment_mask_path`` an error (Stage 2).
    """
    csv_path = csv_path or row.get("csv_path")
    where = {"file": csv_path, "row": int(row[ROW_COLUMN])}

    cine = _open_npy(row[abs_column("cine_path")], column="cine_path", **where)
    if cine.ndim != 3:
        raise InputError(f"cine must be 3-D (T×H×W), got shape {cine.shape}", column="cine_path", **where)
    if cine.dtype.name not in CINE_DTYPES:
        raise InputError(
            f"cine dtype {cine.dtype} is not supported (expected {', '.join(CINE_DTYPES)})",
            column="cine_path", **where,
        )
    num_frames, height, width = cine.shape
    if min(height, width) < 8:
        raise InputError(f"cine frames are too small: {height}×{width}", column="cine_path", **where)
    frame_index = int(row["frame_index"])
    if not 0 <= frame_index < num_frames:
        raise InputError(
            f"frame_index {frame_index} is out of range: the cine has {num_frames} frame(s)",
            column="frame_index", **where,
        )
    frame = np.array(cine[frame_index])  # the only frame read from disk
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        bad = int((~np.isfinite(frame)).sum())
        raise InputError(f"frame {frame_index} has {bad} NaN/Inf pixel(s)", column="cine_path", **where)

    mask = gt_mask = segment_map = None
    if "mask_path" in labels:
        mask = _binary_mask(row[abs_column("mask_path")], frame.shape, column="mask_path", **where)
    if row.get("gt_mask_path") and "gt_mask_path" in labels:
        gt_mask = _binary_mask(row[abs_column("gt_mask_path")], frame.shape, column="gt_mask_path", **where)
    if row.get("segment_mask_path") and "segment_mask_path" in labels:
        segment_map = _segment_map(row[abs_column("segment_mask_path")], frame.shape, column="segment_mask_path", **where)
    elif need_segments:
        raise InputError("Stage 2 needs a segment label map on every row", column="segment_mask_path", **where)
    return RowArrays(frame=frame, mask=mask, gt_mask=gt_mask, segment_map=segment_map, num_frames=num_frames)


def read_index(csv_path: str | Path, *, check_files: bool = True, need_segments: bool = False) -> pd.DataFrame:
    """Validate ``index.csv`` and (with ``check_files``) every array it references.

    Returns the :func:`read_table` frame. Raises :class:`InputError` naming the file, the row
    (CSV line number, header = row 1) and the column of the first problem found.
    """
    df = read_table(csv_path)
    if check_files:
        csv_file = df.attrs["csv_path"]
        for row in df.to_dict("records"):
            load_row(row, csv_path=csv_file, need_segments=need_segments)
    return df
