"""X-ray cine of one acquisition: Beer–Lambert line integrals, quantum + detector noise, blur.

Attenuation (dimensionless line integrals ∫μ dl) is the sum of

* a static body: soft tissue of the thorax, air in the lungs (which the heart displaces), a
  gastric gas bubble, vertebrae (cortical shell + marrow) with pedicles, ribs (hollow tubes),
  the diaphragm as the lungs' lower edge, a catheter whose wall is radiopaque;
* iodine: the vessel layer (mm of opacified lumen along each ray, from the tube sweep) times
  the bolus curve, moved by cardiac/respiratory motion; the catheter lumen, always partly
  filled with contrast and fuller during the injection.

Photon counts follow exp(−attenuation); quantum noise is Poisson (variance = counts, applied
in the log domain to first order, which is accurate at the tens-to-thousands of quanta per pixel
of a cine), detector electronic noise adds a constant variance, and the scintillator's blur
correlates both. The log image is then shown the way cath-lab processing does: a large-kernel
dynamic-range compression (so lungs and spine do not eat the grey scale), a fixed window per
run and a gamma — vessels dark on a brighter background.

Units: μ in 1/mm at an effective ~60 keV. Soft tissue ≈ water (0.020/mm); diluted iodinated
contrast in a coronary lumen 0.13–0.24/mm, so a 3 mm artery attenuates by 30–50% and a 1 mm
branch by 10–20%, the contrast range of real cine angiograms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from angioexp.data.synthetic.anatomy import Branch, Patient, catheter_path
from angioexp.data.synthetic.labels import MIN_MASK_RADIUS_PX, CapsuleTable, smooth_noise
from angioexp.data.synthetic.motion import plan_bolus, plan_motion, splat
from angioexp.data.synthetic.projection import CArm, RayGrid
from angioexp.data.synthetic.raster import (
    KEY_ID_BITS,
    NO_KEY,
    Raster,
    Tube2D,
    rasterize,
    resample_polyline,
    zoom_linear,
)

# Linear attenuation (1/mm) at an effective energy of ~60 keV, relative to water-like tissue.
MU_TISSUE = 0.020
LUNG_AIR_FRACTION = 0.65  # inflated lung (blood and tissue in it included)
MU_BONE_EXTRA = 0.012  # marrow/trabecular bone over tissue
MU_CORTEX_EXTRA = 0.03  # cortical bone over tissue
RIB_FLATNESS = 0.5  # a rib is a flat bone: ~half the bone of a round tube of its width
MU_CATHETER_WALL = 0.03  # braided catheter wall over blood
CATHETER_RADIUS_MM = 1.0  # 6 F outer diameter = 2 mm
CATHETER_LUMEN_MM = 0.7
MAX_OBLIQUITY = 4.0  # cap of 1/sin φ: finite segments and curvature bound the path length
MAX_LOG_NOISE = 0.25  # cap of the per-pixel log-image noise std (before the detector blur)
KEY_MARGIN_512 = 5.0  # px beyond the vessel wall where the signed distance is exact (at 512²)


@dataclass(frozen=True)
class RenderKnobs:
    """Acquisition and image knobs (ranges are drawn uniformly per case)."""

    fov_mm: tuple[float, float] = (165.0, 215.0)  # detector field of view (tree fills most of it)
    sid_mm: tuple[float, float] = (950.0, 1100.0)
    iodine_mu_per_mm: tuple[float, float] = (0.13, 0.24)  # opacified blood
    quanta_512: tuple[float, float] = (250.0, 900.0)  # detected quanta per 512²-pixel, median background
    electronic_noise: float = 0.25  # detector noise std relative to √(quanta at the median)
    drc_strength: tuple[float, float] = (0.45, 0.75)  # dynamic-range compression of the log image
    gamma: tuple[float, float] = (0.8, 1.25)
    shutter_prob: float = 0.4  # straight collimator shutters at the image edges
    circle_prob: float = 0.15  # circular image-intensifier field
    pan_fraction: float = 0.06  # random table pan (fraction of the field) around the tree's centre


@dataclass
class RenderedCase:
    frames: np.ndarray  # (T, H, W) uint8 (0–255) or uint16 (12-bit, 0–4095) display values
    frame_index: int
    sdf: np.ndarray  # (H, W) float32 signed distance to the vessel tubes, px (annotated frame)
    owner: np.ndarray  # (H, W) int32 capsule id (−1 none)
    capsules: CapsuleTable
    parents: list[tuple[int, float]]  # per branch (parent index, arc on parent mm)
    catheter: np.ndarray  # (H, W) bool catheter silhouette
    catheter_arc: np.ndarray  # (H, W) float32 mm from the catheter tip (inf off it)
    visible: np.ndarray  # (H, W) bool: inside the collimated field
    margin: float
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Geometry → tubes


def _tangents(points: np.ndarray) -> np.ndarray:
    t = np.gradient(points, axis=-2)
    return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-9)


def _project_tube(carm: CArm, points: np.ndarray, radius_mm: np.ndarray, shift: np.ndarray, tangents=None):
    """Project a 3D tube (points (N, 3), or (M, N, 3) for M tubes at once; several tubes
    concatenated need their own ``tangents``); returns col, row, radius px, weight (mm of lumen
    per px of chord)."""
    pts = points + shift
    col, row, mag = carm.project(pts)
    radius = radius_mm * mag / carm.pixel_mm
    sin_phi = carm.sin_to_rays(pts, _tangents(pts) if tangents is None else tangents)
    weight = (carm.pixel_mm / mag) / np.maximum(sin_phi, 1.0 / MAX_OBLIQUITY)
    return col, row, radius, weight


def _vessel_tubes(carm: CArm, tree: list[Branch], shift: np.ndarray):
    """Tubes for the raster and the capsule table behind the ownership ids."""
    tubes: list[Tube2D] = []
    cols = {k: [] for k in ("branch", "label", "arc_mm", "diameter_mm", "path_mm")}
    next_id = 0
    starts = []
    for br in tree:
        start = 0
        if br.parent >= 0:
            # Skip the stretch still inside the parent's lumen: no double iodine at take-offs.
            r_parent = 0.5 * tree[br.parent].diameters[br.origin_index]
            away = np.linalg.norm(br.points - br.points[0], axis=1) > 0.8 * r_parent
            start = int(np.argmax(away)) if away.any() else len(br.points) - 1
        starts.append(start)
    kept = [b for b, br in enumerate(tree) if len(br.points) - starts[b] >= 2]
    # One projection for the whole tree: per-branch calls were dominated by call overhead.
    projected = _project_tube(
        carm,
        np.concatenate([tree[b].points[starts[b]:] for b in kept]),
        np.concatenate([0.5 * tree[b].diameters[starts[b]:] for b in kept]),
        shift,
        tangents=np.concatenate([_tangents(tree[b].points[starts[b]:]) for b in kept]),
    )
    bounds = np.cumsum([len(tree[b].points) - starts[b] for b in kept])[:-1]
    for b, col, row, radius, weight in zip(kept, *(np.split(v, bounds) for v in projected)):
        br, start = tree[b], starts[b]
        arc = br.arc
        step = np.clip(1.5 * radius, 1.0, 6.0)  # capsule length: curvature error < 0.2 px
        at = resample_polyline(col, row, step)
        if len(at) < 2:
            continue
        idx = np.arange(len(col), dtype=float)
        c, r = np.interp(at, idx, col), np.interp(at, idx, row)
        rad, w = np.interp(at, idx, radius), np.interp(at, idx, weight)
        a_mm = np.interp(at, idx, arc[start:])
        diam = np.interp(at, idx, br.diameters[start:])
        lab = br.labels[start:][np.clip(np.rint(at).astype(int), 0, len(col) - 1)]
        n_caps = len(at) - 1
        ids = np.arange(next_id, next_id + n_caps)
        next_id += n_caps
        tubes.append(Tube2D(c, r, rad, w, np.maximum(rad, MIN_MASK_RADIUS_PX), ids))
        mid = lambda v: 0.5 * (v[1:] + v[:-1])  # noqa: E731 - capsule midpoints
        cols["branch"].append(np.full(n_caps, b, np.int32))
        cols["label"].append(lab[:-1])
        cols["arc_mm"].append(mid(a_mm).astype(np.float32))
        cols["diameter_mm"].append(mid(diam).astype(np.float32))
        cols["path_mm"].append((br.path_mm + mid(a_mm)).astype(np.float32))
    table = CapsuleTable(**{k: np.concatenate(v) for k, v in cols.items()})
    return tubes, table


def _centering_shift(carm: CArm, tree: list[Branch], rng: np.random.Generator, pan: float) -> np.ndarray:
    """Table pan (3D shift) that centres the tree's shadow, plus a random offset."""
    pts = np.concatenate([br.points for br in tree])
    col, row, _ = carm.project(pts)
    centre = (carm.size - 1) / 2.0
    dc = 0.5 * (col.min() + col.max()) - centre + rng.normal(0, pan * carm.size)
    dr = 0.5 * (row.min() + row.max()) - centre + rng.normal(0, pan * carm.size)
    return -(dc * carm.col_axis + dr * carm.row_axis) * carm.iso_pixel_mm


