"""Boxes from masks (SAM3 conventions), box jitter and box_chance, and C-arm view classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from angioexp.losses.box_ops import masks_to_boxes
from angioexp.prompts.boxes import (
    box_from_mask,
    cxcywh_normalised_from_mask,
    jitter_box,
    normalise_xyxy,
    sample_box_prompt,
    xyxy_to_cxcywh,
)
from angioexp.prompts.views import (
    NUM_VIEWS,
    UNKNOWN_VIEW,
    VIEW_CLASSES,
    view_class,
    view_classes,
    view_name,
    view_name_of,
)

# ---------------------------------------------------------------------------------------------
# Boxes


def test_box_from_mask_matches_the_loss_side_convention():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((20, 30)) > 0.97
        assert np.array_equal(box_from_mask(m), masks_to_boxes(torch.from_numpy(m)[None])[0].numpy())


def test_thin_vertical_vessel_has_a_one_pixel_wide_box():
    m = np.zeros((10, 20), bool)
    m[2:8, 7] = True
    assert box_from_mask(m).tolist() == [7, 2, 8, 8]
    assert cxcywh_normalised_from_mask(m).tolist() == pytest.approx([7.5 / 20, 0.5, 1 / 20, 6 / 10], rel=1e-6)


def test_empty_mask_has_no_box():
    assert box_from_mask(np.zeros((4, 4), bool)) is None
    assert cxcywh_normalised_from_mask(np.zeros((4, 4), bool)) is None
    assert sample_box_prompt(np.zeros((4, 4), bool), np.random.default_rng(0), box_chance=1.0) is None


def test_box_format_conversions():
    box = np.array([10, 20, 30, 60], np.float32)
    assert normalise_xyxy(box, 100, 50).tolist() == pytest.approx([0.2, 0.2, 0.6, 0.6])
    assert xyxy_to_cxcywh(box).tolist() == [20, 40, 20, 40]


def test_jitter_follows_sam3_noise_box():
    box = np.array([10, 10, 50, 30], np.float32)
    assert np.array_equal(jitter_box(box, (64, 64), np.random.default_rng(0), noise_std=0.0), box)
    jittered = np.stack([jitter_box(box, (64, 64), np.random.default_rng(s), noise_std=0.1) for s in range(500)])
    noise = jittered - box
    # std relative to the box side: 0.1·40 = 4 px on x, 0.1·20 = 2 px on y (before image clipping)
    assert 3.4 < noise[:, 0].std() < 4.6 and 1.7 < noise[:, 1].std() < 2.3
    capped = np.stack([jitter_box(box, (64, 64), np.random.default_rng(s), noise_std=0.5, noise_max=3) for s in range(100)])
    assert np.abs(capped - box).max() <= 3 + 1e-5
    clipped = np.stack([jitter_box(box, (40, 52), np.random.default_rng(s), noise_std=1.0) for s in range(100)])
    assert clipped.min() >= 0 and clipped[:, [0, 2]].max() <= 52 and clipped[:, [1, 3]].max() <= 40


def test_collapsed_jitter_keeps_the_original_box():
    box = np.array([10, 10, 11, 30], np.float32)  # one pixel wide
    out = [jitter_box(box, (64, 64), np.random.default_rng(s), noise_std=2.0, min_box_area=0.0) for s in range(50)]
    for b in out:
        assert (b[2] - b[0]) * (b[3] - b[1]) > 0


def test_box_chance_is_a_probability_and_deterministic():
    m = np.zeros((32, 32), bool)
    m[4:20, 10:12] = True
    rng = np.random.default_rng(0)
    got = [sample_box_prompt(m, rng, box_chance=0.3) is not None for _ in range(2000)]
    assert 0.26 < np.mean(got) < 0.34
    a = [sample_box_prompt(m, np.random.default_rng(7), box_chance=0.5, noise_std=0.1) for _ in range(3)]
    b = [sample_box_prompt(m, np.random.default_rng(7), box_chance=0.5, noise_std=0.1) for _ in range(3)]
    assert all((x is None and y is None) or np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="box_chance"):
        sample_box_prompt(m, rng, box_chance=1.5)
    with pytest.raises(ValueError, match="box_noise_std"):
        jitter_box(np.array([0, 0, 1, 1.0]), (4, 4), rng, noise_std=-1)


# ---------------------------------------------------------------------------------------------
# Views


@pytest.mark.parametrize(
    "primary,secondary,name",
    [
        (-30, -25, "RAO_CAU"),
        (-30, 30, "RAO_CRA"),
        (-30, 0, "RAO"),
        (0, 35, "AP_CRA"),
        (0, 25, "AP_CRA"),
        (0, -20, "AP_CAU"),
        (2, 0, "AP"),
        (45, 25, "LAO_CRA"),
        (50, -25, "LAO_CAU"),  # the spider view
        (40, 0, "LAO"),
        (90, 0, "LATERAL"),
        (-90, 5, "LATERAL"),
    ],
)
def test_standard_projections_get_their_view(primary, secondary, name):
    assert view_name(primary, secondary) == name
    assert VIEW_CLASSES[view_class(primary, secondary)].name == name


def test_view_classes_are_consistent():
    assert NUM_VIEWS == len(VIEW_CLASSES) == 10
    assert [v.index for v in VIEW_CLASSES] == list(range(NUM_VIEWS))
    assert len({v.name for v in VIEW_CLASSES}) == NUM_VIEWS
    # every angle pair on a grid lands in a valid class
    for p in range(-180, 181, 5):
        for s in range(-90, 91, 5):
            assert 0 <= view_class(p, s) < NUM_VIEWS


@pytest.mark.parametrize("primary,secondary", [(None, 10), (30, None), (float("nan"), 0), (0, float("nan")), ("", 3), (np.nan, np.nan)])
def test_missing_angles_give_unknown(primary, secondary):
    assert view_class(primary, secondary) == UNKNOWN_VIEW
    assert view_name(primary, secondary) == "unknown"


def test_out_of_range_angles_are_an_error():
    with pytest.raises(ValueError, match="out of range"):
        view_class(200, 0)
    with pytest.raises(ValueError, match="out of range"):
        view_class(0, -120)


def test_vectorised_and_index_names():
    assert view_classes([-30, 50, None], [-25, -25, 0]).tolist() == [0, 6, -1]
    assert view_name_of(6) == "LAO_CAU" and view_name_of(-1) == "unknown"
    with pytest.raises(ValueError):
        view_name_of(NUM_VIEWS)
