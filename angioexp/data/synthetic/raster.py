"""Rasterised tube sweep: projected tubes → per-pixel X-ray path length and ownership.

A projected vessel is a chain of capsules (segments with linearly varying radius). For every
pixel near a capsule we evaluate, in one vectorised pass per capsule size class (all tubes
together):

* the chord of the pixel's ray through the tube, ``2·√(r² − ρ²)`` (ρ = distance from the pixel
  centre to the capsule's axis), times a per-point weight (mm of material per pixel of chord,
  including the 1/sin φ obliquity factor). Within one tube the capsules overlap at the joints,
  so a tube contributes the MAXIMUM over its capsules; different tubes ADD (overlapping
  vessels are darker, as Beer–Lambert says).
* an ownership key: the pixel's depth inside the tube's (mask) radius, ``r_mask − ρ``, packed
  with the capsule id. The maximum key over all tubes gives the signed distance to the union of
  tubes (negative inside) and the capsule the pixel lies deepest in — used for the segment map
  and the pseudo-label error model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Window sizes for batching capsules of similar extent (steps of ~1.2: padding wastes ≤ 1.45× area).
_SIZE_CLASSES = np.array([4, 5, 6, 7, 8, 10, 12, 14, 16, 19, 22, 26, 30, 36, 42, 48, 56, 64, 80, 96, 112, 128,
                          160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048])
KEY_ID_BITS = 24  # capsule ids < 16.7M
KEY_DEPTH_SCALE = 64.0  # 1/64 px resolution of the stored depth
NO_KEY = -1


@dataclass
class Tube2D:
    """A projected tube: N points (N ≥ 2) → N−1 capsules. All lengths in pixels."""

    col: np.ndarray  # (N,)
    row: np.ndarray  # (N,)
    radius: np.ndarray  # (N,) lumen radius for the chord
    weight: np.ndarray  # (N,) multiplier turning a chord in px into the rendered quantity
    mask_radius: np.ndarray | None = None  # (N,) radius for the label (≥ a minimum width)
    capsule_ids: np.ndarray | None = None  # (N−1,) ids packed into the ownership key


@dataclass
class Raster:
    value: np.ndarray  # (H, W) float32 Σ_tubes max_capsules chord·weight
    key: np.ndarray | None  # (H, W) int64 max ownership key, NO_KEY where no tube is near
    margin: float  # distance (px) beyond the mask radius that keys cover
    inner: np.ndarray | None = None  # (H, W) float32 the same sum for the inner radius (with_inner)

    def signed_distance(self) -> np.ndarray:
        """(H, W) float32 distance to the union of tubes (mask radius), < 0 inside, capped at
        +margin where no tube is within the margin."""
        depth = (self.key >> KEY_ID_BITS).astype(np.float32) / KEY_DEPTH_SCALE - self.margin
        sdf = -depth
        sdf[self.key == NO_KEY] = self.margin
        return sdf

    def owner(self) -> np.ndarray:
        """(H, W) int32 id of the capsule each pixel lies deepest in (−1 if none near)."""
        own = (self.key & ((1 << KEY_ID_BITS) - 1)).astype(np.int32)
        own[self.key == NO_KEY] = -1
        return own


@lru_cache(maxsize=None)
def _window_offsets(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row offsets (float32, flattened side×side) of a window's pixels."""
    oy, ox = np.divmod(np.arange(side * side, dtype=np.int32), side)
    return ox.astype(np.float32), oy.astype(np.float32)


def _half_chord(r: np.ndarray, rho2: np.ndarray) -> np.ndarray:
    """√(r² − ρ²) where positive, else 0 (a new array; ``r`` is left alone)."""
    out = r * r
    out -= rho2
    np.maximum(out, 0.0, out=out)
    return np.sqrt(out, out=out)


