"""Mask measures (Dice, clDice, Boundary IoU, tolerant IoU) and RLE checking, against
independent brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from scipy import ndimage

from angioexp.errors import InputError
from angioexp.evaluate import masks as M
from angioexp.evaluate.phantoms import random_vessel_tree, shift
from angioexp.evaluate.rle import check_rle, counts_from_string, decode, encode


def random_blobs(rng, shape=(48, 64), density=0.08):
    """Random smooth-ish blobs touching the frame edge now and then."""
    seeds = rng.random(shape) < density
    return ndimage.binary_dilation(seeds, iterations=int(rng.integers(0, 3)))


# --- morphology ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [0, 1, 2, 3, 5])
def test_dilate_and_band_match_distance_transform(d):
    rng = np.random.default_rng(d)
    for _ in range(6):
        mask = random_blobs(rng)
        mask[0, 5] = mask[-1, -1] = True  # pixels on the frame edge
        expected_dilation = ndimage.distance_transform_edt(~mask) <= d
        assert np.array_equal(M.dilate(mask, d), expected_dilation)
        # Inner band: mask pixels within max(d,1) of the background, frame outside = background.
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        assert np.array_equal(M.boundary_band(mask, d), mask & (depth <= max(d, 1)))


def test_empty_masks_stay_empty():
    empty = np.zeros((10, 12), bool)
    assert not M.dilate(empty, 3).any()
    assert not M.boundary_band(empty, 1).any()
    assert not M.skeleton(empty).any()


# --- Dice, clDice, Boundary IoU ----------------------------------------------------------------


def test_identical_disjoint_and_empty_conventions():
    a = np.zeros((30, 40), bool)
    a[5:10, 5:35] = True
    b = np.zeros_like(a)
    b[20:25, 5:35] = True
    empty = np.zeros_like(a)
    assert M.dice(a, a) == M.cldice(a, a) == M.boundary_iou(a, a, 1) == 1.0
    assert M.dice(a, b) == M.cldice(a, b) == M.boundary_iou(a, b, 1) == 0.0
    for fn in (M.dice, M.cldice, lambda p, g: M.boundary_iou(p, g, 1)):
        assert math.isnan(fn(empty, empty))  # nothing to score
        assert fn(a, empty) == 0.0 and fn(empty, a) == 0.0


def test_cldice_half_a_vessel():
    """A prediction covering the left half of a bar: topology precision 1, sensitivity ~1/2."""
    gt = np.zeros((30, 60), bool)
    gt[10:15, 5:55] = True
    pred = np.zeros_like(gt)
    pred[10:15, 5:30] = True
    gt_skel = M.skeleton(gt)
    t_sens = (gt_skel & pred).sum() / gt_skel.sum()
    assert 0.4 < t_sens < 0.6
    expected = 2 * 1.0 * t_sens / (1.0 + t_sens)
    assert M.cldice(pred, gt) == pytest.approx(expected)
    # Dice of the same pair weighs area: 2*125/(125+250) = 2/3, clDice weighs centreline.
    assert M.dice(pred, gt) == pytest.approx(2 / 3)


def test_cldice_forgives_width_errors_not_breaks():
    tree = random_vessel_tree(192, 3)
    thicker = ndimage.distance_transform_edt(~tree) <= 1
    rows = np.flatnonzero(tree.any(axis=1))
    middle = (rows[0] + rows[-1]) // 2
    broken = tree.copy()
    broken[middle - 5 : middle + 5] = False  # a gap across the whole tree
    assert M.cldice(thicker, tree) > 0.97  # width error: centrelines still inside each other
    assert M.cldice(broken, tree) < M.cldice(thicker, tree)


def brute_boundary_iou(pred, gt, d):
    """Cheng et al.'s definition written independently: bands from Euclidean erosion."""
    def band(m):
        eroded = ndimage.binary_erosion(np.pad(m, d), structure=M_disk(d))[d:-d, d:-d]
        return m & ~eroded
    bp, bg = band(pred), band(gt)
    return (bp & bg).sum() / (bp | bg).sum()


def M_disk(d):
    y, x = np.mgrid[-d : d + 1, -d : d + 1]
    return x * x + y * y <= d * d


@pytest.mark.parametrize("d", [1, 2, 3])
def test_boundary_iou_matches_reference(d):
    rng = np.random.default_rng(10 + d)
    for _ in range(5):
        gt = random_blobs(rng, density=0.03)
        pred = gt ^ (rng.random(gt.shape) < 0.03)
        if not gt.any() or not pred.any():
            continue
        assert M.boundary_iou(pred, gt, d) == pytest.approx(brute_boundary_iou(pred, gt, d))


