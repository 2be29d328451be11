"""What ``angioexp predict`` reads: PNG/JPEG (…) frames, .npy cines, DICOM XA files, index.csv.

Each input becomes one :class:`Source`: its raw frames (a memory map for .npy: only the frames
asked for are read), which of them to predict, and what it knows of the geometry (pixel
spacing for centreline lengths in mm, C-arm angles for the model's view conditioning).
A CSV (index.csv, or the cines.csv ``import-dicom`` writes) gives one source per row: the row's
annotated frame of its cine, with the row's spacing and angles; paths stay inside its folder.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from angioexp.data.importers import IMAGE_SUFFIXES, read_gray, safe_case_id
from angioexp.errors import InputError
from angioexp.fileio import resolve_under

DEFAULT_FPS = 15.0  # cath-lab cine rate, for cines that do not record theirs


@dataclass
class Source:
    name: str  # output folder name (unique within a run)
    path: Path  # the file it came from
    frames: np.ndarray  # T×H×W (uint8 / uint16 / float); may be a memory map
    frame_indices: list[int]  # the frames to predict, in order
    pixel_spacing_mm: float | None = None
    primary_angle: float | None = None
    secondary_angle: float | None = None
    fps: float = DEFAULT_FPS
    kind: str = "image"  # image / npy / dicom / csv row

    @property
    def is_cine(self) -> bool:
        return len(self.frame_indices) > 1


def parse_frames(text: str | None, num_frames: int, *, file) -> list[int]:
    """``"0,3,5-8"`` → [0, 3, 5, 6, 7, 8] (None: every frame); out of range → InputError."""
    if not text:
        return list(range(num_frames))
    chosen: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise InputError(f"--frames: expected e.g. 0,3,5-8, got {text!r}", key="--frames")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        if low > high or high >= num_frames:
            raise InputError(f"--frames {part.strip()} is out of range: the cine has {num_frames} frame(s)", file=file)
        chosen += [i for i in range(low, high + 1) if i not in chosen]
    return chosen


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then 'DICM' (the suffix is often missing)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"not a readable .npy array (truncated or corrupt?): {exc}", file=path) from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.dtype.kind not in "uif":
        raise InputError(f"expected a T×H×W or H×W numeric array, got {array.dtype} {array.shape}", file=path)
    return array


def _dicom(path: Path, frames_text: str | None) -> Source:
    from angioexp.data.importers.dicom import SkippedFile, read_xa

    try:
        cine = read_xa(path)
    except SkippedFile as exc:
        raise InputError(str(exc), file=path) from None
    return Source(path.stem, path, cine.frames, parse_frames(frames_text, cine.frames.shape[0], file=path),
                  cine.pixel_spacing_mm, cine.primary_angle, cine.secondary_angle, cine.fps or DEFAULT_FPS, "dicom")


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _csv(path: Path) -> list[Source]:
    """One source per row of an index.csv / cines.csv: the row's frame of its cine."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the CSV: {exc}", file=path) from None
    if not rows or "cine_path" not in rows[0]:
        raise InputError("expected an index.csv with a cine_path column and at least one row", file=path)
    sources = []
    for number, row in enumerate(rows, start=2):  # header = row 1, as index.csv messages count
        where = {"file": path, "row": number}
        cine_path = resolve_under(path.parent, row.get("cine_path") or "", column="cine_path", **where)
        if not cine_path.is_file():
            raise InputError(f"file not found: {row['cine_path']}", column="cine_path", **where)
        frames = _npy(cine_path)
        try:
            frame = int(row.get("frame_index") or 0)
        except ValueError:
            raise InputError(f"expected an integer, got {row.get('frame_index')!r}", column="frame_index", **where) from None
        if not 0 <= frame < frames.shape[0]:
            raise InputError(f"frame_index {frame} is out of range ({frames.shape[0]} frames)", column="frame_index", **where)
        sources.append(Source(row.get("case_id") or cine_path.stem, cine_path, frames, [frame],
                              _float(row.get("pixel_spacing_mm")), _float(row.get("primary_angle")),
                              _float(row.get("secondary_angle")), kind="csv row"))
    return sources


def read_inputs(paths: list[str | Path], frames_text: str | None = None) -> list[Source]:
    """Every input → sources with unique, file-name-safe names."""
    sources: list[Source] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            raise InputError("is a folder; give the files (a shell glob works: DIR/*.dcm)", file=path)
        if not path.is_file():
            raise InputError("file not found", file=path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            sources += _csv(path)
        elif suffix == ".npy":
            frames = _npy(path)
            sources.append(Source(path.stem, path, frames, parse_frames(frames_text, frames.shape[0], file=path), kind="npy"))
        elif suffix in IMAGE_SUFFIXES:
            sources.append(Source(path.stem, path, read_gray(path)[None], [0]))
        elif suffix in (".dcm", ".dicom") or is_dicom(path):
            sources.append(_dicom(path, frames_text))
        else:
            raise InputError(f"unsupported input (expected {', '.join(IMAGE_SUFFIXES)}, .csv or DICOM)", file=path)
    taken: set[str] = set()
    for source in sources:
        base = name = safe_case_id(source.name)
        k = 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        source.name = name
        taken.add(name)
    return sources


def input_roots(paths: list[str | Path]) -> list[Path]:
    """The paths an output folder must stay clear of: each input, and a CSV's folder (its data)."""
    roots = []
    for given in paths:
        path = Path(given).resolve()
        roots.append(path)
        if path.suffix.lower() == ".csv":
            roots.append(path.parent)
    return roots
