"""Thin-vessel tree phantoms and the perturbations that mimic label noise.

Used by the metric tests (the figures of docs/design.md#thin-vessel-metrics) and the evaluation
benchmark. These are geometric test objects, not the realistic angiography generator
(``angioexp.data.synthetic``): a branching tree of smooth curves whose widths taper from
``max_width`` to ``min_width`` px, which is exactly the regime where a 1-px boundary error costs
a large fraction of IoU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def random_vessel_tree(
    size: int = 512,
    rng: np.random.Generator | int | None = None,
    *,
    min_width: float = 3.0,
    max_width: float = 8.0,
    depth: int = 4,
) -> np.ndarray:
    """A random branching vessel tree, bool (size, size); widths in [min_width, max_width] px.

    The trunk enters from a random point near the top edge; every branch is a curved walk
    with a smoothly varying heading, and splits into two thinner children ``depth`` times.
    Trees that leave the frame too early (under 2% of the pixels are vessel) are redrawn.
    """
    rng = np.random.default_rng(rng)
    for _ in range(20):
        mask = _draw_tree(size, rng, min_width, max_width, depth)
        if mask.mean() >= 0.02:
            break
    return mask


def _draw_tree(size: int, rng: np.random.Generator, min_width: float, max_width: float, depth: int) -> np.ndarray:
    # Each centreline sample carries a radius; pixels within that radius of it are vessel.
    points: list[np.ndarray] = []  # (n, 3): row, col, radius
    start = np.array([rng.uniform(0.05, 0.2) * size, rng.uniform(0.3, 0.7) * size])
    heading = rng.uniform(np.pi / 4, 3 * np.pi / 4)  # mostly downwards (rows grow downwards)
    stack = [(start, heading, max_width / 2, depth, 0.55 * size)]
    while stack:
        origin, heading, radius, level, length = stack.pop()
        steps = max(int(length / 0.5), 2)  # sub-pixel steps so the centreline has no gaps
        turn = np.cumsum(rng.normal(0.0, 0.03, steps))  # smooth curvature
        angles = heading + turn
        path = origin + np.cumsum(0.5 * np.stack([np.sin(angles), np.cos(angles)], 1), 0)
        child_radius = max(radius * 0.72, min_width / 2)
        # Taper along the branch towards the child radius.
        radii = np.linspace(radius, child_radius, steps)
        points.append(np.column_stack([path, radii]))
        if level > 0:
            for side in (-1, 1):
                at = rng.integers(steps // 2, steps)
                stack.append(
                    (path[at], angles[at] + side * rng.uniform(0.35, 0.9), child_radius, level - 1, length * 0.6)
                )
    samples = np.concatenate(points)
    inside = (samples[:, 0] >= 0) & (samples[:, 0] < size) & (samples[:, 1] >= 0) & (samples[:, 1] < size)
    samples = samples[inside]
    # One distance transform per distinct radius (quantised to 0.5 px): vectorised drawing.
    radii = np.round(samples[:, 2] * 2) / 2
    mask = np.zeros((size, size), dtype=bool)
    for r in np.unique(radii):
        centre = np.ones((size, size), dtype=bool)
        chosen = samples[radii == r]
        centre[chosen[:, 0].astype(int), chosen[:, 1].astype(int)] = False
        mask |= ndimage.distance_transform_edt(centre) <= r - 0.5 + 1e-6
    return mask


def shift(mask: np.ndarray, dy: int = 0, dx: int = 0) -> np.ndarray:
    """Translate a bool (H, W) mask by (dy, dx) px; what leaves the frame is lost."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    src = mask[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    """Grow by ``px`` (Euclidean disk): pixels within ``px`` of the mask."""
    if px <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= px


def erode(mask: np.ndarray, px: int = 1) -> np.ndarray:
    """Shrink by ``px`` (Euclidean disk): keep pixels more than ``px`` from the background."""
    if px <= 0:
        return mask.copy()
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] > px
