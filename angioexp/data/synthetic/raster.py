"""Rasterised tube sweep: projected tubes → per-pixel X-ray path length and ownership.

A projected vessel is a chain of capsules (segments with linearly varying radius). For every
pixel near a capsule we evaluate, in one vectorised pass per capsule size class:

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

import numpy as np

# Window sizes for batching capsules of similar extent (padding wastes at most ~2x).
_SIZE_CLASSES = np.array([4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048])
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


def rasterize(
    tubes: list[Tube2D],
    shape: tuple[int, int],
    *,
    margin: float = 0.0,
    with_key: bool = False,
    inner_fraction: float = 0.0,
    inner_weight: float = 0.0,
) -> Raster:
    """Render ``tubes`` into an (H, W) image.

    ``inner_fraction``/``inner_weight`` subtract ``inner_weight``·chord(``inner_fraction``·r):
    a hollow profile (bone cortex around marrow, a catheter wall around its lumen).
    """
    height, width = shape
    value = np.zeros(height * width, np.float32)
    scratch = np.zeros(height * width, np.float32)
    key = np.full(height * width, NO_KEY, np.int64) if with_key else None

    for tube in tubes:
        if len(tube.col) < 2:
            continue
        x0, x1 = tube.col[:-1].astype(np.float32), tube.col[1:].astype(np.float32)
        y0, y1 = tube.row[:-1].astype(np.float32), tube.row[1:].astype(np.float32)
        r0, r1 = tube.radius[:-1].astype(np.float32), tube.radius[1:].astype(np.float32)
        w0, w1 = tube.weight[:-1].astype(np.float32), tube.weight[1:].astype(np.float32)
        mrad = tube.mask_radius if tube.mask_radius is not None else tube.radius
        m0, m1 = mrad[:-1].astype(np.float32), mrad[1:].astype(np.float32)
        reach = np.maximum(np.maximum(r0, r1), np.maximum(m0, m1)) + (margin if with_key else 0.0) + 1.0
        bx0 = np.floor(np.minimum(x0, x1) - reach).astype(np.int32)
        by0 = np.floor(np.minimum(y0, y1) - reach).astype(np.int32)
        extent = np.maximum(
            np.ceil(np.maximum(x0, x1) + reach).astype(np.int32) - bx0,
            np.ceil(np.maximum(y0, y1) + reach).astype(np.int32) - by0,
        ) + 1
        # Drop capsules whose window misses the image entirely.
        on_image = (bx0 < width) & (by0 < height) & (bx0 + extent > 0) & (by0 + extent > 0)
        if not on_image.any():
            continue
        size_class = _SIZE_CLASSES[np.searchsorted(_SIZE_CLASSES, extent)]
        ids = tube.capsule_ids
        lo_r, hi_r, lo_c, hi_c = height, 0, width, 0
        for side in np.unique(size_class[on_image]):
            g = np.nonzero(on_image & (size_class == side))[0]
            oy, ox = np.divmod(np.arange(side * side, dtype=np.int32), side)
            px = bx0[g, None] + ox[None, :]  # (K, S²)
            py = by0[g, None] + oy[None, :]
            dx, dy = (x1 - x0)[g, None], (y1 - y0)[g, None]
            length2 = dx * dx + dy * dy + 1e-12
            fx, fy = px - x0[g, None], py - y0[g, None]
            t = np.clip((fx * dx + fy * dy) / length2, 0.0, 1.0)
            ex, ey = fx - t * dx, fy - t * dy
            rho2 = ex * ex + ey * ey
            r = r0[g, None] + t * (r1 - r0)[g, None]
            w = w0[g, None] + t * (w1 - w0)[g, None]
            chord = 2.0 * np.sqrt(np.maximum(r * r - rho2, 0.0))
            if inner_weight:
                ri = inner_fraction * r
                chord -= inner_weight * 2.0 * np.sqrt(np.maximum(ri * ri - rho2, 0.0))
            chord *= w
            inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
            lit = inside & (chord > 0)
            flat = (py * width + px)
            if lit.any():
                np.maximum.at(scratch, flat[lit], chord[lit])
                lo_r, hi_r = min(lo_r, int(py[lit].min())), max(hi_r, int(py[lit].max()) + 1)
                lo_c, hi_c = min(lo_c, int(px[lit].min())), max(hi_c, int(px[lit].max()) + 1)
            if with_key:
                m = m0[g, None] + t * (m1 - m0)[g, None]
                depth = m - np.sqrt(rho2)
                near = inside & (depth > -margin)
                if near.any():
                    q = np.rint((depth[near] + margin) * KEY_DEPTH_SCALE).astype(np.int64)
                    cid = np.broadcast_to((ids[g] if ids is not None else g)[:, None], near.shape)[near]
                    np.maximum.at(key, flat[near], (q << KEY_ID_BITS) | cid.astype(np.int64))
        if hi_r > lo_r:
            # A tube contributes its max over capsules; tubes add. Fold the tube's box in.
            sv = scratch.reshape(height, width)[lo_r:hi_r, lo_c:hi_c]
            value.reshape(height, width)[lo_r:hi_r, lo_c:hi_c] += sv
            sv[...] = 0.0
    return Raster(
        value=value.reshape(height, width),
        key=key.reshape(height, width) if key is not None else None,
        margin=float(margin),
    )


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
