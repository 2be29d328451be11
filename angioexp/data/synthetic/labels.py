"""Labels of one synthetic frame: clean full-tree mask, SYNTAX segment map, DeepSA-like pseudo-label.

All three come from the same ownership raster (:mod:`.raster`): for every pixel, the signed
distance to the union of projected vessel tubes and the capsule it lies deepest inside.

* clean mask: signed distance ≤ 0 (lumen radius, at least ``MIN_MASK_RADIUS_PX`` so that thin
  distal vessels stay connected lines at small image sizes);
* segment map: the label of the owning capsule. **Where projected segments overlap, the pixel
  goes to the segment it lies deepest inside** (largest distance from that tube's wall; a wide
  vessel keeps its full width where a thin one crosses it). View-dependent visibility follows
  from the projection itself: a foreshortened segment shrinks to a short dark stub, a segment
  overlapped by a wider one loses those pixels, and parts outside the field (or under a
  collimator shutter) are not labelled. The catheter (label 26) fills catheter pixels that no
  vessel claims, so the union of vessel labels equals the clean mask exactly.
* pseudo-label: the clean mask degraded by a random error model resembling a segmentation
  network's output (DeepSA, Dice ≈ 0.83 against expert labels): missed thin distal vessels,
  broken segments, boundary jitter with a width bias (under- or over-segmentation), spurious
  blobs, and sometimes the catheter tip segmented as vessel. Which branches and where are drawn
  per case, so a student can learn to beat its teacher. The overall severity is calibrated per
  case against the clean mask to a Dice drawn around the target (default 0.83).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from angioexp.data.synthetic.raster import zoom_linear
from angioexp.segments import BY_SLUG

CATHETER_LABEL = BY_SLUG["catheter"].label
MIN_MASK_RADIUS_PX = 0.6


@dataclass
class CapsuleTable:
    """Attributes of every vessel capsule, indexed by capsule id (the raster's owner ids)."""

    branch: np.ndarray  # (K,) int32 branch index in the tree
    label: np.ndarray  # (K,) uint8 segment label
    arc_mm: np.ndarray  # (K,) float32 position along the branch
    diameter_mm: np.ndarray  # (K,) float32 lumen diameter
    path_mm: np.ndarray  # (K,) float32 path length from the ostium


@dataclass(frozen=True)
class PseudoLabelModel:
    """Knobs of the pseudo-label error model (all rates per case)."""

    target_dice: float = 0.83  # DeepSA's published Dice
    dice_spread: float = 0.04  # std of the per-case Dice target around target_dice
    miss_prob: float = 0.5  # chance that a branch loses its part thinner than the case's threshold
    miss_diameter_mm: tuple[float, float] = (1.0, 1.7)  # range of that per-case threshold
    gap_rate: float = 2.5  # expected broken stretches per case
    gap_mm: tuple[float, float] = (1.5, 5.0)
    blob_rate: float = 1.5  # expected spurious blobs per case
    catheter_prob: float = 0.35  # chance that the catheter's tip is labelled as vessel
    jitter_px: tuple[float, float] = (0.25, 0.8)  # smooth boundary noise amplitude, px at 512²
    dilate_prob: float = 0.5  # width bias direction: over- (dilate) vs under-segmentation

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def clean_and_segments(
    sdf: np.ndarray, owner: np.ndarray, capsules: CapsuleTable, catheter: np.ndarray, visible: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean bool, segment map uint8, catheter-only bool) in the annotated frame."""
    clean = (sdf <= 0.0) & (owner >= 0) & visible
    segments = np.zeros(sdf.shape, np.uint8)
    segments[clean] = capsules.label[owner[clean]]
    cath_only = catheter & visible & ~clean
    segments[cath_only] = CATHETER_LABEL
    return clean, segments, cath_only


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Unit-variance noise correlated over ~``cell`` px (coarse grid, bilinear upsampling)."""
    h, w = shape
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    field = zoom_linear(coarse, cell, (h, w), grid_mode=False)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def pseudo_label(
    clean: np.ndarray,
    sdf: np.ndarray,
    owner: np.ndarray,
    capsules: CapsuleTable,
    parents: list[tuple[int, float]],
    catheter_arc: np.ndarray | None,
    rng: np.random.Generator,
    model: PseudoLabelModel,
    margin: float,
    target: float | None = None,
) -> tuple[np.ndarray, dict]:
    """A DeepSA-like label for one frame, and how it was made.

    parents: per branch (parent index, arc on the parent where it leaves, mm).
    catheter_arc: per pixel, mm from the catheter tip (inf off the catheter).
    target: this case's Dice (default: drawn around ``model.target_dice``).
    Returns (uint8 0/1 mask, info with the measured Dice and the errors drawn).
    """
    size = clean.shape[0]
    scale = max(size / 512.0, 0.5)
    if target is None:
        target = float(np.clip(rng.normal(model.target_dice, model.dice_spread), 0.5, 1.0))
    if model.target_dice >= 1.0:
        target = 1.0
    n_branches = len(parents)
    owned = np.flatnonzero(owner.ravel() >= 0)  # pixels near some capsule (flat indices)
    owned_by = owner.ravel()[owned]

    # --- structural errors, each a set of pixels (droppable one by one) -------------------------
    # Pixels are flat index arrays: the calibration below re-applies them many times, and
    # touching only their pixels is much cheaper than whole-image boolean operations.
    components: list[tuple[str, bool, np.ndarray]] = []  # (kind, is_addition, flat pixel indices)

    def removed_pixels(dead_capsule: np.ndarray) -> np.ndarray:
        return owned[dead_capsule[owned_by]]

    # Missed thin distal vessels: cut each chosen branch where it narrows below the threshold,
    # together with everything that leaves it beyond the cut.
    threshold = rng.uniform(*model.miss_diameter_mm)
    cut = np.full(n_branches, np.inf)
    for b in range(n_branches):
        on_b = capsules.branch == b
        if not on_b.any() or rng.random() >= model.miss_prob:
            continue
        thin = on_b & (capsules.diameter_mm < threshold)
        if thin.any():
            cut[b] = float(capsules.arc_mm[thin].min()) + rng.uniform(-2.0, 4.0)
    if np.isfinite(cut).any():
        gone_from_start = np.zeros(n_branches, bool)
        for b, (parent, at_mm) in enumerate(parents):  # parents precede children
            if parent >= 0:
                gone_from_start[b] = gone_from_start[parent] or at_mm > cut[parent]
        dead = gone_from_start[capsules.branch] | (capsules.arc_mm > cut[capsules.branch])
        pix = removed_pixels(dead)
        if len(pix):
            components.append(("missed_distal", False, pix))

    # Broken segments: short gaps, more likely on thin vessels.
    visible_ids = np.unique(owner[clean]) if clean.any() else np.zeros(0, np.int64)
    for _ in range(int(rng.poisson(model.gap_rate))):
        if not len(visible_ids):
            break
        w = 1.0 / np.maximum(capsules.diameter_mm[visible_ids], 0.5) ** 2
        k = int(rng.choice(visible_ids, p=w / w.sum()))
        half = 0.5 * rng.uniform(*model.gap_mm)
        dead = (capsules.branch == capsules.branch[k]) & (np.abs(capsules.arc_mm - capsules.arc_mm[k]) < half)
        pix = removed_pixels(dead)
        if len(pix):
            components.append(("gap", False, pix))

    # Spurious blobs near the vessels (branch-like false positives on nearby shadows).
    noise = smooth_noise(rng, clean.shape, max(int(6 * scale), 2))
    rows, cols = np.nonzero(clean)
    for _ in range(int(rng.poisson(model.blob_rate))):
        if not len(rows):
            break
        i = int(rng.integers(len(rows)))
        ang = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(3.0, 12.0) * scale
        cy, cx = rows[i] + dist * np.sin(ang), cols[i] + dist * np.cos(ang)
        radius = rng.uniform(1.2, 4.0) * scale
        r0, r1 = int(max(cy - 2 * radius - 1, 0)), int(min(cy + 2 * radius + 2, size))
        c0, c1 = int(max(cx - 2 * radius - 1, 0)), int(min(cx + 2 * radius + 2, size))
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        stretch = rng.uniform(1.0, 2.5)
        u, v = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang), -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        inside = (u / stretch) ** 2 + v**2 < (radius * (1.0 + 0.35 * noise[r0:r1, c0:c1])) ** 2
        pix = (yy * clean.shape[1] + xx)[inside]
        if len(pix):
            components.append(("blob", True, pix))

    # The catheter tip, which vessel segmentation networks readily call vessel.
    if catheter_arc is not None and rng.random() < model.catheter_prob:
        pix = np.flatnonzero(catheter_arc < rng.uniform(10.0, 45.0))
        if len(pix):
            components.append(("catheter", True, pix))

    # --- boundary jitter and calibration --------------------------------------------------------
    amplitude = rng.uniform(*model.jitter_px) * scale
    jitter = np.clip(noise, -3.0, 3.0)
    dilate = rng.random() < model.dilate_prob
    order = rng.permutation(len(components))
    active = np.ones(len(components), bool)
    if target >= 1.0:
        active[:] = False
        amplitude = 0.0

    def assemble(t: float) -> np.ndarray:
        base = (sdf + amplitude * jitter) <= t
        flat = base.reshape(-1)
        for j in np.nonzero(active)[0]:
            kind, is_add, pix = components[j]
            flat[pix] = is_add
        return base

    # Too many errors for this case's target: drop some (random order), then soften the jitter.
    for j in order:
        if dice(assemble(0.0), clean) >= target:
            break
        active[j] = False
    for _ in range(8):
        if dice(assemble(0.0), clean) >= target or amplitude == 0.0:
            break
        amplitude = amplitude / 2 if amplitude > 0.05 else 0.0
    # Width bias: bisect the threshold (Dice falls monotonically away from t = 0).
    limit = margin - 0.5 - 3.0 * amplitude if dilate else -margin
    lo, hi = 0.0, float(limit)
    if dilate and hi <= 0.0:
        hi = 0.0
    if dice(assemble(hi), clean) >= target:
        lo = hi
    else:
        for _ in range(16):
            mid = 0.5 * (lo + hi)
            if dice(assemble(mid), clean) >= target:
                lo = mid
            else:
                hi = mid
            if abs(hi - lo) < 0.01:
                break
    mask = assemble(lo)
    if not mask.any():  # a label must never be empty; fall back to the clean mask
        mask = clean.copy()
    kinds = [components[j][0] for j in np.nonzero(active)[0]]
    info = {
        "dice": dice(mask, clean),
        "target": target,
        "width_bias_px": round(float(lo), 3),
        "jitter_px": round(float(amplitude), 3),
        "errors": {k: kinds.count(k) for k in sorted(set(kinds))},
    }
    return mask.astype(np.uint8), info


def case_dice_target(model: PseudoLabelModel, case_index: int) -> float:
    """Per-case Dice target: ``target_dice + dice_spread·z`` with z from a golden-ratio
    (low-discrepancy) sequence of normal quantiles, so that the dataset MEAN hits the target
    to O(1/n) rather than O(1/√n), while each case still gets its own, varied error level."""
    from scipy.special import ndtri

    u = (0.5 + case_index * 0.6180339887498949) % 1.0
    z = float(np.clip(ndtri(u), -2.5, 2.5))
    return float(np.clip(model.target_dice + model.dice_spread * z, 0.5, 1.0))
