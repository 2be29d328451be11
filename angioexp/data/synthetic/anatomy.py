"""3D anatomy of one synthetic patient: a SYNTAX-labelled coronary tree on a heart, and a thorax.

Coordinates: DICOM patient LPS (x → patient's left, y → posterior, z → head), mm, origin at the
centre of the ventricles. The C-arm isocentre is placed near it per acquisition.

The heart is an ellipsoidal ventricular mass with long axis ``a`` (base → apex) pointing left,
anterior and inferior. Epicardial vessels are curves on that surface in coordinates
(s, θ): s = 0 is the atrioventricular (AV) groove, s = 1 the apex; θ is the azimuth around
``a``, measured from ``e1`` (the anterior direction made perpendicular to ``a``) toward ``e2``
(= e1 × a, which points left and superior). With the default axis that puts θ ≈ −53° on the
right, −117° inferior (diaphragmatic), 180° posterior, 127° left. The grooves follow:

* anterior interventricular groove (LAD) at θ_AIV ≈ 40°;
* posterior interventricular groove (PDA) at θ_PIV ≈ −130°; the crux is (s = 0, θ_PIV);
* the AV ring s ≈ 0: the RCA runs from θ ≈ −5° down through the acute margin (≈ −75°) to the
  crux; the LCx from θ_AIV the other way round (through the obtuse margin ≈ 115°) toward it.

Published figures used (docs/design.md#synthetic-data):
* Lumen diameters: Dodge et al., Circulation 1992;86:232 (83 normal arteriograms): left main
  4.5 ± 0.5 mm; proximal LAD 3.7 ± 0.4; distal LAD 1.9 ± 0.4; proximal RCA 3.9 ± 0.6 in
  right-dominant vs 2.8 ± 0.5 in left-dominant hearts; proximal LCx 3.4 ± 0.5 (right-dominant)
  vs 4.2 ± 0.6 (left-dominant); women ~9% smaller. Mid LAD ~2.4 and mid RCA 3.4 (right-dominant)
  vs 1.9 (left-dominant): Vieweg et al., Cathet Cardiovasc Diagn 1976.
* Dominance: ~80–85% right, ~10% left, the rest co-dominant.
* Geometry: Zhu et al., Int J Cardiol 2008 — LAD curvature/tortuosity highest distally, RCA's
  lowest in its middle segment (used as the tortuosity profiles below).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from angioexp.data.synthetic.projection import Cylinder, Ellipsoid
from angioexp.segments import BY_SLUG

STEP_MM = 0.5  # centreline sampling of every 3D curve
APEX_LIMIT = 0.97  # curves end short of the apex pole (s = 1)
DOMINANCE_PREVALENCE = {"right": 0.82, "left": 0.10, "co": 0.08}
FEMALE_DIAMETER_SCALE = 0.91  # Dodge et al.: women's arteries ~9% smaller

L = {slug: seg.label for slug, seg in BY_SLUG.items()}  # slug → integer label

_ANTERIOR = np.array([0.0, -1.0, 0.0])
_LEFT = np.array([1.0, 0.0, 0.0])
_INFERIOR = np.array([0.0, 0.0, -1.0])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Heart surface


@dataclass(frozen=True)
class HeartFrame:
    base_centre: np.ndarray  # (3,) centre of the AV ring (s = 0)
    axis: np.ndarray  # (3,) unit, base → apex
    e1: np.ndarray  # (3,) unit, θ = 0
    e2: np.ndarray  # (3,) unit, θ = 90°
    length: float  # base → apex, mm
    radius: float  # AV-ring radius, mm

    @staticmethod
    def create(azimuth_deg: float, tilt_deg: float, length: float, radius: float) -> "HeartFrame":
        """Long axis ``azimuth_deg`` from anterior toward the left, ``tilt_deg`` below horizontal."""
        az, tilt = np.radians(azimuth_deg), np.radians(tilt_deg)
        horizontal = np.cos(az) * _ANTERIOR + np.sin(az) * _LEFT
        axis = np.cos(tilt) * horizontal + np.sin(tilt) * _INFERIOR
        e1 = _unit(_ANTERIOR - (_ANTERIOR @ axis) * axis)
        e2 = np.cross(e1, axis)
        # The ventricles' centre (s ≈ 0.4) sits at the origin.
        base = -0.4 * length * axis
        return HeartFrame(base, axis, e1, e2, float(length), float(radius))

    def ring_radius(self, s: np.ndarray) -> np.ndarray:
        """Surface radius at axial position s: half an ellipsoid below the AV groove, slowly
        narrowing toward the atria above it (s < 0)."""
        s = np.asarray(s, float)
        below = self.radius * np.sqrt(np.clip(1.0 - s * s, 0.0, 1.0))
        above = self.radius * (1.0 - 0.8 * s * s)
        return np.where(s >= 0, below, above)

    def radial(self, theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, float)
        return np.cos(theta)[..., None] * self.e1 + np.sin(theta)[..., None] * self.e2

    def surface(self, s: np.ndarray, theta: np.ndarray, lift: float = 1.5) -> np.ndarray:
        """(N, 3) epicardial points; ``lift`` mm outside the surface (vessels lie in fat)."""
        s = np.asarray(s, float)
        r = self.ring_radius(s) + lift
        return self.base_centre + (s * self.length)[..., None] * self.axis + r[..., None] * self.radial(theta)


# ---------------------------------------------------------------------------------------------
# Branches


@dataclass
class Branch:
    """One vessel centreline sampled every STEP_MM, with per-point lumen and SYNTAX label."""

    name: str
    points: np.ndarray  # (N, 3) mm
    diameters: np.ndarray  # (N,) lumen diameter, mm
    labels: np.ndarray  # (N,) uint8 angioexp.segments label
    parent: int = -1  # index of the parent branch in the tree, −1 for a trunk from an ostium
    origin_index: int = 0  # index into the parent's points where this branch leaves it
    path_mm: float = 0.0  # path length from the ostium to points[0]
    surface: np.ndarray | None = None  # (N, 2) (s, θ rad) for epicardial branches

    @property
    def arc(self) -> np.ndarray:
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(seg)])

    @property
    def length(self) -> float:
        return float(self.arc[-1])


def _resample(points: np.ndarray, extra: np.ndarray | None = None, step: float = STEP_MM):
    """Resample a dense 3D polyline (and per-point ``extra`` columns) to ``step`` mm spacing."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(np.ceil(arc[-1] / step)), 1)
    targets = np.linspace(0.0, arc[-1], n + 1)
    out = np.stack([np.interp(targets, arc, points[:, k]) for k in range(3)], axis=1)
    if extra is None:
        return out, None
    ex = np.stack([np.interp(targets, arc, extra[:, k]) for k in range(extra.shape[1])], axis=1)
    return out, ex