# ---------------------------------------------------------------------------------------------
# Static body


def _body_attenuation(carm: CArm, patient: Patient, shift: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Static anatomy, rendered on a coarser grid and upsampled: it is smooth at the pixel
    scale (and soft-edged in real images: scatter, focal spot), so this costs ~1/16."""
    factor = max(1, min(4, carm.size // 128))
    lo = CArm(carm.primary_deg, carm.secondary_deg, carm.sid_mm, carm.fov_mm, carm.size // factor, carm.sod_mm)
    size = lo.size
    grid = RayGrid(lo)
    att = np.zeros((size, size), np.float32)
    th = patient.thorax

    def add(solid, coeff, texture=None):
        box, chord = grid.chord(solid.moved(shift))
        if box is not None:
            r0, r1, c0, c1 = box
            att[r0:r1, c0:c1] += coeff * chord * (1.0 if texture is None else texture[r0:r1, c0:c1])

    add(th.body, MU_TISSUE)
    heart = th.heart.moved(shift)
    add(th.heart, 0.06 * MU_TISSUE)  # blood-filled chambers are slightly denser than fat/muscle
    # Lung markings (vessels, septa): a mottled texture over the air.
    cell = max(2, int(round(5.0 / lo.iso_pixel_mm)))
    texture = ndi.gaussian_filter(smooth_noise(rng, (size, size), cell), 0.8 * cell)
    texture = 1.0 + 0.05 * texture / max(float(texture.std()), 1e-6)
    for lung in th.lungs:
        box, t0, t1 = grid.interval(lung.moved(shift))
        if box is None:
            continue
        _, h0, h1 = grid.interval(heart, box)
        overlap = np.maximum(np.minimum(t1, h1) - np.maximum(t0, h0), 0.0) * (h1 > h0)
        r0, r1, c0, c1 = box
        att[r0:r1, c0:c1] -= LUNG_AIR_FRACTION * MU_TISSUE * ((t1 - t0) - overlap) * texture[r0:r1, c0:c1]
    if th.gas_bubble is not None:
        add(th.gas_bubble, -0.6 * MU_TISSUE)
    # Most of the spine lies outside the field: skip those solids with one projection of all
    # their corners instead of one bounding-box test each.
    for vb in _maybe_in_view(lo, th.vertebrae, shift):
        add(vb, MU_BONE_EXTRA + 0.8 * MU_CORTEX_EXTRA)
        add(vb.shrunk(2.0, 1.5), -0.8 * MU_CORTEX_EXTRA)  # ~2 mm cortex, denser endplates
    for ped in _maybe_in_view(lo, th.pedicles, shift):
        add(ped, MU_BONE_EXTRA + 0.3 * MU_CORTEX_EXTRA)

    # Ribs: bone tubes with a cortical shell (outer minus inner, each a per-rib maximum: the
    # maximum of a hollow profile would favour the capsule whose axis is farther), one pass.
    ribs = []
    centrelines = np.stack(th.ribs)  # every rib has the same number of points: project at once
    projected = _project_tube(lo, centrelines, np.full(centrelines.shape[:2], th.rib_radius), shift)
    for col, row, radius, weight in zip(*projected):
        reach = float(radius.max())
        if col.max() < -reach or col.min() > size + reach or row.max() < -reach or row.min() > size + reach:
            continue
        # Capsules one radius long: a rib bends over ~10 cm, so the chords' sagitta is < 0.1 px.
        at = resample_polyline(col, row, max(1.0, float(radius.mean())))
        idx = np.arange(len(col), dtype=float)
        c, r, rad, w = (np.interp(at, idx, v) for v in (col, row, radius, weight))
        ribs.append(Tube2D(c, r, rad, w))
    if ribs:
        bone = rasterize(ribs, (size, size), inner_fraction=0.72, with_inner=True)
        att += (RIB_FLATNESS * (MU_BONE_EXTRA + MU_CORTEX_EXTRA)) * bone.value
        att -= (RIB_FLATNESS * MU_CORTEX_EXTRA) * bone.inner
    # Scatter and the focal spot soften every anatomical edge by a few mm.
    att = ndi.gaussian_filter(att, 1.5 / lo.iso_pixel_mm, mode="nearest")
    if factor == 1:
        return att
    return zoom_linear(att, factor, (carm.size, carm.size), grid_mode=True)


def _maybe_in_view(carm: CArm, solids: list, shift: np.ndarray) -> list:
    """The solids whose shadow's bounding box (as in ``CArm.bbox``) can touch the image."""
    if not solids:
        return []
    col, row, _ = carm.project(np.stack([solid.corners() for solid in solids]) + shift)
    edge = carm.size + 1.0  # CArm.bbox pads by 1 px
    keep = (col.max(axis=1) > -2.0) & (col.min(axis=1) < edge) & (row.max(axis=1) > -2.0) & (row.min(axis=1) < edge)
    return [solid for solid, k in zip(solids, keep) if k]


def _catheter(carm: CArm, patient: Patient, system: str, shift: np.ndarray, rng: np.random.Generator):
    """Catheter wall attenuation, lumen (mm), silhouette and per-pixel distance from the tip."""
    path = catheter_path(patient, system, rng)
    col, row, radius, weight = _project_tube(carm, path, np.full(len(path), CATHETER_RADIUS_MM), shift)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    at = resample_polyline(col, row, np.clip(0.8 * radius, 0.5, 3.0))
    idx = np.arange(len(col), dtype=float)
    c, r, rad, w = (np.interp(at, idx, v) for v in (col, row, radius, weight))
    a_mm = np.interp(at, idx, arc)
    size = carm.size
    lumen_frac = CATHETER_LUMEN_MM / CATHETER_RADIUS_MM
    ids = np.arange(len(at) - 1)
    tube = Tube2D(c, r, rad, w, np.maximum(rad, MIN_MASK_RADIUS_PX), ids)
    wall = rasterize(
        [tube], (size, size), inner_fraction=lumen_frac, inner_weight=1.0, with_inner=True, with_key=True, margin=0.0
    )
    lumen = wall.inner
    # With no margin, a pixel has a key exactly where it lies inside the catheter.
    silhouette = wall.key != NO_KEY
    tip_mm = np.full((size, size), np.inf, np.float32)
    mids = 0.5 * (a_mm[1:] + a_mm[:-1])
    tip_mm[silhouette] = mids[wall.key[silhouette] & ((1 << KEY_ID_BITS) - 1)]
    return MU_CATHETER_WALL * wall.value, lumen, silhouette, tip_mm


def _collimation(size: int, rng: np.random.Generator, knobs: RenderKnobs) -> tuple[np.ndarray, np.ndarray]:
    """Extra attenuation of shutters / a circular field, and the visible-field mask."""
    pixel = np.arange(size, dtype=np.float32)
    yy, xx = pixel[:, None], pixel[None, :]  # broadcast: no full coordinate grids
    blocked = np.zeros((size, size), np.float32)  # 0 in the field, → 1 under a shutter
    soft = max(size / 512.0, 0.5)
    if rng.random() < knobs.circle_prob:
        c = (size - 1) / 2.0
        radius = size * rng.uniform(0.5, 0.62)
        blocked = np.maximum(blocked, np.clip((np.hypot(xx - c, yy - c) - radius) / (2 * soft) + 0.5, 0, 1))
    if rng.random() < knobs.shutter_prob:
        for edge in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
            width = size * rng.uniform(0.01, 0.08)
            coord = {0: xx, 1: yy, 2: size - 1 - xx, 3: size - 1 - yy}[int(edge)]
            blocked = np.maximum(blocked, np.clip((width - coord) / (2 * soft) + 0.5, 0, 1))
    return 4.0 * blocked, blocked < 0.5


def _drc_field(att: np.ndarray, sigma_px: float, strength: float) -> np.ndarray:
    """Low-pass of the log image (computed on a 4× coarser grid): what DRC subtracts."""
    size = att.shape[0]
    f = 4 if size >= 256 else 2
    # f×f mean pooling as sums of strided slices: ~10× faster than a mean over axes (1, 3).
    rows = sum(att[i::f] for i in range(f))
    coarse = sum(rows[:, j::f] for j in range(f)) / (f * f)
    low = ndi.gaussian_filter(coarse, sigma_px / f, mode="nearest")
    up = zoom_linear(low, f, (size, size), grid_mode=True)
    return strength * (up - np.median(low))  # a constant: the display window absorbs it anyway


def _blur3(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable [¼ ½ ¼] blur (scintillator / focal spot); edge rows/columns kept."""
    for _ in range(passes):
        out = img * 0.5
        out[1:-1] += 0.25 * img[:-2]
        out[1:-1] += 0.25 * img[2:]
        out[0] += 0.5 * img[0]
        out[-1] += 0.5 * img[-1]
        img = out * 0.5
        img[:, 1:-1] += 0.25 * out[:, :-2]
        img[:, 1:-1] += 0.25 * out[:, 2:]
        img[:, 0] += 0.5 * out[:, 0]
        img[:, -1] += 0.5 * out[:, -1]
    return img


def _blur3_sparse(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """:func:`_blur3` of a layer that is zero outside a small region (vessels, catheter): only
    its bounding box (plus the blur's reach) is filtered; the result is the same."""
    rows, cols = np.nonzero(img.any(axis=1))[0], np.nonzero(img.any(axis=0))[0]
    if not len(rows):
        return img.copy()
    pad = passes + 1
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, img.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, img.shape[1])
    out = np.zeros_like(img)
    out[r0:r1, c0:c1] = _blur3(img[r0:r1, c0:c1], passes)
    return out


# ---------------------------------------------------------------------------------------------
# One acquisition


def render_case(
    patient: Patient,
    system: str,
    primary_deg: float,
    secondary_deg: float,
    size: int,
    frames: int,
    rng: np.random.Generator,
    knobs: RenderKnobs,
    dtype: str = "uint8",
) -> RenderedCase:
    """Render one injection of ``system`` ("left"/"right") at the given C-arm angles: a cine of
    ``frames`` frames (``dtype`` uint8 0–255 or uint16 12-bit) plus everything the labels need,
    all in the geometry of the annotated (peak-opacification) frame."""
    carm = CArm(primary_deg, secondary_deg, rng.uniform(*knobs.sid_mm), rng.uniform(*knobs.fov_mm), size)
    tree = patient.trees[system]
    shift = _centering_shift(carm, tree, rng, knobs.pan_fraction)
    margin = KEY_MARGIN_512 * max(1.0, size / 512.0)

    # Vessels: rendered once, in the annotated frame's geometry.
    tubes, capsules = _vessel_tubes(carm, tree, shift)
    raster: Raster = rasterize(tubes, (size, size), margin=margin, with_key=True)
    sdf, owner = raster.signed_distance(), raster.owner()
    blur_passes = max(1, int(round(size / 512.0)))
    # mm of opacified lumen along each ray, seen through the detector's blur (focal spot + MTF).
    iodine = _blur3_sparse(raster.value, blur_passes)

    body = _body_attenuation(carm, patient, shift, rng)
    cath_wall, cath_lumen, cath_mask, cath_arc = _catheter(carm, patient, system, shift, rng)
    cath_wall, cath_lumen = _blur3_sparse(cath_wall, blur_passes), _blur3_sparse(cath_lumen, blur_passes)
    shutter, visible = _collimation(size, rng, knobs)
    static = (body + cath_wall + shutter).ravel()

    # Bolus and motion. Delays follow the path from the ostium to each pixel's vessel point.
    lit = np.flatnonzero(iodine.ravel() > 1e-4)
    lit_val = iodine.ravel()[lit]
    own = owner.ravel()[lit]
    lit_path = np.where(own >= 0, capsules.path_mm[np.maximum(own, 0)], 0.0).astype(np.float32)
    bolus, frame_index = plan_bolus(frames, rng, lit_val, lit_path)
    lit_delay = (lit_path * bolus.frames_per_mm).astype(np.float32)
    heart_px = carm.project(patient.frame.base_centre[None] * 0.3 + shift)[:2]  # between base and centre
    motion = plan_motion(frames, frame_index, rng, carm.magnification / carm.pixel_mm, (heart_px[0][0], heart_px[1][0]))

    mu_iodine = rng.uniform(*knobs.iodine_mu_per_mm)
    quanta = rng.uniform(*knobs.quanta_512) * (512.0 / size) ** 2
    sigma_e2 = (knobs.electronic_noise**2) * quanta
    ref = float(np.median(static))
    drc = _drc_field(static.reshape(size, size), 22.0 / carm.iso_pixel_mm, rng.uniform(*knobs.drc_strength)).ravel()

    def catheter_fill(t: int) -> float:
        return 0.5 + 0.5 * float(bolus.opacification(t, np.zeros(1, np.float32))[0])

    lit_rows, lit_cols = np.divmod(lit, size)
    lit_rows, lit_cols = lit_rows.astype(np.float32), lit_cols.astype(np.float32)

    def iodine_at(t: int) -> np.ndarray:
        """Flat (H·W,) mm of opacified lumen in frame t (moved by the heart)."""
        values = lit_val * bolus.opacification(t, lit_delay)
        if t == frame_index:
            layer = np.zeros(size * size, np.float32)
            layer[lit] = values
            return layer
        cols, rows = motion.forward(t, lit_cols, lit_rows)
        return splat(values, cols, rows, size)

    cath_idx = np.flatnonzero(cath_lumen.ravel() > 1e-4)
    cath_val = cath_lumen.ravel()[cath_idx]

    def attenuation(t: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat attenuation of frame t, and the pixels where iodine changes it."""
        layer = iodine_at(t)
        changed = np.concatenate([np.flatnonzero(layer), cath_idx])  # repeats are harmless
        layer *= mu_iodine
        layer += static
        layer[cath_idx] += (mu_iodine * catheter_fill(t)) * cath_val
        return layer, changed

    def log_noise_std(att: np.ndarray) -> np.ndarray:
        """Std of the log image: Poisson counts N (variance N) + detector noise σe²."""
        counts = np.exp(ref - att)
        counts *= quanta
        std = counts + sigma_e2
        np.sqrt(std, out=std)
        std /= counts
        # Capped where almost nothing gets through (shutters): the log of a few quanta is
        # bounded, and first-order noise would overshoot there.
        return np.minimum(std, MAX_LOG_NOISE, out=std)

    # One window for the whole run, from the noise-free annotated frame (as a cath lab does).
    peak = attenuation(frame_index)
    peak_display = (peak[0] - drc).reshape(size, size)
    inside = peak_display[visible] if visible.any() else peak_display.ravel()
    lo, hi = np.percentile(inside, [0.5, 99.7])
    hi = hi + 0.1 * (hi - lo)  # keep the darkest vessel cores just off black
    # Display LUT (gamma) applied to a 4096-level quantisation: cheaper than a per-pixel power.
    gamma = rng.uniform(*knobs.gamma)
    top = 255 if dtype == "uint8" else 4095
    lut = np.rint(top * np.linspace(0.0, 1.0, 4096) ** gamma).astype(dtype)
    k = 4095.0 / (hi - lo)
    level_offset = ((hi + drc) * k).astype(np.float32)  # level = (hi − (att + noise − drc))·k
    # Static pixels' noise once per run (a single frame computes its own in one pass).
    std_static = log_noise_std(static).astype(np.float32) if frames > 1 else None
    unit = np.float32(np.sqrt(12.0))

    out = np.empty((frames, size, size), dtype)
    for t in range(frames):
        att, changed = (peak[0].copy(), peak[1]) if t == frame_index else attenuation(t)
        if std_static is None:
            std = log_noise_std(att).astype(np.float32)
        else:
            std = std_static.copy()
            std[changed] = log_noise_std(att[changed])
        # Quantum + detector noise in the log domain (exact to first order in 1/√N), correlated
        # by the scintillator blur. Uniform variates with unit variance: the blur sums nine of
        # them, which makes the result Gaussian (and is 3× cheaper than normal variates).
        noise = rng.random((size, size), dtype=np.float32)
        noise -= 0.5
        noise *= unit
        noise = _blur3(noise, blur_passes).ravel()
        noise *= std
        att += noise
        att *= -k
        att += level_offset
        np.clip(att, 0.0, 4095.0, out=att)
        out[t] = lut[att.astype(np.int32)].reshape(size, size)

    return RenderedCase(
        frames=out,
        frame_index=frame_index,
        sdf=sdf,
        owner=owner,
        capsules=capsules,
        parents=[(br.parent, float(tree[br.parent].arc[br.origin_index]) if br.parent >= 0 else 0.0) for br in tree],
        catheter=cath_mask,
        catheter_arc=cath_arc,
        visible=visible,
        margin=margin,
        info={
            "sid_mm": round(carm.sid_mm, 1),
            "fov_mm": round(carm.fov_mm, 1),
            "iso_pixel_mm": carm.iso_pixel_mm,
            "heart_rate_bpm": round(motion.heart_rate_bpm, 1),
            "iodine_mu_per_mm": round(float(mu_iodine), 4),
            "quanta_per_pixel": round(float(quanta), 1),
        },
    )
