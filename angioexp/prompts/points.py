"""Point prompts sampled from a vessel mask.

``"centreline"`` (ours, the default): skeletonise the mask and spread the positive points over
the skeleton by GEODESIC farthest-point sampling — each new point is the skeleton pixel farthest,
along the skeleton, from the points already taken. The first point after a random start lands
on a distal tip, the next on the tip farthest from it, and so on, so a handful of points covers
the branches of the tree instead of piling up on the proximal vessel. Skeleton fragments (label
gaps) are visited largest first; specks shorter than ``min_fragment_px`` are ignored when a
longer fragment exists.

``"centered"``: SAM3's ``center_positive_sample`` (sam3/train/transforms/point_sampling.py) for
comparison — the pixel farthest from the mask edge (distance transform, image border counts as
edge), that pixel is then removed and the transform recomputed. On a vessel tree every point
lands on the widest vessel: it is an interior-point sampler, not a centreline sampler.

``"random"``: uniform over mask pixels (SAM3's ``random_mask``).

Negatives (optional) are uniform over background pixels at least ``negative_margin`` pixels from
the mask, so they never sit on a vessel edge the label may have missed by a pixel.

Coordinates follow SAM3: (x, y) pixel indices; ``PointPrompt.normalised(h, w)`` divides by (w, h).
Every sampler is deterministic given its ``numpy.random.Generator``. An empty skeleton (tiny
mask) falls back to the mask pixels; an empty mask gives no positive points; both are logged
and recorded in ``PointPrompt.fallback`` (and counted in ``FALLBACK_COUNTS``), never an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from skimage.morphology import skeletonize

from angioexp.errors import ConfigError

log = logging.getLogger(__name__)

POINT_SAMPLE_MODES = ("centreline", "centered", "random")
FALLBACK_COUNTS: Counter[str] = Counter()  # reason → how many times, for the caller's metrics


@dataclass(frozen=True)
class PointPrompt:
    """points (P, 2) float32 (x, y) pixel indices; labels (P,) int64, 1 positive / 0 negative;
    fallback: None, "mask_pixels" (no skeleton) or "empty_mask" (no positive points)."""

    points: np.ndarray
    labels: np.ndarray
    fallback: str | None = None

    def normalised(self, height: int, width: int) -> np.ndarray:
        """(P, 2) coordinates divided by (width, height), SAM3's normalisation."""
        return self.points / np.array([width, height], dtype=np.float32)

    @property
    def num_positive(self) -> int:
        return int((self.labels == 1).sum())


def _note_fallback(reason: str, detail: str) -> None:
    FALLBACK_COUNTS[reason] += 1
    level = logging.WARNING if FALLBACK_COUNTS[reason] == 1 else logging.DEBUG
    log.log(level, "point sampling fallback '%s': %s (occurrence %d)", reason, detail, FALLBACK_COUNTS[reason])


def draw_num_points(num_points: tuple[int, int] | list[int] | int, rng: np.random.Generator) -> int:
    """n uniform in the inclusive range [lo, hi] (``prompts.num_points``); an int is fixed."""
    if isinstance(num_points, (int, np.integer)):
        lo = hi = int(num_points)
    else:
        try:
            lo, hi = (int(v) for v in num_points)
        except (TypeError, ValueError):
            raise ConfigError(f"must be [lo, hi], got {num_points!r}", key="prompts.num_points") from None
    if lo < 0 or lo > hi:
        raise ConfigError(f"must be [lo, hi] with 0 <= lo <= hi, got [{lo}, {hi}]", key="prompts.num_points")
    return int(rng.integers(lo, hi + 1))


def _as_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a point prompt needs a 2-D mask, got shape {mask.shape}")
    return mask.astype(bool)


