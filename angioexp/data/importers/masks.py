"""Image/mask folder pairs (DCA1, XCAD, DeepSA's FS-CAD …) → the raw index.csv layout.

``angioexp import-masks --images DIR --masks DIR --out DIR [--split-ratios 0.7,0.15,0.15]
[--seed 0] [--patient-regex RE] [--mask-suffix _gt]``

* Files pair by stem (``12.png`` ↔ ``12.pgm``); png, pgm, tif/tiff, npy, bmp, jpg. A mask's stem
  may carry ``--mask-suffix`` (DCA1: ``12_gt.pgm``), which is then stripped — this also lets
  images and masks share one folder. Unpaired files are reported (log + ``manifest.json``).
* Masks are binarised: masks whose values are all 0/1 (or bool) keep ``> 0``; any other mask
  (8-bit 0/255, anti-aliased or JPEG-compressed edges) uses ``> 127``; float masks within
  [0, 1] (probability maps) use ``> 0.5``; other 16-bit or float masks ``> max / 2``. Masks that end up empty are skipped
  and listed.
* ``patient_id`` is the image stem unless ``--patient-regex`` is given: its first group (or the
  whole match) on the stem; a stem it does not match is an error. Splits are drawn per patient
  with ``--seed`` (every split gets at least one patient when there are ≥ 3 and its ratio > 0).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np

from angioexp.data.importers import IMAGE_SUFFIXES, read_gray, safe_case_id, write_study
from angioexp.data.index import ASPECT_TOLERANCE
from angioexp.data.schema import SPLITS
from angioexp.errors import InputError
from angioexp.fileio import atomic_dir, refuse_output_over_inputs

log = logging.getLogger(__name__)

IMPORTER_VERSION = "1"


def parse_ratios(text: str | tuple | list) -> tuple[float, float, float]:
    """"0.7,0.15,0.15" (train, val, test) or "train=0.8,val=0.2,test=0" → normalised ratios."""
    if isinstance(text, (tuple, list)):
        values = [float(v) for v in text]
    else:
        named = {}
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            if all("=" in p for p in parts):
                named = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts)}
                unknown = set(named) - set(SPLITS)
                if unknown:
                    raise InputError(f"unknown split(s) {sorted(unknown)}", key="--split-ratios")
                values = [named.get(s, 0.0) for s in SPLITS]
            else:
                values = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"expected three numbers like 0.7,0.15,0.15, got {text!r}", key="--split-ratios") from None
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values) or values[0] <= 0:
        raise InputError(f"expected three ratios >= 0 with train > 0, got {text!r}", key="--split-ratios")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def _list_files(folder: Path, *, suffix: str, want_suffix: bool) -> dict[str, Path]:
    """stem (mask suffix stripped) → file, for image files in ``folder`` (not recursive)."""
    if not folder.is_dir():
        raise InputError("folder not found", file=folder)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = path.stem
        if suffix:
            if stem.endswith(suffix) != want_suffix:
                continue
            if want_suffix:
                stem = stem[: -len(suffix)]
        if stem in found:
            raise InputError(f"two files with the stem {stem!r}: {found[stem].name} and {path.name}", file=folder)
        found[stem] = path
    return found


def binarise(mask: np.ndarray) -> np.ndarray:
    """Any 2-D mask → bool, with the thresholds of the module doc."""
    if mask.dtype == bool:
        return mask
    values = mask.astype(np.float64, copy=False)
    if values.size and values.min() >= 0 and values.max() <= 1 and np.isin(np.unique(values), (0, 1)).all():
        return values > 0
    if mask.dtype == np.uint8:
        return mask > 127
    if mask.dtype.kind == "f" and values.size and np.nanmax(values) <= 1:
        return values > 0.5  # a probability map
    peak = float(np.nanmax(values)) if values.size else 0.0
    return values > 0.5 * peak if peak > 0 else np.zeros(mask.shape, dtype=bool)


def assign_splits(patients: list[str], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Seeded, patient-level split assignment; deterministic for a given patient set and seed."""
    order = sorted(set(patients))
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    n = len(order)
    n_val = round(n * ratios[1])
    n_test = round(n * ratios[2])
    if n >= 3:  # every split with a positive ratio gets at least one patient
        n_val = max(n_val, 1) if ratios[1] > 0 else 0
        n_test = max(n_test, 1) if ratios[2] > 0 else 0
    n_val = min(n_val, max(0, n - 1))
    n_test = min(n_test, max(0, n - 1 - n_val))
    split_of = {}
    for i, patient in enumerate(order):
        split_of[patient] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return split_of


