"""DICOM X-ray angiography (XA) cines → the raw index.csv layout, de-identified.

``angioexp import-dicom --root DICOM_DIR --out STUDY [--masks DIR] [--segments DIR]
[--split-by patient] [--salt TEXT]``

Every file under ``--root`` is read with pydicom. Per XA cine (XA or Enhanced XA storage):

* ``cines/<case>.npy``: T×H×W pixels as stored — uint8, or uint16 kept as is (``convert``
  windows it per frame); MONOCHROME1 is inverted so that vessels are dark as in MONOCHROME2,
  signed pixels are shifted to start at 0, colour frames become luminance.
* ``primary_angle`` / ``secondary_angle`` from PositionerPrimaryAngle (0018,1510) /
  PositionerSecondaryAngle (0018,1511) — the DICOM convention is index.csv's (LAO +, CRA +).
* ``pixel_spacing_mm`` in the isocentre plane: ImagerPixelSpacing (0018,1164) divided by the
  magnification SID / SOD (DistanceSourceToDetector (0018,1110) / DistanceSourceToPatient
  (0018,1111)), else by EstimatedRadiographicMagnificationFactor (0018,1114), else the detector
  pitch itself; PixelSpacing (0028,0030) when there is no ImagerPixelSpacing. How it was
  derived is recorded per case in ``manifest.json``.
* ``frame_index``: the annotated frame when the mask's file name gives it (``<stem>_frame<N>``),
  else the frame of peak contrast (:func:`peak_contrast_frame`); ``manifest.json`` says which.

Enhanced XA files keep these attributes in their functional groups; they are looked up there
(the annotated frame's group first, then the shared one).

**De-identification.** ``case_id`` = ``c`` + a salted HMAC-SHA256 of SOPInstanceUID and
``patient_id`` = ``p`` + one of PatientID (StudyInstanceUID when PatientID is empty); cines of one
patient therefore share a patient and never span two splits. Nothing else is taken from the
header: no name, birth date, accession number, UID, date, institution or file name reaches
index.csv, cines.csv, the arrays or manifest.json. The salt comes from ``--salt`` or
``$ANGIOEXP_DICOM_SALT`` (the same salt gives the same ids on a re-import, so masks added later
still match); without one a random salt is used and never written anywhere.

**Masks** (optional): ``--masks DIR`` binary full-tree labels and ``--segments DIR`` Stage 2
label maps (.npy or .png), matched to a DICOM file by its path below ``--root`` without the
suffix (``a/b/IMG1.dcm`` ↔ ``DIR/a/b/IMG1.npy``), or by the bare stem (``DIR/IMG1.npy``).
``index.csv`` lists the cines with a mask (it is what ``convert`` reads); ``cines.csv`` lists
every imported cine with the same columns except the label paths (what ``predict`` reads).

**Files that cannot be imported are skipped**, each named with its reason on stderr and counted
in ``manifest.json`` (reasons only: a file name can identify a patient): not DICOM, truncated,
not XA (the modality and SOP class are named), pixel data in a compressed transfer syntax that
no installed pydicom plugin decodes (the transfer syntax is named, with the plugins to install),
a duplicate SOPInstanceUID. ``--strict`` refuses the whole import at the first such file
instead. A root with no importable cine is an error.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from angioexp.data.importers import read_gray, write_study
from angioexp.data.importers.masks import assign_splits, binarise
from angioexp.data.index import NUMERIC_COLUMNS
from angioexp.data.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from angioexp.errors import InputError
from angioexp.fileio import atomic_dir, refuse_output_over_inputs, write_json_atomic

log = logging.getLogger(__name__)

IMPORTER_VERSION = "1"
SALT_ENV = "ANGIOEXP_DICOM_SALT"
XA_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA Image Storage",
}
SPLIT_RATIOS = (0.70, 0.15, 0.15)  # as the synthetic generator's
SPLIT_SEED = 0
LABEL_SUFFIXES = (".npy", ".png")
_FRAME_IN_NAME = re.compile(r"^(?P<stem>.+)_frame(?P<frame>\d+)$")
CINES_COLUMNS = tuple(c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS
                      if c not in ("mask_path", "segment_mask_path", "gt_mask_path", "dominance"))
PLUGIN_HINT = ("install a pydicom decoding plugin (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, "
               "or python-gdcm) or decompress the file first (gdcmconv --raw / dcmdjpeg)")
PEAK_CONTRAST_METHOD = ("peak contrast: the frame with the largest mean black top-hat (dark, vessel-wide "
                        "structures) over the central field, on frames downsampled to ≤ 128 px")


class SkippedFile(Exception):
    """A file under --root that is not an importable XA cine; the message is the reason."""


@dataclass
class XaCine:
    """One XA cine read from DICOM: pixels and the geometry angioexp uses — nothing identifying."""

    frames: np.ndarray  # T×H×W uint8 / uint16 / float32
    primary_angle: float | None
    secondary_angle: float | None
    pixel_spacing_mm: float | None
    spacing_from: str
    transfer_syntax: str
    fps: float | None  # from FrameTime / CineRate (overlay videos)
    # identity keys: hashed before they are written anywhere
    sop_uid: str = field(repr=False)
    patient_key: str = field(repr=False)
    study_uid: str = field(repr=False)


# ---------------------------------------------------------------------------------------------
# Reading one file


def _lookup(ds, keyword: str, frame: int = 0):
    """``keyword``'s value at the top level, else in the frame's / the shared functional groups
    (Enhanced XA), searching their nested macro sequences. None when absent or empty."""
    value = ds.get(keyword)
    if value is not None and value != "":
        return value
    for group_seq, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(group_seq)
        if not groups or index >= len(groups):
            continue
        for macro in groups[index]:
            if macro.VR != "SQ":
                continue
            for item in macro.value:
                found = item.get(keyword)
                if found is not None and found != "":
                    return found
    return None


def _number(value) -> float | None:
    """A DS/FD value (or the first of several) as a finite float, else None."""
    if value is not None and not isinstance(value, (str, bytes, int, float)):
        value = next(iter(value), None)  # pydicom MultiValue
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _spacing(ds, frame: int) -> tuple[float | None, str]:
    """Isocentre-plane pixel spacing and how it was derived (see the module docstring)."""
    imager = _lookup(ds, "ImagerPixelSpacing", frame)
    if imager is not None:
        pitch = [float(v) for v in imager]
        source = "ImagerPixelSpacing"
    else:
        plain = _lookup(ds, "PixelSpacing", frame)
        if plain is None:
            return None, "absent (no ImagerPixelSpacing or PixelSpacing)"
        return _isotropic([float(v) for v in plain], "PixelSpacing (as recorded)")
    sid = _number(_lookup(ds, "DistanceSourceToDetector", frame))
    sod = _number(_lookup(ds, "DistanceSourceToPatient", frame))
    if sid and sod and sid > 0 and sod > 0:
        return _isotropic([p * sod / sid for p in pitch], f"{source} × SOD/SID ({sod:g}/{sid:g} mm)")
    factor = _number(_lookup(ds, "EstimatedRadiographicMagnificationFactor", frame))
    if factor and factor > 0:
        return _isotropic([p / factor for p in pitch], f"{source} / EstimatedRadiographicMagnificationFactor ({factor:g})")
    return _isotropic(pitch, f"{source} (detector pitch: no SID/SOD or magnification factor)")


def _isotropic(spacing: list[float], source: str) -> tuple[float | None, str]:
    row, col = (spacing + spacing)[:2]
    low, high = NUMERIC_COLUMNS["pixel_spacing_mm"]
    if not (np.isfinite([row, col]).all() and low <= row <= high and low <= col <= high):
        return None, f"{source}: implausible value {spacing}, left empty"
    if abs(row / col - 1) > 0.01:  # index.csv has one spacing per frame
        return None, f"{source}: anisotropic {row:g}×{col:g} mm, left empty"
    return (row + col) / 2, source


def _angle(ds, keyword: str, frame: int) -> float | None:
    value = _number(_lookup(ds, keyword, frame))
    low, high = NUMERIC_COLUMNS["primary_angle" if "Primary" in keyword else "secondary_angle"]
    return value if value is not None and low <= value <= high else None


def _frame_rate(ds) -> float | None:
    frame_time = _number(ds.get("FrameTime"))
    if frame_time and frame_time > 0:
        return 1000.0 / frame_time
    rate = _number(ds.get("CineRate")) or _number(ds.get("RecommendedDisplayFrameRate"))
    return rate if rate and rate > 0 else None


def _pixels(ds) -> np.ndarray:
    """T×H×W array as index.csv takes it (see the module docstring), or SkippedFile."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; the reason is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if ts is not None and ts.is_compressed:
            raise SkippedFile(f"cannot decode pixel data in transfer syntax {ts.name} ({ts}): {first}; {PLUGIN_HINT}") from None
        raise SkippedFile(f"unreadable pixel data (truncated file?): {first}") from None
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":  # indices → their colours
        from pydicom.pixels import apply_color_lut

        array, samples = apply_color_lut(array, ds), 3
    if samples == 3:  # colour frames (rare in XA) → luminance, in the colour's own bit depth
        array = array if frames > 1 else array[None]
        top = np.iinfo(array.dtype).max if array.dtype.kind in "ui" else None
        luminance = np.round(array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
        array = np.clip(luminance, 0, top).astype(array.dtype) if top is not None else luminance
    elif frames == 1 or array.ndim == 2:
        array = array.reshape((1, *array.shape[-2:]))
    if array.ndim != 3:
        raise SkippedFile(f"unexpected pixel array shape {array.shape}")
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        top = (1 << int(ds.get("BitsStored") or array.dtype.itemsize * 8)) - 1 if array.dtype.kind in "ui" else float(array.max())
        array = (top - array.astype(np.int64)).clip(0, None) if array.dtype.kind in "ui" else top - array
    if array.dtype.kind in "ui":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:  # signed or wide integers → non-negative uint16
            if high - low > 65535:
                raise SkippedFile(f"pixel range {low}…{high} does not fit 16 bits")
            array = array.astype(np.int64) - min(low, 0)
        return array.astype(np.uint8 if int(array.max()) <= 255 and ds.get("BitsAllocated") == 8 else np.uint16)
    return array.astype(np.float32)


def read_xa(path: str | Path, frame: int | None = None) -> XaCine:
    """Read one XA cine; anything that is not an importable XA cine raises :class:`SkippedFile`.

    ``frame``: whose functional group (Enhanced XA) the geometry is read from (default 0).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise SkippedFile("not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # noqa: BLE001 - truncated headers raise EOFError, OSError, ValueError …
        raise SkippedFile(f"unreadable DICOM (truncated or corrupt): {type(exc).__name__}: {exc}") from None
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if not sop_class and not modality:  # pydicom stops quietly where a file ends
        raise SkippedFile("truncated or incomplete DICOM: the dataset has no SOP class and no modality")
    if sop_class not in XA_SOP_CLASSES and modality != "XA":
        described = getattr(ds.get("SOPClassUID"), "name", "") or sop_class or "none"
        raise SkippedFile(f"not X-ray angiography: modality {modality or 'none'}, SOP class {described}")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise SkippedFile("no pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    frames = _pixels(ds)
    where = 0 if frame is None else frame
    spacing, spacing_from = _spacing(ds, where)
    sop_uid = str(ds.get("SOPInstanceUID", "")).strip()
    study_uid = str(ds.get("StudyInstanceUID", "")).strip()
    if not sop_uid:
        raise SkippedFile("no SOPInstanceUID (cannot give the cine a stable id)")
    patient_key = str(ds.get("PatientID", "")).strip() or (f"study:{study_uid}" if study_uid else f"sop:{sop_uid}")
    return XaCine(
        frames=frames,
        primary_angle=_angle(ds, "PositionerPrimaryAngle", where),
        secondary_angle=_angle(ds, "PositionerSecondaryAngle", where),
        pixel_spacing_mm=spacing,
        spacing_from=spacing_from,
        transfer_syntax=f"{ts.name} ({ts})" if ts is not None else "unknown",
        fps=_frame_rate(ds),
        sop_uid=sop_uid,
        patient_key=patient_key,
        study_uid=study_uid,
    )


# ---------------------------------------------------------------------------------------------
# Frame choice


def peak_contrast_frame(frames: np.ndarray) -> int:
    """Index of the frame of peak vessel opacification in a T×H×W cine.

    Contrast-filled vessels are thin and dark: their black top-hat (grey closing − image, with a
    window wider than a vessel) is large where they are and ~0 on the smooth background (heart
    shadow, diaphragm). The frame with the largest mean top-hat over the central 80 % of the
    field (collimator edges excluded) is the one with the most opacified vessel.
    """
    from scipy import ndimage

    t, h, w = frames.shape
    if t == 1:
        return 0
    step = max(1, int(np.ceil(max(h, w) / 128)))
    small = frames[:, ::step, ::step].astype(np.float32)
    sh, sw = small.shape[1:]
    mh, mw = sh // 10, sw // 10
    window = max(5, (max(sh, sw) // 24) | 1)
    scores = []
    for image in small:
        image = ndimage.uniform_filter(image, 3)  # quantum noise is not structure
        tophat = ndimage.grey_closing(image, size=(window, window)) - image
        scores.append(float(tophat[mh : sh - mh, mw : sw - mw].mean()))
    return int(np.argmax(scores))


# ---------------------------------------------------------------------------------------------
# Study


def _hash(salt: bytes, prefix: str, value: str) -> str:
    return prefix + hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def _label_files(folder: Path | None) -> dict[str, tuple[Path, int | None]]:
    """Label files of ``folder`` by their path below it without the suffix and without a
    ``_frame<N>`` tail → (file, N or None)."""
    found: dict[str, tuple[Path, int | None]] = {}
    if folder is None:
        return found
    for path in sorted(folder.rglob("*")):
        if not (path.is_file() and path.suffix.lower() in LABEL_SUFFIXES):
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        match = _FRAME_IN_NAME.match(key)
        key, frame = (match.group("stem"), int(match.group("frame"))) if match else (key, None)
        if key in found:
            raise InputError(f"two label files for one cine: {found[key][0].name} and {path.name}", file=path)
        found[key] = (path, frame)
    return found


def _match_label(labels: dict[str, tuple[Path, int | None]], relative: Path, claimed: dict[Path, Path]):
    """The label of the DICOM at ``relative`` (below --root): same relative path, else same bare
    stem in a flat label folder — which two DICOMs of the same name may not share."""
    stem = relative.with_suffix("")
    found = labels.get(stem.as_posix()) or labels.get(stem.name)
    if found is None:
        return None, None
    if found[0] in claimed and claimed[found[0]] != relative:
        raise InputError(f"label {found[0].name} matches both {claimed[found[0]]} and {relative} "
                         "(mirror the DICOM folders in the label folder)", file=found[0])
    claimed[found[0]] = relative
    return found


def _dicom_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR"]


def import_dicom(
    root: str | Path,
    out_dir: str | Path,
    *,
    masks: str | Path | None = None,
    segments: str | Path | None = None,
    split_by: str = "patient",
    salt: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Import every XA cine under ``root`` into a study at ``out_dir``; returns its folder.

    Each cine is written as soon as it is read (an archive never has to fit in memory); the
    splits are assigned once every patient is known.
    """
    if split_by != "patient":
        raise InputError(f"--split-by {split_by!r} is not supported (only 'patient')", key="--split-by")
    root = Path(root)
    if not root.is_dir():
        raise InputError("not a folder", file=root)
    label_dirs = {"mask_path": masks, "segment_mask_path": segments}
    for folder in label_dirs.values():
        if folder is not None and not Path(folder).is_dir():
            raise InputError("not a folder", file=folder)
    out = Path(out_dir)
    refuse_output_over_inputs(out, [root, masks, segments])
    salt_text = salt or os.environ.get(SALT_ENV) or ""
    salt_bytes = salt_text.encode("utf-8") if salt_text else secrets.token_bytes(32)
    if not salt_text:
        log.warning("no --salt or $%s: case and patient ids are random and will differ on a re-import", SALT_ENV)
    labels = {column: _label_files(Path(folder) if folder else None) for column, folder in label_dirs.items()}
    claimed: dict[Path, Path] = {}

    files = _dicom_files(root)
    skipped: list[str] = []
    seen_sop: dict[str, Path] = {}
    rows: list[dict] = []
    report: dict = {
        "importer": "dicom", "version": IMPORTER_VERSION, "files": len(files), "salt": "given" if salt_text else "random",
        "split_by": split_by, "split_ratios": list(SPLIT_RATIOS), "peak_contrast": PEAK_CONTRAST_METHOD,
        "de_identification": "case_id / patient_id are salted HMAC-SHA256 of SOPInstanceUID / PatientID; "
                             "no other header value or file name is written",
        "cases": [],
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for sub in ("cines", "masks", "segments"):
            (tmp / sub).mkdir()
        for path in _progress(progress, files):
            relative = path.relative_to(root)
            try:
                cine = read_xa(path)
                if cine.sop_uid in seen_sop:
                    raise SkippedFile(f"duplicate SOPInstanceUID (also in {seen_sop[cine.sop_uid].relative_to(root)})")
            except SkippedFile as exc:
                if strict:
                    raise InputError(f"{exc} (refused: --strict)", file=path) from None
                tqdm.write(f"angioexp import-dicom: skipped {relative}: {exc}", file=sys.stderr)  # above the bar
                skipped.append(str(exc))
                continue
            seen_sop[cine.sop_uid] = path
            rows.append(_import_cine(cine, relative, tmp, salt_bytes, labels, claimed, report, where=path))
        if not rows:
            raise InputError(f"no importable XA cine among {len(files)} file(s) (skipped: {len(skipped)})", file=root)
        if any("segment_mask_path" in r and "mask_path" not in r for r in rows):
            raise InputError("a segment map without a full-tree mask (--masks) cannot go into index.csv", file=segments)
        split_of = assign_splits(sorted({r["patient_id"] for r in rows}), SPLIT_RATIOS, SPLIT_SEED)
        for row in rows:
            row["split"] = split_of[row["patient_id"]]
        report.update(imported=len(rows), skipped=len(skipped), skipped_reasons=_count(skipped))
        _write_cines_csv(tmp / "cines.csv", rows)
        labelled = [r for r in rows if "mask_path" in r]
        if labelled:
            write_study(tmp, labelled, report)
        else:
            write_json_atomic(tmp / "manifest.json", report)
    log.info("imported %d XA cine(s) of %d patient(s) → %s (%d labelled, %d file(s) skipped)",
             len(rows), len(split_of), out, len(labelled), len(skipped))
    return out


def _import_cine(cine: XaCine, relative: Path, tmp: Path, salt: bytes, labels: dict, claimed: dict, report: dict,
                 *, where: Path) -> dict:
    """Write one cine (and its labels) into the study folder; returns its row (no split yet)."""
    case_id = _hash(salt, "c", cine.sop_uid)
    patient_id = _hash(salt, "p", cine.patient_key)
    row = {"case_id": case_id, "patient_id": patient_id, "cine_path": f"cines/{case_id}.npy", "source": "dicom"}
    annotated = None
    for column in labels:
        label_path, frame = _match_label(labels[column], relative, claimed)
        if label_path is not None:
            annotated = frame if frame is not None else annotated
            row[column] = _save_label(label_path, column, tmp, case_id)
    num_frames = cine.frames.shape[0]
    if annotated is not None and not 0 <= annotated < num_frames:
        raise InputError(f"the label names frame {annotated} but the cine has {num_frames} frame(s)", file=where)
    frame_index = annotated if annotated is not None else peak_contrast_frame(cine.frames)
    chosen_by = "annotated (label file name)" if annotated is not None else (
        "only frame" if num_frames == 1 else "peak contrast")
    np.save(tmp / "cines" / f"{case_id}.npy", cine.frames)
    row.update({
        "frame_index": frame_index,
        "primary_angle": _fmt(cine.primary_angle, 2), "secondary_angle": _fmt(cine.secondary_angle, 2),
        "pixel_spacing_mm": _fmt(cine.pixel_spacing_mm, 6),
    })
    report["cases"].append({
        "case_id": case_id, "patient_id": patient_id, "study": _hash(salt, "s", cine.study_uid),
        "frames": num_frames, "shape": list(cine.frames.shape[1:]), "dtype": cine.frames.dtype.name,
        "frame_index": frame_index, "frame_chosen_by": chosen_by, "pixel_spacing_from": cine.spacing_from,
        "transfer_syntax": cine.transfer_syntax, "labelled": "mask_path" in row,
    })
    return row


def _save_label(path: Path, column: str, tmp: Path, case_id: str) -> str:
    array = read_gray(path)
    if column == "mask_path":
        array = binarise(array).astype(np.uint8)
        folder = "masks"
    else:
        if array.dtype.kind == "f":
            raise InputError("segment label maps must hold integers", file=path)
        array = array.astype(np.uint8)
        folder = "segments"
    np.save(tmp / folder / f"{case_id}.npy", array)
    return f"{folder}/{case_id}.npy"


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _count(reasons: list[str]) -> dict[str, int]:
    """Reasons grouped by their kind (the text before the first ':'), counted."""
    counts: dict[str, int] = {}
    for reason in reasons:
        kind = reason.split(":", 1)[0].split(" (", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _write_cines_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CINES_COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _progress(enabled: bool, files: list[Path]):
    return tqdm(files, unit="file", desc="import-dicom", disable=not enabled)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="folder of DICOM files (searched recursively)")
    parser.add_argument("--out", required=True, help="output study folder (index.csv layout)")
    parser.add_argument("--masks", default=None, help="binary full-tree labels (.npy/.png) named like the DICOM files "
                        "(<stem>.npy, or <stem>_frame<N>.npy for the annotated frame N)")
    parser.add_argument("--segments", default=None, help="Stage 2 segment label maps, named like --masks")
    parser.add_argument("--split-by", default="patient", choices=("patient",), help="split unit (default: patient)")
    parser.add_argument("--salt", default=None, help=f"secret for the hashed ids (default ${SALT_ENV}; without one "
                        "ids are random per import)")
    parser.add_argument("--strict", action="store_true", help="refuse the import at the first file that cannot be "
                        "imported (default: skip it and name it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    out = import_dicom(args.root, args.out, masks=args.masks, segments=args.segments, split_by=args.split_by,
                       salt=args.salt, strict=args.strict, overwrite=args.overwrite, progress=True)
    print(f"wrote {out}/cines.csv" + (f" and {out}/index.csv" if (out / "index.csv").is_file() else " (no masks: no index.csv)"))
    return 0
