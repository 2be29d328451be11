"""Synthetic generator building blocks: C-arm projection, analytic chords, tube sweep, motion,
bolus timing and the 3D anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from angioexp.data.synthetic.anatomy import make_patient
from angioexp.data.synthetic.motion import Bolus, plan_bolus, plan_motion, splat
from angioexp.data.synthetic.projection import CArm, Cylinder, Ellipsoid, RayGrid, STANDARD_VIEWS
from angioexp.data.synthetic.raster import Tube2D, rasterize
from angioexp.segments import BY_LABEL, BY_SLUG


def test_isocentre_projects_to_the_centre_with_sid_over_sod_magnification():
    carm = CArm(30.0, 20.0, sid_mm=1000.0, fov_mm=200.0, size=512)
    col, row, mag = carm.project(np.zeros((1, 3)))
    assert col[0] == pytest.approx(255.5) and row[0] == pytest.approx(255.5)
    assert mag[0] == pytest.approx(1000.0 / 750.0)
    assert carm.iso_pixel_mm == pytest.approx(200.0 / 512 * 750.0 / 1000.0)
    # Axes are orthonormal for any angle pair.
    axes = np.stack([carm.col_axis, carm.row_axis, carm.beam])
    assert np.allclose(axes @ axes.T, np.eye(3), atol=1e-12)


def test_view_orientation_follows_the_cath_lab_convention():
    left_of_patient = np.array([[50.0, 0.0, 0.0]])
    head = np.array([[0.0, 0.0, 50.0]])
    spine = np.array([[0.0, 90.0, 0.0]])
    ap = CArm(0.0, 0.0, 1000.0, 200.0, 512)
    assert ap.project(left_of_patient)[0][0] > 255.5  # patient's left on the image right
    assert ap.project(head)[1][0] < 255.5  # head up
    lao = CArm(45.0, 0.0, 1000.0, 200.0, 512)
    rao = CArm(-30.0, 0.0, 1000.0, 200.0, 512)
    assert lao.project(spine)[0][0] > 255.5  # LAO: spine on the image right
    assert rao.project(spine)[0][0] < 255.5  # RAO: spine on the image left
    # Objects nearer the source are magnified more.
    near = ap.project(np.array([[10.0, 100.0, 0.0]]))[2][0]
    far = ap.project(np.array([[10.0, -100.0, 0.0]]))[2][0]
    assert near > far


def test_chords_through_solids_are_exact():
    carm = CArm(20.0, -10.0, 1000.0, 60.0, 64)
    grid = RayGrid(carm)
    sphere = Ellipsoid.aligned([0.0, 0.0, 0.0], [20.0, 20.0, 20.0])
    box, chord = grid.chord(sphere)
    r0, r1, c0, c1 = box
    full = np.zeros((64, 64), np.float32)
    full[r0:r1, c0:c1] = chord
    # The central ray passes through the centre (between the 4 middle pixels): chord ≈ 2R.
    assert full[31:33, 31:33].max() == pytest.approx(40.0, abs=0.3)
    # A ray at distance d from the centre crosses 2·√(R² − d²).
    dirs = grid.dirs[40, 32]
    d = np.linalg.norm(np.cross(-grid.source, dirs))
    assert full[40, 32] == pytest.approx(2 * np.sqrt(400.0 - d * d), rel=1e-3)
    # An upright cylinder seen from the side (AP) is crossed over its full depth near the middle.
    cyl = Cylinder(np.zeros(3), np.array([20.0, 15.0]), 10.0)
    _, t0, t1 = grid.interval(cyl, (0, 64, 0, 64))
    ap_grid = RayGrid(CArm(0.0, 0.0, 1000.0, 60.0, 64))
    _, a0, a1 = ap_grid.interval(cyl, (0, 64, 0, 64))
    assert (a1 - a0)[31:33, 31:33].max() == pytest.approx(30.0, abs=0.2)
    assert (t1 - t0).max() > 0 and ((t1 - t0) >= 0).all()


def _tube(x0, x1, y, radius, n=2, weight=1.0):
    xs = np.linspace(x0, x1, n)
    return Tube2D(xs, np.full(n, y), np.full(n, radius), np.full(n, weight))


def test_tube_cross_section_integrates_to_its_area():
    raster = rasterize([_tube(10.0, 90.0, 50.3, 6.0, n=40)], (100, 100))
    column = raster.value[:, 50]
    assert column.sum() == pytest.approx(np.pi * 36.0, rel=0.02)
    assert column.max() == pytest.approx(2 * np.sqrt(36.0 - 0.3**2), rel=1e-3)


def test_capsules_of_one_tube_do_not_double_count_but_tubes_add_up():
    one = rasterize([_tube(10.0, 90.0, 50.0, 4.0, n=2)], (100, 100)).value
    many = rasterize([_tube(10.0, 90.0, 50.0, 4.0, n=37)], (100, 100)).value
    assert np.allclose(one, many, atol=1e-4)
    crossing = Tube2D(np.full(2, 50.0), np.array([10.0, 90.0]), np.full(2, 4.0), np.full(2, 1.0))
    both = rasterize([_tube(10.0, 90.0, 50.0, 4.0), crossing], (100, 100)).value
    assert both[50, 50] == pytest.approx(16.0, rel=1e-3)  # 8 + 8: overlaps are darker


def test_ownership_key_gives_signed_distance_and_deepest_owner():
    thick = _tube(10.0, 90.0, 50.0, 6.0)
    thick.capsule_ids = np.array([0])
    thin = Tube2D(np.full(2, 50.0), np.array([10.0, 90.0]), np.full(2, 1.5), np.full(2, 1.0), None, np.array([1]))
    raster = rasterize([thick, thin], (100, 100), margin=4.0, with_key=True)
    sdf, owner = raster.signed_distance(), raster.owner()
    assert sdf[50, 30] == pytest.approx(-6.0, abs=0.02)
    assert sdf[59, 30] == pytest.approx(3.0, abs=0.02)
    assert sdf[0, 0] == pytest.approx(4.0) and owner[0, 0] == -1  # beyond the margin
    assert owner[50, 50] == 0  # the crossing belongs to the tube it lies deepest in
    assert owner[20, 50] == 1


def test_splat_conserves_iodine_and_lands_where_the_point_moved():
    rng = np.random.default_rng(0)
    values = rng.random(200).astype(np.float32)
    cols, rows = rng.uniform(5, 59, 200), rng.uniform(5, 59, 200)
    assert splat(values, cols, rows, 64).sum() == pytest.approx(values.sum(), rel=1e-5)
    one = splat(np.array([2.0], np.float32), np.array([10.25]), np.array([20.5]), 64).reshape(64, 64)
    assert one[20, 10] == pytest.approx(2.0 * 0.75 * 0.5) and one[21, 11] == pytest.approx(2.0 * 0.25 * 0.5)
    # Whole pixels move without blurring; points leaving the image are dropped.
    assert splat(np.array([1.0], np.float32), np.array([3.0]), np.array([4.0]), 8).reshape(8, 8)[4, 3] == 1.0
    assert splat(np.array([1.0], np.float32), np.array([-5.0]), np.array([4.0]), 8).sum() == 0.0


def test_motion_is_identity_at_the_annotated_frame():
    rng = np.random.default_rng(1)
    motion = plan_motion(16, 6, rng, px_per_mm=3.0, centre=(250.0, 250.0))
    assert np.allclose(motion.scale[6], 1.0) and np.allclose(motion.shift[6], 0.0)
    moved = np.abs(motion.scale - 1.0).max() + np.abs(motion.shift).max()
    assert moved > 0.01  # the other frames do move


@pytest.mark.parametrize("frames", [1, 4, 16, 40])
def test_bolus_peaks_at_the_returned_frame(frames):
    rng = np.random.default_rng(frames)
    weights = rng.random(500).astype(np.float32)
    path = rng.uniform(0, 200, 500).astype(np.float32)
    bolus, peak = plan_bolus(frames, rng, weights, path)
    delay = path * bolus.frames_per_mm
    totals = [float(weights @ bolus.opacification(t, delay)) for t in range(frames)]
    assert peak == int(np.argmax(totals))
    if frames >= 4:
        assert 0 < peak < frames - 1  # wash-in before and wash-out after
        assert totals[0] < 0.5 * totals[peak]


def test_gamma_variate_is_one_at_peak():
    b = Bolus(10, 5.0, 3.0, 3.0, 0.0)
    assert b.opacification(5, np.zeros(1, np.float32))[0] == pytest.approx(1.0)
    assert b.opacification(1, np.zeros(1, np.float32))[0] == 0.0


def _labels(tree):
    return {int(v) for br in tree for v in np.unique(br.labels)}


def test_anatomy_has_syntax_segments_by_dominance():
    seen = {"right": 0, "left": 0, "co": 0}
    lm_diameters = []
    for i in range(60):
        p = make_patient(i, np.random.default_rng(1000 + i))
        seen[p.dominance] += 1
        left, right = _labels(p.trees["left"]), _labels(p.trees["right"])
        assert all(BY_LABEL[l].system == "left" for l in left)
        assert all(BY_LABEL[l].system == "right" for l in right)
        assert {5, 6, 7, 8, 9, 11, 13, 19} <= left  # LM, LAD 6–8, D1, LCx 11/13, OM1
        assert {1, 2} <= right
        if p.dominance == "right":
            assert {3, 4, 16} <= right and 15 not in left
        elif p.dominance == "left":
            assert 15 in left and 4 not in right and 14 in left
        else:
            assert 4 in right and 14 in left
        for tree in p.trees.values():
            for br in tree:
                # Tapering ~4.5 → 1 mm (focal stenoses may narrow a stretch further).
                # LM and RCA end where their continuations begin; every other branch tapers off.
                assert br.diameters[-1] >= 0.8 - 1e-6 and br.diameters.max() <= 6.0
                assert br.name in ("LM", "RCA") or br.diameters[-1] <= 2.6
                assert br.diameters.min() > 0.2
                gaps = np.linalg.norm(np.diff(br.points, axis=0), axis=1)
                assert 0.2 < gaps.min() and gaps.max() < 0.51  # sampled every ~0.5 mm
        assert p.trees["left"][0].name == "LM"
        lm_diameters.append(p.trees["left"][0].diameters.max())
    assert 3.9 < np.median(lm_diameters) < 4.9  # Dodge et al.: 4.5 ± 0.5 mm (women ~9% less)
    assert seen["right"] >= 0.6 * 60  # ~82% right-dominant (docs/design.md#synthetic-data)


def test_standard_views_cover_both_systems():
    systems = {v[0] for v in STANDARD_VIEWS.values()}
    assert systems == {"left", "right"}
    assert BY_SLUG["catheter"].label == 26