def test_pair_scores_reuses_features():
    tree = random_vessel_tree(128, 5)
    moved = shift(tree, 0, 1)
    f_tree, f_moved = M.MaskFeatures.of(tree, 1), M.MaskFeatures.of(moved, 1)
    scores = M.pair_scores(moved, f_moved, tree, f_tree)
    assert scores["dice"] == pytest.approx(M.dice(moved, tree))
    assert scores["cldice"] == pytest.approx(M.cldice(moved, tree))
    assert scores["biou"] == pytest.approx(M.boundary_iou(moved, tree, 1))
    with pytest.raises(ValueError):
        M.pair_scores(moved, M.MaskFeatures.of(moved, 2), tree, f_tree)


# --- tolerant IoU ---------------------------------------------------------------------------------


def test_tolerant_iou_at_zero_is_coco_iou():
    rng = np.random.default_rng(0)
    preds = [random_blobs(rng) for _ in range(4)]
    gts = [random_blobs(rng) for _ in range(3)]
    crowd = [0, 1, 0]
    expected = mask_utils.iou(
        [mask_utils.encode(np.asfortranarray(p.astype(np.uint8))) for p in preds],
        [mask_utils.encode(np.asfortranarray(g.astype(np.uint8))) for g in gts],
        crowd,
    )
    assert np.allclose(M.tolerant_iou_matrix(preds, gts, 0, crowd), expected)


def test_tolerant_iou_forgives_exactly_d_pixels():
    tree = random_vessel_tree(160, 2)
    assert M.tolerant_iou(shift(tree, 0, 1), tree, 1) == pytest.approx(1.0)
    assert M.tolerant_iou(shift(tree, 1, 0), tree, 1) == pytest.approx(1.0)
    assert M.tolerant_iou(shift(tree, 0, 2), tree, 1) < 0.95  # beyond the tolerance
    assert M.tolerant_iou(shift(tree, 0, 2), tree, 2) == pytest.approx(1.0)
    # Never below the plain IoU; grows with d; symmetric for non-crowd truth.
    moved = shift(tree, 1, 2)
    values = [M.tolerant_iou(moved, tree, d) for d in range(4)]
    assert values == sorted(values)
    assert values[0] == pytest.approx(M.tolerant_iou(moved, tree, 0))
    assert M.tolerant_iou(moved, tree, 1) == pytest.approx(M.tolerant_iou(tree, moved, 1))


def test_tolerant_iou_crowd_and_empty():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[4:15, 5:10] = True  # sticks out by 1 px at the top
    crowd = M.tolerant_iou_matrix([pred], [gt], 1, [1])[0, 0]
    assert crowd == pytest.approx(1.0)  # every predicted pixel within 1 px of the crowd region
    assert M.tolerant_iou_matrix([np.zeros_like(gt)], [gt], 1)[0, 0] == 0.0
    assert M.tolerant_iou_matrix([], [gt], 1).shape == (0, 1)


# --- RLE ----------------------------------------------------------------------------------------


def test_counts_parser_matches_pycocotools():
    rng = np.random.default_rng(1)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        if trial % 10 == 0:
            mask[:] = trial % 20 == 0
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        flat = mask.ravel(order="F").astype(int)
        edges = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
        expected = ([0] if flat[0] == 1 else []) + list(runs)
        assert list(counts_from_string(rle["counts"])) == expected
        assert np.array_equal(decode(check_rle(encode(mask), h, w, where="x")), mask)


def test_uncompressed_rle_is_accepted():
    mask = np.zeros((6, 5), bool)
    mask[1:3, 2:4] = True
    flat = mask.ravel(order="F").astype(int)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = [int(v) for v in np.diff(np.concatenate([[0], edges, [flat.size]]))]
    checked = check_rle({"size": [6, 5], "counts": runs}, 6, 5, where="x")
    assert isinstance(checked["counts"], str)
    assert np.array_equal(decode(checked), mask)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ({"size": [8, 8], "counts": "0000"}, "runs cover 0 pixels"),
        ({"size": [8, 8], "counts": "zz"}, "alphabet"),
        ({"size": [8, 8], "counts": "P"}, "truncated"),
        ({"size": [8, 8], "counts": "0O"}, "negative"),
        ({"size": [8, 8], "counts": [10, 100]}, "runs cover 110"),
        ({"size": [8, 9], "counts": "<"}, "does not match"),
        ({"size": [8, 8], "counts": 5}, "string or a list"),
        ({"counts": "<"}, "'size' and 'counts'"),
        ([[1, 2, 3, 4, 5, 6]], "RLE object"),
    ],
)
def test_malformed_rle_is_an_input_error(segmentation, message):
    with pytest.raises(InputError, match=message) as info:
        check_rle(segmentation, 8, 8, where="prediction 3 (image_id 9)", file="preds.json")
    assert "prediction 3 (image_id 9)" in str(info.value) and "preds.json" in str(info.value)