def import_masks(
    images_dir: str | Path,
    masks_dir: str | Path,
    out_dir: str | Path,
    *,
    split_ratios=(0.7, 0.15, 0.15),
    seed: int = 0,
    patient_regex: str | None = None,
    mask_suffix: str = "",
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Pair images with masks by stem and write an index.csv study to ``out_dir``."""
    images_dir, masks_dir = Path(images_dir).resolve(), Path(masks_dir).resolve()
    refuse_output_over_inputs(out_dir, [images_dir, masks_dir])
    if images_dir == masks_dir and not mask_suffix:
        raise InputError("images and masks share a folder: give --mask-suffix (e.g. _gt) to tell them apart",
                         key="--mask-suffix")
    ratios = parse_ratios(split_ratios)
    try:
        pattern = re.compile(patient_regex) if patient_regex else None
    except re.error as exc:
        raise InputError(f"not a valid regular expression: {exc}", key="--patient-regex") from None
    images = _list_files(images_dir, suffix=mask_suffix if images_dir == masks_dir else "", want_suffix=False)
    masks = _list_files(masks_dir, suffix=mask_suffix, want_suffix=True)
    paired = sorted(set(images) & set(masks))
    unpaired_images = sorted(images[s].name for s in set(images) - set(masks))
    unpaired_masks = sorted(masks[s].name for s in set(masks) - set(images))
    if unpaired_images or unpaired_masks:
        log.warning("unpaired files: %d image(s) without mask %s, %d mask(s) without image %s",
                    len(unpaired_images), unpaired_images[:5], len(unpaired_masks), unpaired_masks[:5])
    if not paired:
        raise InputError(f"no image/mask pairs found ({len(images)} images, {len(masks)} masks; "
                         "files pair by stem, see --mask-suffix)", file=masks_dir)

    patient_of = {}
    for stem in paired:
        if pattern is None:
            patient_of[stem] = stem
            continue
        match = pattern.search(stem)
        if not match:
            raise InputError(f"--patient-regex {patient_regex!r} does not match {stem!r}", file=images[stem])
        patient_of[stem] = match.group(1) if match.groups() else match.group(0)
    split_of = assign_splits(list(patient_of.values()), ratios, seed)

    report: dict = {"importer": "masks", "version": IMPORTER_VERSION, "images": str(images_dir),
                    "masks": str(masks_dir), "seed": seed, "split_ratios": list(ratios),
                    "binarise": "0/1 masks: > 0; 8-bit: > 127; float in [0, 1]: > 0.5; other: > max / 2",
                    "unpaired_images": unpaired_images, "unpaired_masks": unpaired_masks, "empty_masks": []}
    rows, case_of = [], {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for folder in ("cines", "masks"):
            (tmp / folder).mkdir()
        for stem in paired:
            case_id = safe_case_id(stem)
            if case_id in case_of:
                raise InputError(f"stems {case_of[case_id]!r} and {stem!r} give the same case id {case_id!r}",
                                 file=images[stem])
            case_of[case_id] = stem
            pixels = read_gray(images[stem])
            mask = binarise(read_gray(masks[stem]))
            (h, w), (mh, mw) = pixels.shape, mask.shape
            if abs((mh / mw) / (h / w) - 1) > ASPECT_TOLERANCE:
                raise InputError(f"mask is {mh}×{mw} but its image {images[stem].name} is {h}×{w} "
                                 "(aspect ratios differ)", file=masks[stem])
            if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
                raise InputError("image has NaN/Inf pixels", file=images[stem])
            if not mask.any():
                report["empty_masks"].append(masks[stem].name)
                continue
            np.save(tmp / "cines" / f"{case_id}.npy", pixels[None])
            np.save(tmp / "masks" / f"{case_id}.npy", mask.astype(np.uint8))
            rows.append({
                "case_id": case_id, "patient_id": patient_of[stem], "split": split_of[patient_of[stem]],
                "cine_path": f"cines/{case_id}.npy", "frame_index": 0, "mask_path": f"masks/{case_id}.npy",
                "source": source or images_dir.name,
            })
        if report["empty_masks"]:
            log.warning("%d empty mask(s) skipped: %s", len(report["empty_masks"]), report["empty_masks"][:5])
        if not rows:
            raise InputError("every paired mask is empty", file=masks_dir)
        write_study(tmp, rows, report)
    log.info("imported %d image/mask pairs → %s", len(rows), out_dir)
    return Path(out_dir) / "index.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of images (png, pgm, tif, npy …)")
    parser.add_argument("--masks", required=True, help="folder of binary masks, same stems as the images")
    parser.add_argument("--out", required=True, help="output study folder (index.csv layout)")
    parser.add_argument("--split-ratios", default="0.7,0.15,0.15", help="train,val,test ratios")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    parser.add_argument("--patient-regex", default=None,
                        help="regex on the file stem whose first group is the patient id (default: the stem)")
    parser.add_argument("--mask-suffix", default="", help="suffix of mask stems to strip, e.g. _gt (DCA1)")
    parser.add_argument("--source", default=None, help="value of the source column (default: images folder name)")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    print(import_masks(args.images, args.masks, args.out, split_ratios=args.split_ratios, seed=args.seed,
                       patient_regex=args.patient_regex, mask_suffix=args.mask_suffix, source=args.source,
                       overwrite=args.overwrite))
    return 0
