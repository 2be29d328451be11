"""The generator's fast paths give what the general code they replace gives: separable linear
upsampling vs ``scipy.ndimage.zoom``, PCHIP and the natural cubic spline vs scipy's, the one-pass inner raster, the sparse
blur and the field-of-view prefilter. (Their speed is a bench figure: ``angioexp.bench.data``.)"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.interpolate import CubicSpline, PchipInterpolator

from angioexp.data.synthetic.anatomy import _natural_cubic, _pchip, make_patient
from angioexp.data.synthetic.projection import CArm
from angioexp.data.synthetic.raster import Tube2D, rasterize, zoom_linear
from angioexp.data.synthetic.render import _blur3, _blur3_sparse, _maybe_in_view


@pytest.mark.parametrize("factor, shape_in", [(4, (32, 32)), (2, (64, 48)), (6, (13, 15))])
def test_zoom_linear_matches_ndimage_zoom(factor, shape_in):
    image = np.random.default_rng(factor).standard_normal(shape_in).astype(np.float32)
    crop = (shape_in[0] * factor - 3, shape_in[1] * factor - 1)
    for grid_mode, kwargs in ((True, {"mode": "nearest", "grid_mode": True}), (False, {"prefilter": False})):
        expected = ndi.zoom(image, factor, order=1, **kwargs)[: crop[0], : crop[1]]
        got = zoom_linear(image, factor, crop, grid_mode=grid_mode)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pchip_matches_scipy_including_flat_and_turning_points():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        for _ in range(50):
            x = np.concatenate([[0.0], np.cumsum(rng.uniform(0.1, 20.0, n - 1))])
            y = rng.normal(size=(n, 2))
            y[rng.random(n) < 0.25] = 0.0  # zero slopes and sign changes
            at = np.linspace(0.0, x[-1], 101)
            np.testing.assert_allclose(_pchip(x, y, at), PchipInterpolator(x, y)(at), atol=1e-12)


def test_natural_cubic_matches_scipy():
    rng = np.random.default_rng(1)
    for n in (3, 4, 7):
        x = np.concatenate([[0.0], np.cumsum(rng.uniform(1.0, 80.0, n - 1))])
        y = rng.normal(0, 50, size=(n, 3))
        at = np.linspace(0.0, x[-1], 333)
        expected = CubicSpline(x, y, bc_type="natural")(at)
        np.testing.assert_allclose(_natural_cubic(x, y, at), expected, atol=1e-9 * np.abs(y).max())


def test_inner_raster_of_one_pass_equals_a_separate_raster_of_the_inner_radius():
    rng = np.random.default_rng(1)
    tubes = []
    for _ in range(3):
        n = 12
        col, row = np.cumsum(rng.uniform(2, 6, n)) + 10, np.cumsum(rng.normal(0, 3, n)) + 50
        tubes.append(Tube2D(col, row, rng.uniform(2, 5, n), rng.uniform(0.5, 1.5, n)))
    both = rasterize(tubes, (100, 100), inner_fraction=0.7, with_inner=True)
    outer = rasterize(tubes, (100, 100))
    inner = rasterize([Tube2D(t.col, t.row, 0.7 * t.radius, t.weight) for t in tubes], (100, 100))
    np.testing.assert_allclose(both.value, outer.value, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(both.inner, inner.value, rtol=1e-4, atol=1e-5)
    assert both.inner.max() > 0 and (both.inner <= both.value + 1e-5).all()


def test_sparse_blur_equals_the_full_blur():
    layer = np.zeros((64, 64), np.float32)
    layer[10:14, 20:40] = 1.0
    layer[0, 63] = 2.0  # touching the border: edge handling must stay the same
    for passes in (1, 2):
        np.testing.assert_allclose(_blur3_sparse(layer, passes), _blur3(layer.copy(), passes), atol=1e-7)
    assert not _blur3_sparse(np.zeros((8, 8), np.float32)).any()


def test_field_of_view_prefilter_keeps_exactly_the_solids_with_a_shadow_box():
    patient = make_patient(0, np.random.default_rng(0))
    shift = np.array([5.0, -3.0, 12.0])
    counts = []
    for primary, secondary in ((0.0, 0.0), (45.0, 25.0), (-30.0, -25.0), (90.0, 0.0)):
        carm = CArm(primary, secondary, 1000.0, 190.0, 128)
        for solids in (patient.thorax.vertebrae, patient.thorax.pedicles):
            kept = _maybe_in_view(carm, solids, shift)
            with_box = [s for s in solids if carm.bbox(s.moved(shift).corners()) is not None]
            assert [id(s) for s in kept] == [id(s) for s in with_box]
            counts.append((len(kept), len(solids)))
    assert any(k > 0 for k, _ in counts) and all(k < n for k, n in counts)  # part of the spine is seen