def _pchip(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Monotone piecewise-cubic (PCHIP, Fritsch–Butland slopes) interpolation of the columns of
    ``y`` (n, k) at ``at``: the same curve as ``scipy.interpolate.PchipInterpolator``, without
    its per-call set-up, which dominated a patient's ~20 curves."""
    h = np.diff(x)[:, None]
    m = np.diff(y, axis=0) / h
    d = np.zeros_like(y)
    if len(x) == 2:
        d[:] = m
    else:
        w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
        flat = (np.sign(m[1:]) != np.sign(m[:-1])) | (m[1:] == 0) | (m[:-1] == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            harmonic = (w1 + w2) / (w1 / m[:-1] + w2 / m[1:])
        d[1:-1] = np.where(flat, 0.0, harmonic)
        for end, (h0, h1, m0, m1) in ((0, (h[0], h[1], m[0], m[1])), (-1, (h[-1], h[-2], m[-1], m[-2]))):
            slope = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
            slope = np.where(np.sign(slope) != np.sign(m0), 0.0, slope)
            overshoot = (np.sign(m0) != np.sign(m1)) & (np.abs(slope) > 3 * np.abs(m0))
            d[end] = np.where(overshoot, 3 * m0, slope)
    i = np.clip(np.searchsorted(x, at, side="right") - 1, 0, len(x) - 2)
    t = ((at - x[i]) / h[i, 0])[:, None]
    hi = h[i]
    return (
        (2 * t**3 - 3 * t**2 + 1) * y[i] + (t**3 - 2 * t**2 + t) * hi * d[i]
        + (3 * t**2 - 2 * t**3) * y[i + 1] + (t**3 - t**2) * hi * d[i + 1]
    )


def _natural_cubic(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Natural cubic spline through (x, y) (columns of y (n, k)) evaluated at ``at``; the curve of
    ``scipy.interpolate.CubicSpline(x, y, bc_type="natural")``. With :func:`_pchip` it keeps
    scipy.interpolate (≈ 0.5 s of imports, paid by every worker process) out of the generator."""
    n = len(x)
    h = np.diff(x)
    slope = np.diff(y, axis=0) / h[:, None]
    # Second derivatives: zero at both ends, continuity of the first derivative inside.
    system = np.eye(n)
    rhs = np.zeros_like(y)
    for i in range(1, n - 1):
        system[i, i - 1 : i + 2] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        rhs[i] = 6 * (slope[i] - slope[i - 1])
    m = np.linalg.solve(system, rhs)
    i = np.clip(np.searchsorted(x, at, side="right") - 1, 0, n - 2)
    hi = h[i][:, None]
    a, b = (x[i + 1][:, None] - at[:, None]) / hi, (at[:, None] - x[i][:, None]) / hi
    return a * y[i] + b * y[i + 1] + ((a**3 - a) * m[i] + (b**3 - b) * m[i + 1]) * hi**2 / 6


def _wiggle(rng: np.random.Generator, arc: np.ndarray, amplitude_mm: float) -> np.ndarray:
    """Smooth random lateral displacement (mm) along ``arc``: three sinusoids, 10–40 mm long."""
    out = np.zeros_like(arc)
    for _ in range(3):
        wavelength = rng.uniform(10.0, 40.0)
        out += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * arc / wavelength + rng.uniform(0, 2 * np.pi))
    return amplitude_mm * out / 1.6


@dataclass
class TreeBuilder:
    frame: HeartFrame
    rng: np.random.Generator
    tortuosity: float  # patient factor (~1)
    diameter_scale: float  # patient factor (sex, body size)
    branches: list[Branch] = field(default_factory=list)

    # --- curves -----------------------------------------------------------------------------
    def surface_curve(self, ctrl: list[tuple[float, float]], profile=None) -> tuple[np.ndarray, np.ndarray]:
        """Epicardial curve through (s, θ°) control points with random tortuosity.

        Returns points (N, 3) and (s, θ rad) (N, 2), sampled every STEP_MM.
        ``profile(u)`` scales the tortuosity along the curve (u ∈ [0, 1], 0 = proximal).
        """
        s_c = np.array([c[0] for c in ctrl], float)
        th_c = np.radians([c[1] for c in ctrl])
        knots_p = self.frame.surface(s_c, th_c)
        gaps = np.maximum(np.linalg.norm(np.diff(knots_p, axis=0), axis=1), 1e-3)
        knots = np.concatenate([[0.0], np.cumsum(gaps)])
        n = max(int(knots[-1] / 0.25), 8)
        tau = np.linspace(0.0, knots[-1], n)
        s, th = _pchip(knots, np.stack([s_c, th_c], axis=1), tau).T
        # Lateral tortuosity: displace along the in-surface normal of the curve, in mm.
        r = np.maximum(self.frame.ring_radius(s), 5.0)
        a_mm, b_mm = s * self.frame.length, th * r
        ta, tb = np.gradient(a_mm), np.gradient(b_mm)
        norm = np.maximum(np.hypot(ta, tb), 1e-9)
        na, nb = -tb / norm, ta / norm
        u = tau / tau[-1]
        scale = profile(u) if profile is not None else np.full_like(u, 0.8)
        ramp = np.clip(tau / 6.0, 0.0, 1.0)  # start exactly on the parent vessel
        offset = _wiggle(self.rng, tau, 1.3 * self.tortuosity) * scale * ramp
        # Stay off the apex pole, where θ is degenerate and a wiggle would become a loop.
        s = np.minimum(s + offset * na / self.frame.length, APEX_LIMIT)
        th = th + offset * nb / r
        pts = self.frame.surface(s, th)
        pts, st = _resample(pts, np.stack([s, th], axis=1))
        return pts, st

    def bent_line(self, start: np.ndarray, end: np.ndarray, bow_mm: float) -> np.ndarray:
        """A gently curved 3D segment (quadratic Bézier) from ``start`` to ``end``."""
        chord = end - start
        side = _unit(np.cross(chord, self.rng.normal(size=3)))
        mid = 0.5 * (start + end) + bow_mm * side
        t = np.linspace(0.0, 1.0, max(int(np.linalg.norm(chord) / 0.2), 4))[:, None]
        pts = (1 - t) ** 2 * start + 2 * (1 - t) * t * mid + t * t * end
        return _resample(pts)[0]

    # --- branches ---------------------------------------------------------------------------
    def add(
        self,
        name: str,
        points: np.ndarray,
        diameters: list[tuple[float, float]],
        labels,
        *,
        parent: int = -1,
        origin_index: int = 0,
        surface: np.ndarray | None = None,
    ) -> int:
        """Append a branch. ``diameters``: (fraction of length, mm) control points; ``labels``:
        one label, or a function of the length fraction returning labels."""
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        frac = arc / max(arc[-1], 1e-6)
        fx, dy = zip(*diameters)
        diam = np.interp(frac, fx, dy) * self.diameter_scale * self.rng.normal(1.0, 0.05)
        lab = np.full(len(points), labels, np.uint8) if np.isscalar(labels) else np.asarray(labels(frac), np.uint8)
        path = 0.0
        if parent >= 0:
            p = self.branches[parent]
            path = p.path_mm + float(p.arc[origin_index])
            # A side branch is never wider than its parent where it leaves it (Murray's law).
            diam = np.minimum(diam, 0.85 * p.diameters[origin_index])
        self.branches.append(
            Branch(name, points, np.maximum(diam, 0.8), lab, parent, origin_index, path, surface)
        )
        return len(self.branches) - 1

    def child(
        self,
        name: str,
        parent: int,
        at_fraction: float,
        ctrl_rel: list[tuple[float, float]],
        diameters,
        labels,
        profile=None,
    ) -> int:
        """A side branch leaving ``parent`` at ``at_fraction`` of its length; ``ctrl_rel`` are
        (Δs, Δθ°) control points relative to the take-off point."""
        p = self.branches[parent]
        idx = int(np.clip(round(at_fraction * (len(p.points) - 1)), 1, len(p.points) - 2))
        s0, th0 = p.surface[idx]
        ctrl = [(s0, np.degrees(th0))] + [(s0 + ds, np.degrees(th0) + dth) for ds, dth in ctrl_rel]
        ctrl = [(float(np.clip(s, -0.2, APEX_LIMIT)), th) for s, th in ctrl]
        pts, st = self.surface_curve(ctrl, profile)
        return self.add(name, pts, diameters, labels, parent=parent, origin_index=idx, surface=st)

    def index_at_theta(self, branch: int, theta_deg: float, increasing: bool) -> int:
        """First point of ``branch`` whose azimuth passes ``theta_deg``."""
        th = np.degrees(self.branches[branch].surface[:, 1])
        hit = np.nonzero(th >= theta_deg if increasing else th <= theta_deg)[0]
        return int(hit[0]) if len(hit) else len(th) - 1


def _lad_profile(u):  # Zhu et al.: LAD tortuosity rises distally
    return 0.45 + 1.0 * u


def _rca_profile(u):  # Zhu et al.: RCA tortuosity lowest in its middle
    return 1.0 - 0.6 * np.sin(np.pi * u)


# ---------------------------------------------------------------------------------------------
# Patient


@dataclass
class Thorax:
    body: Ellipsoid
    lungs: list[Ellipsoid]
    heart: Ellipsoid
    gas_bubble: Ellipsoid | None
    vertebrae: list[Cylinder]  # vertebral bodies (the cortex is rendered as a shell)
    pedicles: list[Ellipsoid]
    ribs: list[np.ndarray]  # (N, 3) centrelines
    rib_radius: float
    midline_x: float
    spine_y: float
    diaphragm_z: float


@dataclass
class Patient:
    index: int
    sex: str
    dominance: str
    frame: HeartFrame
    aorta_centre: np.ndarray
    ostia: dict[str, np.ndarray]  # "left" / "right" → (3,)
    trees: dict[str, list[Branch]]  # "left" / "right" → branches (index 0 is the trunk)
    thorax: Thorax
    stenoses: list[dict]


def make_patient(index: int, rng: np.random.Generator) -> Patient:
    """Draw one patient: heart, both coronary trees with SYNTAX labels, thorax."""
    sex = "female" if rng.random() < 0.5 else "male"
    dominance = str(rng.choice(list(DOMINANCE_PREVALENCE), p=list(DOMINANCE_PREVALENCE.values())))
    size = 0.94 if sex == "female" else 1.0
    frame = HeartFrame.create(
        azimuth_deg=rng.normal(45.0, 7.0),
        tilt_deg=rng.normal(30.0, 6.0),
        length=rng.normal(88.0, 6.0) * size,
        radius=rng.normal(50.0, 3.5) * size,
    )
    angles = {
        "aiv": rng.normal(40.0, 6.0),
        "piv": rng.normal(-130.0, 7.0),
        "acute": rng.normal(-78.0, 6.0),
        "rca0": rng.normal(-8.0, 6.0),
    }
    tortuosity = float(np.exp(rng.normal(0.0, 0.35)))
    dscale = (FEMALE_DIAMETER_SCALE if sex == "female" else 1.0) * rng.normal(1.0, 0.06)

    # Aortic root: above the base, anterior-right of the ring's centre. Ostia sit on its wall.
    aorta = frame.base_centre - 0.22 * frame.length * frame.axis + 14.0 * frame.radial(np.radians(-20.0))
    bif = frame.surface(-0.07, np.radians(angles["aiv"] + 22.0))
    lm_length = float(np.clip(rng.normal(10.5, 3.0), 5.0, 16.0))
    ostium_l = bif - lm_length * _unit(bif - aorta)
    rca_entry = frame.surface(-0.06, np.radians(angles["rca0"]))
    ostium_r = rca_entry - float(np.clip(rng.normal(12.0, 3.0), 6.0, 18.0)) * _unit(rca_entry - aorta)

    left = _left_tree(TreeBuilder(frame, rng, tortuosity, dscale), dominance, angles, ostium_l, bif)
    right = _right_tree(TreeBuilder(frame, rng, tortuosity, dscale), dominance, angles, ostium_r, rca_entry)
    stenoses = _add_stenoses(rng, {"left": left, "right": right})
    return Patient(
        index=index,
        sex=sex,
        dominance=dominance,
        frame=frame,
        aorta_centre=aorta,
        ostia={"left": ostium_l, "right": ostium_r},
        trees={"left": left, "right": right},
        thorax=_thorax(rng, frame),
        stenoses=stenoses,
    )


def _left_tree(b: TreeBuilder, dominance: str, ang: dict, ostium: np.ndarray, bif: np.ndarray) -> list[Branch]:
    rng, aiv, piv = b.rng, ang["aiv"], ang["piv"]
    crux = 360.0 + piv  # the LCx reaches the crux going the long way round (θ increasing)

    lm = b.add("LM", b.bent_line(ostium, bif, rng.normal(0, 1.5)), [(0, 4.5), (1, 4.3)], L["left_main"])
    lm_end = len(b.branches[lm].points) - 1
    s_b, th_b = -0.07, aiv + 22.0

    # LAD down the anterior interventricular groove to (or around) the apex.
    f_d1, f_d2 = rng.uniform(0.14, 0.28), rng.uniform(0.40, 0.58)
    f_mid_end = max(f_d2, 0.5)
    lad_pts, lad_st = b.surface_curve(
        [
            (s_b, th_b),
            (0.04, aiv + 8.0),
            (0.30, aiv + rng.normal(0, 4)),
            (0.65, aiv + rng.normal(0, 6)),
            (rng.uniform(0.92, APEX_LIMIT), aiv + rng.normal(0, 8)),
        ],
        _lad_profile,
    )
    lad = b.add(
        "LAD", lad_pts, [(0, 3.7), (f_d1, 3.1), (0.5, 2.4), (0.8, 1.9), (1, 1.0)],
        lambda f: np.where(f < f_d1, L["lad_proximal"], np.where(f < f_mid_end, L["lad_mid"], L["lad_distal"])),
        parent=lm, origin_index=lm_end, surface=lad_st,
    )

    # Diagonals toward the lateral wall.
    d1 = b.child("D1", lad, f_d1, [(0.18, 30.0), (rng.uniform(0.35, 0.55), rng.uniform(50, 75))],
                 [(0, 2.3), (1, 1.0)], L["diagonal_1"])
    if rng.random() < 0.35:
        b.child("D1a", d1, rng.uniform(0.3, 0.6), [(0.12, 25.0), (rng.uniform(0.2, 0.35), rng.uniform(35, 55))],
                [(0, 1.5), (1, 0.9)], L["diagonal_1a"])
    if rng.random() < 0.85:
        d2 = b.child("D2", lad, f_d2, [(0.15, 25.0), (rng.uniform(0.25, 0.4), rng.uniform(40, 60))],
                     [(0, 1.9), (1, 1.0)], L["diagonal_2"])
        if rng.random() < 0.2:
            b.child("D2a", d2, rng.uniform(0.3, 0.6), [(0.1, 20.0), (rng.uniform(0.15, 0.3), rng.uniform(30, 45))],
                    [(0, 1.3), (1, 0.9)], L["diagonal_2a"])

    # Ramus intermedius (trifurcation) in about a fifth of patients.
    if rng.random() < 0.22:
        pts, st = b.surface_curve([(s_b, th_b), (0.06, aiv + 32.0), (rng.uniform(0.5, 0.7), aiv + rng.uniform(45, 62))])
        b.add("ramus", pts, [(0, 2.3), (1, 1.0)], L["intermediate"], parent=lm, origin_index=lm_end, surface=st)

    # LCx in the left AV groove; how far it runs depends on dominance.
    lcx_end = {"right": rng.normal(172.0, 12.0), "co": crux - rng.uniform(15, 25), "left": crux}[dominance]
    om1 = rng.normal(112.0, 8.0)
    lcx_pts, lcx_st = b.surface_curve(
        [
            (s_b, th_b),
            (-0.02, aiv + 42.0),
            (0.0, om1),
            (0.01, 0.5 * (om1 + lcx_end)),
            (0.02 if dominance != "right" else rng.uniform(0.02, 0.15), lcx_end),
        ]
    )
    lcx_diam = {
        "right": [(0, 3.4), (0.45, 2.8), (1, 1.5)],
        "co": [(0, 3.8), (0.45, 3.1), (1, 2.0)],
        "left": [(0, 4.2), (0.45, 3.5), (0.85, 2.7), (1, 2.3)],
    }[dominance]
    lcx_tmp = b.add("LCx", lcx_pts, lcx_diam, L["lcx_proximal"], parent=lm, origin_index=lm_end, surface=lcx_st)
    i_om1 = b.index_at_theta(lcx_tmp, om1, increasing=True)
    n_lcx = len(lcx_pts)
    b.branches[lcx_tmp].labels = np.where(np.arange(n_lcx) < i_om1, L["lcx_proximal"], L["lcx_distal"]).astype(np.uint8)

    # Obtuse marginals down the lateral wall.
    b.child("OM1", lcx_tmp, i_om1 / (n_lcx - 1), [(0.25, 4.0), (rng.uniform(0.55, 0.8), rng.uniform(5, 22))],
            [(0, 2.4), (1, 1.0)], L["om_1"])
    om2 = om1 + rng.uniform(25, 45)
    if rng.random() < 0.7 and om2 < lcx_end - 8:
        i_om2 = b.index_at_theta(lcx_tmp, om2, increasing=True)
        b.child("OM2", lcx_tmp, i_om2 / (n_lcx - 1), [(0.2, 4.0), (rng.uniform(0.45, 0.7), rng.uniform(5, 20))],
                [(0, 2.0), (1, 1.0)], L["om_2"])

    # Posterolateral branches and the PDA from a dominant circumflex.
    if dominance in ("left", "co"):
        th_lpl = crux - rng.uniform(22, 35)
        i = b.index_at_theta(lcx_tmp, th_lpl, increasing=True)
        b.child("LPL", lcx_tmp, i / (n_lcx - 1), [(0.2, -4.0), (rng.uniform(0.4, 0.6), -rng.uniform(5, 15))],
                [(0, 2.0), (1, 1.0)], L["lpl"])
        if dominance == "left":
            for name, slug, p in (("LPLa", "lpl_a", 0.6), ("LPLb", "lpl_b", 0.35)):
                if rng.random() < p:
                    th = th_lpl + rng.uniform(6, 16) * (1 if slug == "lpl_a" else 2)
                    j = b.index_at_theta(lcx_tmp, min(th, crux - 3), increasing=True)
                    b.child(name, lcx_tmp, j / (n_lcx - 1), [(rng.uniform(0.3, 0.5), -rng.uniform(3, 10))],
                            [(0, 1.6), (1, 0.9)], L[slug])
            b.child("LPDA", lcx_tmp, 1.0, [(0.3, 2.0), (rng.uniform(0.65, 0.85), rng.uniform(-4, 6))],
                    [(0, 2.1), (1, 1.0)], L["lpda"])

    _add_septals(b, lad, rng)
    _add_twigs(b, rng, ("LAD", "LAD", "LCx", "D1", "OM1", "OM2", "D2", "ramus", "LPL"), n=rng.integers(4, 10))
    return b.branches


def _right_tree(b: TreeBuilder, dominance: str, ang: dict, ostium: np.ndarray, entry: np.ndarray) -> list[Branch]:
    rng, piv, acute, rca0 = b.rng, ang["piv"], ang["acute"], ang["rca0"]
    end = piv if dominance in ("right", "co") else acute - rng.uniform(15, 35)
    lead = b.bent_line(ostium, entry, rng.normal(0, 2.0))
    ring, ring_st = b.surface_curve(
        [(-0.06, rca0), (-0.01, rca0 - 22.0), (0.02, acute), (0.0, 0.5 * (acute + min(end, acute - 10))), (0.0, end)],
        _rca_profile,
    )
    pts = np.concatenate([lead, ring[1:]])
    st = np.concatenate([np.repeat(ring_st[:1], len(lead), axis=0), ring_st[1:]])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    i_acute = int(np.nonzero(np.degrees(st[:, 1]) <= acute)[0][0]) if (np.degrees(st[:, 1]) <= acute).any() else len(pts) - 1
    f_acute = arc[i_acute] / arc[-1]
    diam = {
        "right": [(0, 3.9), (f_acute, 3.4), (1, 3.0)],
        "co": [(0, 3.4), (f_acute, 2.8), (1, 2.4)],
        "left": [(0, 2.8), (f_acute, 1.9), (1, 1.5)],
    }[dominance]
    # SYNTAX: 1 = ostium → half-way to the acute margin, 2 → acute margin, 3 → crux.
    rca = b.add(
        "RCA", pts, diam,
        lambda f: np.where(f < 0.5 * f_acute, L["rca_proximal"], np.where(f < f_acute, L["rca_mid"], L["rca_distal"])),
        surface=st,
    )
    n = len(pts)
    # Conus branch and acute marginals (right-ventricular branches) carry their RCA segment's label.
    if rng.random() < 0.5:
        i = len(lead) + int(rng.uniform(4, 16) / 0.5)  # within the first 1–2 cm of the ring
        _child_with_parent_label(b, "conus", rca, i / (n - 1), [(0.05, 25.0), (0.12, rng.uniform(35, 50))], [(0, 1.3), (1, 0.9)])
    for rel, p in ((0.6, 0.75), (0.95, 0.5)):
        if rng.random() < p:
            _child_with_parent_label(b, "RV", rca, min(rel * f_acute, 0.9),
                                     [(rng.uniform(0.35, 0.6), rng.uniform(-4, 12))], [(0, 1.6), (1, 0.9)])
    if dominance in ("right", "co"):
        b.child("PDA", rca, 1.0, [(0.3, 2.0), (rng.uniform(0.6, 0.85), rng.uniform(-3, 8))], [(0, 2.1), (1, 1.0)], L["rpda"])
        if dominance == "right" or rng.random() < 0.3:
            far = rng.uniform(35, 55) if dominance == "right" else rng.uniform(12, 20)
            plb = b.child("PLB", rca, 1.0, [(0.02, -15.0), (0.06, -far)], [(0, 2.4), (1, 1.3)], L["rplb"])
            for name, slug, frac, p in (("PLa", "rplb_a", 0.3, 0.8), ("PLb", "rplb_b", 0.6, 0.6), ("PLc", "rplb_c", 0.88, 0.35)):
                if rng.random() < p:
                    b.child(name, plb, frac, [(rng.uniform(0.3, 0.5), -rng.uniform(5, 15))], [(0, 1.6), (1, 0.9)], L[slug])
    _add_twigs(b, rng, ("RCA", "RCA", "PDA", "PLB"), n=rng.integers(2, 6))
    return b.branches


def _child_with_parent_label(b: TreeBuilder, name, parent, at_fraction, ctrl_rel, diameters) -> int:
    p = b.branches[parent]
    idx = int(np.clip(round(at_fraction * (len(p.points) - 1)), 1, len(p.points) - 2))
    return b.child(name, parent, at_fraction, ctrl_rel, diameters, int(p.labels[idx]))


def _add_twigs(b: TreeBuilder, rng: np.random.Generator, parents: tuple[str, ...], n: int) -> None:
    """Small unnamed side branches (labelled with their parent segment): real trees have many."""
    names = {br.name: i for i, br in enumerate(b.branches)}
    pool = [names[p] for p in parents if p in names]
    for _ in range(int(n)):
        parent = int(rng.choice(pool))
        frac = rng.uniform(0.2, 0.85)
        side = rng.choice([-1.0, 1.0])
        _child_with_parent_label(
            b, "twig", parent, frac, [(rng.uniform(0.12, 0.25), side * rng.uniform(12, 28))], [(0, 1.3), (1, 0.85)]
        )


def _add_septals(b: TreeBuilder, lad: int, rng: np.random.Generator) -> None:
    """Septal perforators: short straight branches diving from the LAD into the septum."""
    p = b.branches[lad]
    for _ in range(int(rng.integers(1, 4))):
        idx = int(rng.uniform(0.12, 0.6) * (len(p.points) - 1))
        s0, th0 = p.surface[idx]
        direction = _unit(-b.frame.radial(th0) + rng.uniform(0.4, 0.9) * b.frame.axis)
        end = p.points[idx] + rng.uniform(12.0, 25.0) * direction
        pts = b.bent_line(p.points[idx], end, rng.normal(0, 1.0))
        b.add("septal", pts, [(0, 1.2), (1, 0.85)], int(p.labels[idx]), parent=lad, origin_index=idx)


def _add_stenoses(rng: np.random.Generator, trees: dict[str, list[Branch]]) -> list[dict]:
    """Focal narrowings (30–70% diameter) on major branches: most angiograms show some."""
    majors = [(system, i) for system, tree in trees.items() for i, br in enumerate(tree)
              if br.name in ("LAD", "LCx", "RCA", "D1", "OM1", "PDA", "LM")]
    found = []
    for _ in range(int(rng.poisson(0.9))):
        system, i = majors[int(rng.integers(len(majors)))]
        br = trees[system][i]
        arc = br.arc
        centre = rng.uniform(0.1, 0.7) * arc[-1]
        half = rng.uniform(1.5, 5.0)
        severity = rng.uniform(0.3, 0.7)
        br.diameters = br.diameters * (1.0 - severity * np.exp(-(((arc - centre) / half) ** 2)))
        found.append({"system": system, "branch": br.name, "at_mm": round(float(centre), 1), "severity": round(float(severity), 2)})
    return found


# ---------------------------------------------------------------------------------------------
# Thorax


def _thorax(rng: np.random.Generator, frame: HeartFrame) -> Thorax:
    midline = -rng.normal(28.0, 8.0)  # the heart sits left of the midline
    spine_y = rng.normal(95.0, 8.0)  # vertebral bodies behind the heart
    dia_r = rng.normal(-48.0, 10.0)  # dome tops (z), the right one higher (liver)
    dia_l = dia_r - rng.uniform(5.0, 20.0)
    body = Ellipsoid.aligned([midline, spine_y - 62.0, 0.0], [rng.normal(150, 10), rng.normal(112, 8), 450.0])
    # Lungs lie lateral and posterior to the heart (which displaces the left one: cardiac notch).
    lungs = [
        Ellipsoid.aligned([midline + side * rng.normal(off, 5), spine_y - 35.0, dz + 125.0], [rng.normal(60, 4), 72.0, 125.0])
        for side, dz, off in ((-1.0, dia_r, 88.0), (1.0, dia_l, 100.0))
    ]
    heart_rot = np.stack([frame.axis, frame.e1, frame.e2], axis=1)
    heart = Ellipsoid(np.zeros(3), np.array([0.62 * frame.length, frame.radius * 1.1, frame.radius * 1.05]), heart_rot)
    gas = None
    if rng.random() < 0.5:
        gas = Ellipsoid.aligned([midline + rng.normal(85, 10), spine_y - 60.0, dia_l - rng.uniform(35, 55)],
                                [rng.uniform(25, 40), 28.0, rng.uniform(10, 16)])
    vertebrae, pedicles = [], []
    z = 230.0 + rng.uniform(0, 27)
    while z > -260.0:
        x = midline + rng.normal(0, 1.5)
        height = rng.normal(11.5, 0.6) + max(0.0, -z) * 0.01  # lower vertebrae are taller
        vertebrae.append(Cylinder(np.array([x, spine_y, z]), np.array([rng.normal(20, 1), 15.0]), height))
        for side in (-1.0, 1.0):
            pedicles.append(Ellipsoid.aligned([x + side * 14.0, spine_y + 22.0, z + 3.0], [5.0, 9.0, 7.0]))
        z -= 2 * height + rng.normal(5.0, 0.6)  # disc space
    ribs = []
    ax, by = body.semi_axes[0] - 14.0, body.semi_axes[1] - 14.0
    for k in range(12):
        z0 = 215.0 - 26.0 * k + rng.normal(0, 2)
        psi = np.linspace(0.0, rng.uniform(2.1, 2.45), 90)
        drop = (65.0 + 4.0 * k) * (psi / psi[-1]) ** 1.6 - 8.0 * np.sin(np.minimum(psi * 1.8, np.pi))
        for side in (-1.0, 1.0):
            x = midline + side * (18.0 + ax * np.sin(psi))
            y = (spine_y - 62.0) + by * np.cos(psi) + 12.0 * np.exp(-psi * 3)
            ribs.append(np.stack([x, y, z0 - drop], axis=1))
    return Thorax(body, lungs, heart, gas, vertebrae, pedicles, ribs, float(rng.normal(5.5, 0.4)),
                  float(midline), float(spine_y), float(dia_r))


def catheter_path(patient: Patient, system: str, rng: np.random.Generator) -> np.ndarray:
    """Centreline (N, 3) of a Judkins-style catheter: engaged in the ostium, back up the
    ascending aorta, over the arch and down the descending aorta beside the spine (femoral
    access), sampled every STEP_MM."""
    ostium = patient.ostia[system]
    aorta = patient.aorta_centre
    th = patient.thorax
    up = _unit(np.array([-0.25, -0.15, 1.0]))  # ascending aorta: up, a little right and anterior
    ctrl = np.array(
        [
            ostium,
            aorta + 0.4 * (ostium - aorta) + 8.0 * up,
            aorta + rng.uniform(35, 50) * up + np.array([rng.normal(-6, 3), 0.0, 0.0]),
            [th.midline_x + rng.normal(0, 5), 0.5 * (aorta[1] + th.spine_y), aorta[2] + rng.uniform(85, 100)],
            [th.midline_x + 22.0, th.spine_y - 28.0, aorta[2] + rng.uniform(40, 55)],
            [th.midline_x + 20.0, th.spine_y - 30.0, aorta[2] - 80.0],
            [th.midline_x + 16.0, th.spine_y - 30.0, aorta[2] - 400.0],
        ]
    )
    gaps = np.maximum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1), 1e-3)
    knots = np.concatenate([[0.0], np.cumsum(gaps)])
    dense = _natural_cubic(knots, ctrl, np.linspace(0.0, knots[-1], int(knots[-1] / 0.25)))
    return _resample(dense)[0]