def _skeleton_graph(skeleton: np.ndarray):
    """8-connected pixel graph of a skeleton: (coords (K, 2) as (y, x), sparse (K, K) lengths)."""
    ys, xs = np.nonzero(skeleton)
    index = -np.ones(skeleton.shape, dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    padded = np.pad(index, 1, constant_values=-1)
    rows, cols, lengths = [], [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # each undirected edge once
        neighbour = padded[1 + ys + dy, 1 + xs + dx]
        ok = neighbour >= 0
        rows.append(np.arange(len(ys))[ok])
        cols.append(neighbour[ok])
        lengths.append(np.full(int(ok.sum()), np.hypot(dy, dx)))
    rows, cols, lengths = (np.concatenate(v) for v in (rows, cols, lengths))
    graph = coo_matrix((lengths, (rows, cols)), shape=(len(ys), len(ys))).tocsr()
    return np.stack([ys, xs], axis=1), graph


def geodesic_farthest_points(skeleton: np.ndarray, n: int, rng: np.random.Generator, min_fragment_px: int = 10) -> np.ndarray:
    """n skeleton pixels spread by geodesic farthest-point sampling → (n', 2) (x, y), n' ≤ n."""
    labels, num_fragments = ndimage.label(skeleton, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    if num_fragments > 1 and sizes.max() >= min_fragment_px:
        skeleton = np.isin(labels, 1 + np.flatnonzero(sizes >= min_fragment_px))
        labels = np.where(skeleton, labels, 0)
    coords, graph = _skeleton_graph(skeleton)
    fragment = labels[coords[:, 0], coords[:, 1]]
    fragment_size = np.bincount(fragment)[fragment]
    n = min(n, len(coords))
    distance = np.full(len(coords), np.inf)
    chosen: list[int] = []
    for _ in range(n):
        unreached = np.isinf(distance)
        if unreached.any():
            # enter the largest fragment not yet visited, at a random pixel of it
            biggest = fragment_size[unreached].max()
            candidates = np.flatnonzero(unreached & (fragment_size == biggest))
            candidates = candidates[fragment[candidates] == fragment[candidates[0]]]
            pick = int(rng.choice(candidates))
            if chosen:
                # inside a fragment, prefer the tip farthest from the random entry pixel
                reach = dijkstra(graph, directed=False, indices=pick)
                pick = int(np.argmax(np.where(np.isfinite(reach), reach, -1)))
        else:
            pick = int(np.argmax(distance))
        if chosen and pick in chosen:
            break
        chosen.append(pick)
        distance = np.minimum(distance, dijkstra(graph, directed=False, indices=pick))
    picked = coords[chosen]
    return picked[:, ::-1].astype(np.float32)  # (y, x) → (x, y)


def centreline_points(mask, n: int, rng: np.random.Generator, min_fragment_px: int = 10) -> tuple[np.ndarray, str | None]:
    """Our sampler: (n', 2) (x, y) points on the mask's skeleton, and the fallback used (or None)."""
    mask = _as_mask(mask)
    if n <= 0:
        return np.zeros((0, 2), np.float32), None
    if not mask.any():
        _note_fallback("empty_mask", "mask is empty: no positive points")
        return np.zeros((0, 2), np.float32), "empty_mask"
    skeleton = skeletonize(mask)
    if not skeleton.any():
        _note_fallback("mask_pixels", f"empty skeleton for a {int(mask.sum())}-pixel mask: sampling mask pixels")
        return geodesic_farthest_points(mask, n, rng, min_fragment_px=1), "mask_pixels"
    return geodesic_farthest_points(skeleton, n, rng, min_fragment_px), None


def centered_points(mask, n: int) -> np.ndarray:
    """SAM3's 'centered' mode: (n', 2) (x, y) points farthest from the mask edge, one at a time."""
    mask = _as_mask(mask)
    padded = np.pad(mask, 1)  # the image border counts as mask edge, as SAM3
    points = []
    for _ in range(max(n, 0)):
        if not padded.any():
            break
        dist = ndimage.distance_transform_edt(padded)
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        padded[y, x] = False  # the chosen pixel becomes edge: the next point keeps away from it
        points.append((x - 1, y - 1))
    return np.asarray(points, dtype=np.float32).reshape(-1, 2)


def random_mask_points(mask, n: int, rng: np.random.Generator) -> np.ndarray:
    """SAM3's 'random_mask': (n, 2) (x, y) mask pixels drawn uniformly with replacement."""
    ys, xs = np.nonzero(_as_mask(mask))
    if n <= 0 or len(ys) == 0:
        return np.zeros((0, 2), np.float32)
    pick = rng.integers(0, len(ys), size=n)
    return np.stack([xs[pick], ys[pick]], axis=1).astype(np.float32)


def negative_points(mask, n: int, rng: np.random.Generator, margin: float = 8.0) -> np.ndarray:
    """(n', 2) (x, y) background pixels at least ``margin`` px from the mask, uniform, no repeats."""
    mask = _as_mask(mask)
    if n <= 0:
        return np.zeros((0, 2), np.float32)
    far = ndimage.distance_transform_edt(~mask) >= margin if mask.any() else np.ones_like(mask)
    ys, xs = np.nonzero(far)
    if len(ys) < n:
        _note_fallback("few_negatives", f"only {len(ys)} background pixels are {margin} px from the mask; wanted {n}")
    pick = rng.choice(len(ys), size=min(n, len(ys)), replace=False)
    return np.stack([xs[pick], ys[pick]], axis=1).astype(np.float32)


def sample_points(
    mask,
    num_points: tuple[int, int] | int,
    rng: np.random.Generator,
    *,
    mode: str = "centreline",
    num_negative: int = 0,
    negative_margin: float = 8.0,
) -> PointPrompt:
    """Draw n ∈ [lo, hi] positive points with ``mode`` plus ``num_negative`` negatives.

    mask (H, W) bool → PointPrompt (positives first, then negatives).
    """
    if mode not in POINT_SAMPLE_MODES:
        raise ConfigError(f"must be one of {list(POINT_SAMPLE_MODES)}, got {mode!r}", key="prompts.point_sample_mode")
    n = draw_num_points(num_points, rng)
    return _points_prompt(mask, n, rng, mode=mode, num_negative=num_negative, negative_margin=negative_margin)


def _points_prompt(mask, n: int, rng: np.random.Generator, *, mode: str, num_negative: int, negative_margin: float) -> PointPrompt:
    mask = _as_mask(mask)
    fallback = None
    if mode == "centreline":
        positives, fallback = centreline_points(mask, n, rng)
    elif n > 0 and not mask.any():
        _note_fallback("empty_mask", "mask is empty: no positive points")
        positives, fallback = np.zeros((0, 2), np.float32), "empty_mask"
    elif mode == "centered":
        positives = centered_points(mask, n)
    else:
        positives = random_mask_points(mask, n, rng)
    negatives = negative_points(mask, num_negative, rng, negative_margin)
    points = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.concatenate([np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)])
    return PointPrompt(points=points, labels=labels, fallback=fallback)
