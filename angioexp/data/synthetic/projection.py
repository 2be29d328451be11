"""C-arm perspective geometry: patient mm → detector pixels, and line integrals through solids.

Coordinates are DICOM patient coordinates (LPS): x → the patient's left, y → posterior,
z → head, in mm, origin at the C-arm isocentre. Angles follow the angiography convention of the
index.csv columns: primary LAO + / RAO −, secondary CRA + / CAU −.

At primary = secondary = 0 (AP) the tube is under the table (posterior) and the detector
anterior; the image is shown as if facing the patient, so image columns run toward the
patient's left and rows toward the feet. Rotating the detector toward the patient's left (LAO)
puts the spine on the image right, toward the right (RAO) on the image left, as in the cath lab.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Standard projections (docs/design.md#synthetic-data). name → (system, primary, secondary) in degrees.
STANDARD_VIEWS: dict[str, tuple[str, float, float]] = {
    "RAO30_CAU25": ("left", -30.0, -25.0),
    "RAO30_CRA30": ("left", -30.0, 30.0),
    "AP_CRA35": ("left", 0.0, 35.0),
    "LAO45_CRA25": ("left", 45.0, 25.0),
    "LAO50_CAU25": ("left", 50.0, -25.0),  # "spider"
    "LAO90": ("left", 90.0, 0.0),  # lateral
    "LAO40": ("right", 40.0, 0.0),
    "RAO30": ("right", -30.0, 0.0),
    "AP_CRA25": ("right", 0.0, 25.0),
}
LEFT_VIEWS = tuple(k for k, v in STANDARD_VIEWS.items() if v[0] == "left")
RIGHT_VIEWS = tuple(k for k, v in STANDARD_VIEWS.items() if v[0] == "right")

# Typical cath-lab C-arm: the source sits ~750 mm from the isocentre; SID ≈ 1000 mm.
SOURCE_ISOCENTRE_MM = 750.0


@dataclass(frozen=True)
class CArm:
    """One acquisition geometry. ``size`` px square detector covering ``fov_mm`` mm."""

    primary_deg: float
    secondary_deg: float
    sid_mm: float  # source → image (detector) distance
    fov_mm: float  # detector field of view (side of the square), mm at the detector
    size: int  # detector pixels per side
    sod_mm: float = SOURCE_ISOCENTRE_MM

    # --- axes (cached: every projection reads them, and np.cross on one vector is slow) -------
    @cached_property
    def beam(self) -> np.ndarray:
        """(3,) unit vector from the source through the isocentre to the detector."""
        a, b = np.radians(self.primary_deg), np.radians(self.secondary_deg)
        return np.array([np.sin(a) * np.cos(b), -np.cos(a) * np.cos(b), np.sin(b)])

    @cached_property
    def col_axis(self) -> np.ndarray:
        """(3,) unit vector along increasing image column (stays horizontal: no C-arm roll)."""
        a = np.radians(self.primary_deg)
        return np.array([np.cos(a), np.sin(a), 0.0])

    @cached_property
    def row_axis(self) -> np.ndarray:
        """(3,) unit vector along increasing image row (toward the feet at secondary 0)."""
        return np.cross(self.col_axis, self.beam)

    @cached_property
    def source(self) -> np.ndarray:
        return -self.sod_mm * self.beam

    @property
    def pixel_mm(self) -> float:
        """Detector pixel pitch (DICOM Imager Pixel Spacing)."""
        return self.fov_mm / self.size

    @property
    def magnification(self) -> float:
        """Geometric magnification of an object at the isocentre."""
        return self.sid_mm / self.sod_mm

    @property
    def iso_pixel_mm(self) -> float:
        """Pixel spacing in the isocentre plane: what ``pixel_spacing_mm`` in index.csv records."""
        return self.pixel_mm / self.magnification

    # --- projection -------------------------------------------------------------------------
    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Perspective projection.

        points: (N, 3) mm. Returns col (N,), row (N,) in pixels (pixel centres at integers,
        the isocentre at (size-1)/2) and mag (N,), the local magnification SID / source depth.
        """
        pts = np.asarray(points, dtype=np.float64)
        depth = self.sod_mm + pts @ self.beam  # distance from the source along the beam
        mag = self.sid_mm / depth
        centre = (self.size - 1) / 2.0
        col = (pts @ self.col_axis) * mag / self.pixel_mm + centre
        row = (pts @ self.row_axis) * mag / self.pixel_mm + centre
        return col, row, mag

    def ray_directions(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Unit ray directions (…, 3) from the source to the given pixel centres."""
        centre = (self.size - 1) / 2.0
        u = (np.asarray(cols, np.float64) - centre) * self.pixel_mm
        v = (np.asarray(rows, np.float64) - centre) * self.pixel_mm
        d = (
            self.sid_mm * self.beam
            + u[..., None] * self.col_axis
            + v[..., None] * self.row_axis
        )
        return d / np.linalg.norm(d, axis=-1, keepdims=True)

    def sin_to_rays(self, points: np.ndarray, tangents: np.ndarray) -> np.ndarray:
        """|sin| of the angle between each unit tangent (…, 3) and the ray through its point.

        A tube seen at angle φ to its axis is crossed over 2·√(r²−ρ²)/sin φ: foreshortened
        vessels look darker, as in real angiograms.
        """
        rays = np.asarray(points, np.float64) - self.source
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        return np.linalg.norm(np.cross(tangents, rays), axis=-1)

    def bbox(self, corners: np.ndarray, pad: float = 1.0) -> tuple[int, int, int, int] | None:
        """Pixel box (r0, r1, c0, c1), end-exclusive, holding the projection of ``corners``;
        None when it misses the image. Perspective keeps convex hulls, so the projected
        corners of a solid's bounding box bound the solid's shadow."""
        col, row, _ = self.project(corners)
        r0 = max(int(np.floor(row.min() - pad)), 0)
        r1 = min(int(np.ceil(row.max() + pad)) + 1, self.size)
        c0 = max(int(np.floor(col.min() - pad)), 0)
        c1 = min(int(np.ceil(col.max() + pad)) + 1, self.size)
        if r0 >= r1 or c0 >= c1:
            return None
        return r0, r1, c0, c1


@dataclass(frozen=True)
class Ellipsoid:
    """A solid {x : (x−c)ᵀ R diag(1/a²) Rᵀ (x−c) ≤ 1}; columns of ``rotation`` are its axes."""

    centre: np.ndarray  # (3,) mm
    semi_axes: np.ndarray  # (3,) mm
    rotation: np.ndarray  # (3, 3), orthonormal columns

    @staticmethod
    def aligned(centre, semi_axes) -> "Ellipsoid":
        return Ellipsoid(np.asarray(centre, float), np.asarray(semi_axes, float), np.eye(3))

    def moved(self, shift: np.ndarray) -> "Ellipsoid":
        return Ellipsoid(self.centre + shift, self.semi_axes, self.rotation)

    def corners(self) -> np.ndarray:
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
        return self.centre + (signs * self.semi_axes) @ self.rotation.T

    def intersect(self, source: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entry/exit distances along unit rays ``dirs`` (..., 3) from ``source``; 0, 0 on a miss."""
        # In the ellipsoid's unit-sphere frame the quadratic is |p + t q|² = 1.
        scale = (self.rotation / self.semi_axes).astype(np.float32)
        p = ((source - self.centre) @ self.rotation / self.semi_axes).astype(np.float32)
        q = dirs @ scale
        qq = np.einsum("...k,...k->...", q, q)
        pq = q @ p
        return _roots(pq, qq, float(p @ p) - 1.0)


@dataclass(frozen=True)
class Cylinder:
    """An upright elliptic cylinder (axis along z): a vertebral body's box-like shadow."""

    centre: np.ndarray  # (3,) mm
    radii: np.ndarray  # (2,) mm, x and y
    half_height: float

    def moved(self, shift: np.ndarray) -> "Cylinder":
        return Cylinder(self.centre + shift, self.radii, self.half_height)

    def shrunk(self, wall: float, endplate: float) -> "Cylinder":
        return Cylinder(self.centre, self.radii - wall, self.half_height - endplate)

    def corners(self) -> np.ndarray:
        rx, ry = self.radii
        h = self.half_height
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
        return self.centre + signs * np.array([rx, ry, h])

    def intersect(self, source: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = ((source - self.centre)[:2] / self.radii).astype(np.float32)
        q = dirs[..., :2] / self.radii.astype(np.float32)
        qq = np.einsum("...k,...k->...", q, q)
        pq = q @ p
        t0, t1 = _roots(pq, np.maximum(qq, 1e-12), float(p @ p) - 1.0)
        dz = dirs[..., 2]
        safe = np.where(np.abs(dz) < 1e-6, 1e-6, dz)
        za = (self.centre[2] - self.half_height - source[2]) / safe
        zb = (self.centre[2] + self.half_height - source[2]) / safe
        lo = np.maximum(t0, np.minimum(za, zb))
        hi = np.minimum(t1, np.maximum(za, zb))
        hit = (hi > lo) & (t1 > t0)
        return np.where(hit, lo, 0.0).astype(np.float32), np.where(hit, hi, 0.0).astype(np.float32)


def _roots(pq: np.ndarray, qq: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Solutions of qq·t² + 2·pq·t + c = 0 as (t0, t1); (0, 0) where there is none."""
    disc = pq * pq - qq * c
    hit = disc > 0
    root = np.sqrt(np.where(hit, disc, 0.0))
    t0 = np.where(hit, (-pq - root) / qq, 0.0).astype(np.float32)
    t1 = np.where(hit, (-pq + root) / qq, 0.0).astype(np.float32)
    return t0, t1


class RayGrid:
    """Rays from the source to every pixel centre, for analytic chords through solids."""

    def __init__(self, carm: CArm):
        self.carm = carm
        rows, cols = np.mgrid[0 : carm.size, 0 : carm.size]
        self.dirs = carm.ray_directions(rows, cols).astype(np.float32)  # (H, W, 3)
        self.source = carm.source

    def interval(self, solid, box=None):
        """Entry/exit distances (t0, t1) of each ray through ``solid`` over ``box`` (default:
        the solid's shadow). Returns (box, t0, t1); box None when the shadow misses the image."""
        if box is None:
            box = self.carm.bbox(solid.corners())
            if box is None:
                return None, None, None
        r0, r1, c0, c1 = box
        t0, t1 = solid.intersect(self.source, self.dirs[r0:r1, c0:c1])
        return box, t0, t1

    def chord(self, solid) -> tuple[tuple[int, int, int, int] | None, np.ndarray | None]:
        """Path length (mm) of each ray inside ``solid``, over its shadow's bounding box."""
        box, t0, t1 = self.interval(solid)
        if box is None:
            return None, None
        return box, t1 - t0
