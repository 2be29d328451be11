"""C-arm view classes from the projection angles (the model's view token and auxiliary head).

Angles follow the raw layout (docs/design.md#raw-layout): ``primary_angle`` LAO positive /
RAO negative, ``secondary_angle`` CRA positive / CAU negative, in degrees.

Bins (boundaries chosen between the standard projections so none sits near an edge):
    primary   RAO   p ≤ −15         AP   −15 < p < 15      LAO   15 ≤ p < 70
              lateral |p| ≥ 70 (LAO 90 / RAO 90), whatever the secondary angle
    secondary CAU   s ≤ −10         none −10 < s < 10      CRA   s ≥ 10

Standard projections (docs/design.md#synthetic-data) and their classes:
    left system   RAO 30/CAU 25 → RAO_CAU   RAO 30/CRA 30 → RAO_CRA   AP/CRA 30–40 → AP_CRA
                  LAO 45/CRA 25 → LAO_CRA   LAO 50/CAU 25 "spider" → LAO_CAU   LAO 90 → LATERAL
    right system  LAO 30–45 → LAO           RAO 30 → RAO              AP/CRA 25 → AP_CRA

A missing or non-finite angle gives ``UNKNOWN_VIEW`` (−1), which the view loss ignores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

UNKNOWN_VIEW = -1
UNKNOWN_VIEW_NAME = "unknown"

PRIMARY_RAO_MAX = -15.0  # p ≤ this: RAO
PRIMARY_LAO_MIN = 15.0  # p ≥ this: LAO (below LATERAL_MIN)
LATERAL_MIN = 70.0  # |p| ≥ this: lateral
SECONDARY_CAU_MAX = -10.0  # s ≤ this: caudal
SECONDARY_CRA_MIN = 10.0  # s ≥ this: cranial


@dataclass(frozen=True)
class ViewClass:
    index: int
    name: str  # machine name, e.g. "LAO_CAU"
    description: str  # what a cardiologist would call it


VIEW_CLASSES: tuple[ViewClass, ...] = (
    ViewClass(0, "RAO_CAU", "RAO caudal (e.g. RAO 30 / CAU 25)"),
    ViewClass(1, "RAO", "straight RAO (e.g. RAO 30, right coronary)"),
    ViewClass(2, "RAO_CRA", "RAO cranial (e.g. RAO 30 / CRA 30)"),
    ViewClass(3, "AP_CAU", "AP caudal"),
    ViewClass(4, "AP", "straight AP"),
    ViewClass(5, "AP_CRA", "AP cranial (e.g. AP / CRA 30-40)"),
    ViewClass(6, "LAO_CAU", "LAO caudal, 'spider' (e.g. LAO 50 / CAU 25)"),
    ViewClass(7, "LAO", "straight LAO (e.g. LAO 30-45, right coronary)"),
    ViewClass(8, "LAO_CRA", "LAO cranial (e.g. LAO 45 / CRA 25)"),
    ViewClass(9, "LATERAL", "lateral (LAO 90 / RAO 90)"),
)
NUM_VIEWS = len(VIEW_CLASSES)
VIEW_INDEX = {v.name: v.index for v in VIEW_CLASSES}


def _angle(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def view_class(primary, secondary) -> int:
    """Primary (LAO+/RAO−) and secondary (CRA+/CAU−) angles in degrees → class index, or −1.

    −1 when either angle is missing (None, NaN, empty string). Angles outside the C-arm's range
    (|primary| > 180, |secondary| > 90) are an error: usually radians or swapped columns.
    """
    p, s = _angle(primary), _angle(secondary)
    if p is None or s is None:
        return UNKNOWN_VIEW
    if abs(p) > 180 or abs(s) > 90:
        raise ValueError(f"view angles out of range: primary {p} (|p| <= 180), secondary {s} (|s| <= 90) degrees")
    if abs(p) >= LATERAL_MIN:
        return VIEW_INDEX["LATERAL"]
    column = 0 if p <= PRIMARY_RAO_MAX else (2 if p >= PRIMARY_LAO_MIN else 1)
    row = 0 if s <= SECONDARY_CAU_MAX else (2 if s >= SECONDARY_CRA_MIN else 1)
    return column * 3 + row


def view_name(primary, secondary) -> str:
    """Angles → the class name ("LAO_CAU", …), or "unknown"."""
    index = view_class(primary, secondary)
    return UNKNOWN_VIEW_NAME if index == UNKNOWN_VIEW else VIEW_CLASSES[index].name


def view_name_of(index: int) -> str:
    """Class index → name ("unknown" for −1)."""
    if index == UNKNOWN_VIEW:
        return UNKNOWN_VIEW_NAME
    if not 0 <= index < NUM_VIEWS:
        raise ValueError(f"view class index must be -1 or in [0, {NUM_VIEWS}), got {index}")
    return VIEW_CLASSES[index].name


def view_classes(primary, secondary) -> np.ndarray:
    """Vectorised ``view_class``: two equal-length sequences → (n,) int64."""
    primary, secondary = list(primary), list(secondary)
    if len(primary) != len(secondary):
        raise ValueError(f"{len(primary)} primary angles but {len(secondary)} secondary angles")
    return np.array([view_class(p, s) for p, s in zip(primary, secondary)], dtype=np.int64)
