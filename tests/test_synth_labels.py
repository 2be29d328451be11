"""The pseudo-label error model: calibrated Dice, errors that differ from draw to draw."""

from __future__ import annotations

import numpy as np
import pytest

from angioexp.data.synthetic.anatomy import make_patient
from angioexp.data.synthetic.labels import (
    PseudoLabelModel,
    case_dice_target,
    clean_and_segments,
    dice,
    pseudo_label,
)
from angioexp.data.synthetic.render import RenderKnobs, render_case


@pytest.fixture(scope="module")
def frame():
    patient = make_patient(0, np.random.default_rng(42))
    knobs = RenderKnobs(shutter_prob=0.0, circle_prob=0.0)
    rc = render_case(patient, "left", -30.0, -25.0, 256, 1, np.random.default_rng(5), knobs)
    clean, segments, cath = clean_and_segments(rc.sdf, rc.owner, rc.capsules, rc.catheter, rc.visible)
    return rc, clean, segments


def _pseudo(frame, seed, model=PseudoLabelModel(), target=None):
    rc, clean, _ = frame
    return pseudo_label(clean, rc.sdf, rc.owner, rc.capsules, rc.parents, rc.catheter_arc,
                        np.random.default_rng(seed), model, rc.margin, target=target)


@pytest.mark.parametrize("target", [0.7, 0.8, 0.9])
def test_each_draw_hits_its_dice_target(frame, target):
    _, clean, _ = frame
    for seed in range(4):
        mask, info = _pseudo(frame, seed, target=target)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert dice(mask.astype(bool), clean) == pytest.approx(info["dice"])
        assert abs(info["dice"] - target) < 0.02


def test_errors_differ_between_draws(frame):
    """Not the same branches every time: a student can learn what the teacher misses."""
    _, clean, _ = frame
    missed = []
    for seed in range(6):
        mask, info = _pseudo(frame, seed, target=0.8)
        missed.append(clean & ~mask.astype(bool))
    overlaps = [
        np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1)
        for i, a in enumerate(missed) for b in missed[i + 1:]
    ]
    assert np.mean(overlaps) < 0.5
    # Every pixel of the tree is kept by at least one draw.
    kept_somewhere = np.any([clean & ~m for m in missed], axis=0)
    assert np.count_nonzero(kept_somewhere) > 0.97 * np.count_nonzero(clean)


def test_error_kinds_follow_the_knobs(frame):
    none = PseudoLabelModel(miss_prob=0.0, gap_rate=0.0, blob_rate=0.0, catheter_prob=0.0)
    _, info = _pseudo(frame, 1, none, target=0.8)
    assert info["errors"] == {}  # only boundary jitter / width bias left
    catheter = PseudoLabelModel(miss_prob=0.0, gap_rate=0.0, blob_rate=0.0, catheter_prob=1.0)
    rc, clean, _ = frame
    mask, info = _pseudo(frame, 1, catheter, target=0.75)
    assert info["errors"].get("catheter") == 1
    assert np.count_nonzero(mask.astype(bool) & rc.catheter & ~clean) > 0


def test_target_one_returns_the_clean_mask(frame):
    _, clean, _ = frame
    mask, info = _pseudo(frame, 3, PseudoLabelModel(target_dice=1.0))
    assert np.array_equal(mask.astype(bool), clean) and info["dice"] == 1.0


def test_case_targets_average_to_the_dataset_target():
    model = PseudoLabelModel(target_dice=0.83, dice_spread=0.04)
    targets = [case_dice_target(model, i) for i in range(20)]
    assert abs(np.mean(targets) - 0.83) < 0.005
    assert np.std(targets) > 0.02