def rasterize(
    tubes: list[Tube2D],
    shape: tuple[int, int],
    *,
    margin: float = 0.0,
    with_key: bool = False,
    inner_fraction: float = 0.0,
    inner_weight: float = 0.0,
    with_inner: bool = False,
) -> Raster:
    """Render ``tubes`` into an (H, W) image.

    ``inner_fraction``/``inner_weight`` subtract ``inner_weight``·chord(``inner_fraction``·r):
    a hollow profile (bone cortex around marrow, a catheter wall around its lumen).
    ``with_inner`` also returns, as ``Raster.inner``, the chord·weight of the inner radius alone
    (a catheter's lumen) from the same pass.

    All tubes' capsules are batched together per size class (a tree has hundreds of short
    tubes: per-tube batches would be dominated by call overhead); the per-tube maximum is then
    taken by sorting the lit (tube, pixel) pairs.
    """
    height, width = shape
    key = np.full(height * width, NO_KEY, np.int64) if with_key else None
    tubes = [t for t in tubes if len(t.col) >= 2]
    if not tubes:
        empty = np.zeros(shape, np.float32)
        return Raster(empty, key.reshape(shape) if key is not None else None, float(margin),
                      empty.copy() if with_inner else None)

    def ends(attr):
        parts = [getattr(t, attr) if getattr(t, attr) is not None else t.radius for t in tubes]
        return (np.concatenate([v[:-1] for v in parts]).astype(np.float32),
                np.concatenate([v[1:] for v in parts]).astype(np.float32))

    x0, x1 = ends("col")
    y0, y1 = ends("row")
    r0, r1 = ends("radius")
    w0, w1 = ends("weight")
    m0, m1 = ends("mask_radius")
    tube_of = np.concatenate([np.full(len(t.col) - 1, k, np.int64) for k, t in enumerate(tubes)])
    ids = np.concatenate([
        t.capsule_ids if t.capsule_ids is not None else np.arange(len(t.col) - 1) for t in tubes
    ]).astype(np.int64)
    reach = np.maximum(np.maximum(r0, r1), np.maximum(m0, m1)) + (margin if with_key else 0.0) + 1.0
    bx0 = np.floor(np.minimum(x0, x1) - reach).astype(np.int64)
    by0 = np.floor(np.minimum(y0, y1) - reach).astype(np.int64)
    extent = np.maximum(
        np.ceil(np.maximum(x0, x1) + reach).astype(np.int64) - bx0,
        np.ceil(np.maximum(y0, y1) + reach).astype(np.int64) - by0,
    ) + 1
    # Drop capsules whose window misses the image entirely.
    on_image = (bx0 < width) & (by0 < height) & (bx0 + extent > 0) & (by0 + extent > 0)
    size_class = _SIZE_CLASSES[np.searchsorted(_SIZE_CLASSES, extent)]
    dx, dy, dr, dw, dm = x1 - x0, y1 - y0, r1 - r0, w1 - w0, m1 - m0
    inv_length2 = 1.0 / (dx * dx + dy * dy + np.float32(1e-12))
    lit_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []  # (tube·HW + pixel, chord, inner)

    for side in np.unique(size_class[on_image]):
        g = np.nonzero(on_image & (size_class == side))[0]
        col = lambda v: v[g, None]  # noqa: E731 - per-capsule column for broadcasting
        ox, oy = _window_offsets(int(side))
        # Window-local coordinates: pixel − segment start (small numbers, float32-exact).
        fx = ox - col((x0 - bx0).astype(np.float32))
        fy = oy - col((y0 - by0).astype(np.float32))
        t = fx * col(dx)
        t += fy * col(dy)
        t *= col(inv_length2)
        np.clip(t, 0.0, 1.0, out=t)
        fx -= t * col(dx)  # now the offset from the nearest axis point
        fy -= t * col(dy)
        rho2 = np.square(fx, out=fx)
        rho2 += np.square(fy, out=fy)
        r = t * col(dr)
        r += col(r0)
        chord = _half_chord(r, rho2)
        inner_chord = None
        if inner_weight or with_inner:
            r *= inner_fraction
            inner_chord = _half_chord(r, rho2)
            if inner_weight:
                chord -= inner_weight * inner_chord
        flat = col(by0 * width + bx0) + (oy.astype(np.int64) * width + ox.astype(np.int64))
        # Pixels inside the image: separable in window columns × window rows.
        span = np.arange(side)
        in_x = (col(bx0) + span >= 0) & (col(bx0) + span < width)
        in_y = (col(by0) + span >= 0) & (col(by0) + span < height)
        inside = (in_y[:, :, None] & in_x[:, None, :]).reshape(len(g), -1)
        # Gathers by flat index (one nonzero, then takes): cheaper than several boolean masks.
        lit = np.flatnonzero(inside & (chord > 0))
        if len(lit):
            capsule = g[lit // (side * side)]
            w2 = 2.0 * (w0[capsule] + t.ravel()[lit] * dw[capsule])
            pixel = flat.ravel()[lit]
            lit_parts.append((
                tube_of[capsule] * (height * width) + pixel,
                chord.ravel()[lit] * w2,
                inner_chord.ravel()[lit] * w2 if with_inner else None,
            ))
        if with_key:
            depth = t * col(dm)
            depth += col(m0)
            depth -= np.sqrt(rho2, out=rho2)
            near = np.flatnonzero(inside & (depth > -margin))
            if len(near):
                q = np.rint((depth.ravel()[near] + margin) * KEY_DEPTH_SCALE).astype(np.int64)
                cid = ids[g[near // (side * side)]]
                np.maximum.at(key, flat.ravel()[near], (q << KEY_ID_BITS) | cid)

    value = inner = None
    if lit_parts:
        pair = np.concatenate([p[0] for p in lit_parts])
        value = _sum_of_tube_maxima(pair, np.concatenate([p[1] for p in lit_parts]), height * width)
        if with_inner:
            inner = _sum_of_tube_maxima(pair, np.concatenate([p[2] for p in lit_parts]), height * width)
    if value is None:
        value = np.zeros(height * width, np.float32)
    if with_inner and inner is None:
        inner = np.zeros(height * width, np.float32)
    return Raster(
        value=value.reshape(height, width),
        key=key.reshape(height, width) if key is not None else None,
        margin=float(margin),
        inner=inner.reshape(height, width) if inner is not None else None,
    )


def _sum_of_tube_maxima(pair: np.ndarray, chord: np.ndarray, n_pixels: int) -> np.ndarray:
    """Per pixel, Σ over tubes of the max over that tube's capsules. ``pair`` = tube·n + pixel."""
    if pair.max() < n_pixels:  # one tube (a catheter): a plain scatter-max, no sort
        out = np.zeros(n_pixels, np.float32)
        np.maximum.at(out, pair, chord.astype(np.float32))
        return out
    order = np.argsort(pair)  # equal pairs collapse below, so stability does not matter
    pair = pair[order]
    starts = np.flatnonzero(np.concatenate([[True], pair[1:] != pair[:-1]]))
    maxima = np.maximum.reduceat(chord[order], starts)
    return np.bincount(pair[starts] % n_pixels, weights=maxima, minlength=n_pixels).astype(np.float32)


def zoom_linear(image: np.ndarray, factor: int, shape: tuple[int, int], *, grid_mode: bool) -> np.ndarray:
    """``scipy.ndimage.zoom(image, factor, order=1, mode="nearest", grid_mode=grid_mode)``
    cropped to ``shape`` (float32), as two separable gathers: several times faster than the
    general spline code for the large upsamplings of smooth fields done per case."""
    out = image.astype(np.float32, copy=False)
    # Columns first (the input is small), then rows (whole-row gathers are cheap).
    for axis in (1, 0):
        n_in, n_out = image.shape[axis], shape[axis]
        total = int(round(n_in * factor))
        pos = np.arange(n_out, dtype=np.float64)
        pos = (pos + 0.5) * n_in / total - 0.5 if grid_mode else pos * (n_in - 1) / max(total - 1, 1)
        pos = np.clip(pos, 0.0, n_in - 1.0)
        i0 = np.minimum(pos.astype(np.int64), max(n_in - 2, 0))
        frac = (pos - i0).astype(np.float32)
        if n_in == 1:
            out = np.take(out, i0, axis=axis)
            continue
        step = np.take(np.diff(out, axis=axis), i0, axis=axis)  # out[i0 + 1] − out[i0]
        step *= frac if axis == 1 else frac[:, None]
        out = np.take(out, i0, axis=axis)
        out += step
    return out


def resample_polyline(col: np.ndarray, row: np.ndarray, step: np.ndarray | float) -> np.ndarray:
    """Fractional indices into the polyline at ~``step`` px spacing along its 2D arc length.

    Foreshortened stretches (little 2D length) get few samples, long ones many; the first and
    last points are always kept. Returns a float array for :func:`numpy.interp`.
    """
    seg = np.hypot(np.diff(col), np.diff(row))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    total = arc[-1]
    base_step = float(np.min(step)) if np.ndim(step) else float(step)
    if total <= base_step:
        return np.array([0.0, len(col) - 1.0])
    if np.ndim(step):
        # Variable step: integrate 1/step along the arc and place samples at integer counts.
        density = np.concatenate([[0.0], np.cumsum(seg / (0.5 * (step[1:] + step[:-1])))])
        n = max(int(np.ceil(density[-1])), 1)
        targets = np.linspace(0.0, density[-1], n + 1)
        return np.interp(targets, density, np.arange(len(col), dtype=float))
    n = max(int(np.ceil(total / base_step)), 1)
    targets = np.linspace(0.0, total, n + 1)
    return np.interp(targets, arc, np.arange(len(col), dtype=float))
