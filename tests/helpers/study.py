"""A tiny raw study in the index.csv layout, for the data tests (no synthetic generator needed).

``write_study`` draws a few thick random-walk vessels with SYNTAX segment labels (and a
catheter) into label maps and renders cines from them: uint8 and uint16 cines, masks at the
frame size or at another same-aspect size. tests/test_data_study.py checks that it validates.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

VESSEL_LABELS = (5, 6, 7, 9, 11, 12, 19)  # LM, LAD prox/mid, D1, LCx, ramus, OM1
CATHETER = 26
COLUMNS = ("case_id", "patient_id", "split", "cine_path", "frame_index", "mask_path",
           "segment_mask_path", "gt_mask_path", "primary_angle", "secondary_angle",
           "pixel_spacing_mm", "source", "view")


def _draw_path(labels: np.ndarray, rng: np.random.Generator, label: int, radius: float) -> None:
    height, width = labels.shape
    yy, xx = np.mgrid[:height, :width]
    y, x = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(0.6 * max(height, width))):
        angle += rng.normal(0, 0.15)
        y, x = y + np.sin(angle), x + np.cos(angle)
        if not (0 <= y < height and 0 <= x < width):
            break
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = label


def make_case(rng: np.random.Generator, size: int, labels_count: int = 3) -> np.ndarray:
    """uint8 label map size×size with a few vessel segments and a catheter."""
    labels = np.zeros((size, size), dtype=np.uint8)
    _draw_path(labels, rng, CATHETER, max(1.0, size / 64))
    for label in rng.choice(VESSEL_LABELS, size=labels_count, replace=False):
        _draw_path(labels, rng, int(label), max(1.2, size / 40))
    return labels


def write_study(root: Path, *, cases: int = 9, size: int = 64, frames: int = 3, seed: int = 0,
                mask_scale: float = 1.0) -> Path:
    """Write index.csv + cines/masks/gt_masks/segments under ``root``; return the CSV path.

    Patients p0, p1, … each have two cases; splits cycle train, train, val, test over patients.
    Every third case has a uint16 cine. ``mask_scale`` stores masks at size*scale (same aspect).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for folder in ("cines", "masks", "gt_masks", "segments"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    split_cycle = ("train", "train", "val", "test")
    rows = []
    for i in range(cases):
        case = f"c{i:03d}"
        patient = i // 2
        labels = make_case(rng, size)
        vessels = (labels > 0) & (labels != CATHETER)
        attenuation = np.where(labels > 0, 0.5, 0.0)
        cine = np.empty((frames, size, size), dtype=np.float32)
        for t in range(frames):
            contrast = 0.3 + 0.7 * np.sin(np.pi * (t + 1) / (frames + 1))
            cine[t] = 0.8 * np.exp(-attenuation * contrast) + rng.normal(0, 0.02, (size, size))
        if i % 3 == 2:
            stored = np.clip(cine * 4000 + 500, 0, 65535).astype(np.uint16)
        else:
            stored = np.clip(cine * 255, 0, 255).astype(np.uint8)
        mask_size = int(round(size * mask_scale))
        pseudo = vessels.copy()
        pseudo[: size // 8] = False  # a "missed" strip and a spurious blob: pseudo ≠ clean label
        if not pseudo.any():
            pseudo = vessels.copy()
        pseudo[2:5, -5:-2] = ~vessels[2:5, -5:-2]
        if mask_scale != 1.0:
            idx = (np.arange(mask_size) * size / mask_size).astype(int)
            pseudo_stored, gt_stored = pseudo[np.ix_(idx, idx)], vessels[np.ix_(idx, idx)]
        else:
            pseudo_stored, gt_stored = pseudo, vessels
        np.save(root / "cines" / f"{case}.npy", stored)
        np.save(root / "masks" / f"{case}.npy", pseudo_stored.astype(np.uint8))
        np.save(root / "gt_masks" / f"{case}.npy", gt_stored.astype(np.uint8))
        np.save(root / "segments" / f"{case}.npy", labels)
        rows.append({
            "case_id": case, "patient_id": f"p{patient}", "split": split_cycle[patient % 4],
            "cine_path": f"cines/{case}.npy", "frame_index": frames // 2,
            "mask_path": f"masks/{case}.npy", "segment_mask_path": f"segments/{case}.npy",
            "gt_mask_path": f"gt_masks/{case}.npy", "primary_angle": -30 + 5 * i % 60,
            "secondary_angle": 20 if i % 2 else -20, "pixel_spacing_mm": 0.3,
            "source": "test", "view": "RAO30_CRA20" if i % 2 else "LAO45_CAU20",
        })
    csv_path = root / "index.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
