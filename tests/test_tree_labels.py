"""Tree-aware labelling on a hand-built tree whose answer is known."""

from __future__ import annotations

import numpy as np

from angioexp.postprocess.tree_labels import label_tree

CATEGORIES = [1, 2, 3, 26]  # rca_proximal, rca_mid, rca_distal, catheter → class indices 1..4
PROX, MID, DIST, CATH = 1, 2, 3, 4


def _probs(assign: np.ndarray) -> np.ndarray:
    """One-hot-ish probabilities (0.7 on the assigned class, the rest shared) from a class map."""
    k = len(CATEGORIES) + 1
    probs = np.full((k, *assign.shape), 0.3 / (k - 1))
    for c in range(k):
        probs[c][assign == c] = 0.7
    return probs


def _tree():
    """Catheter at the left, a horizontal vessel from it with a side branch going down at x = 30."""
    assign = np.zeros((48, 64), dtype=np.int64)
    assign[19:22, 0:5] = CATH
    assign[19:22, 5:30] = MID  # the piece at the ostium: mid (deliberately)
    assign[19:22, 30:58] = PROX  # further out but named more proximal: impossible
    assign[19:22, 44:47] = DIST  # per-pixel noise inside that piece
    assign[22:44, 29:32] = DIST  # the side branch
    return assign


def test_one_label_per_branch_and_proximal_to_distal_order():
    assign = _tree()
    out = label_tree(_probs(assign), CATEGORIES)
    assert (out[assign == CATH] == CATH).all()  # the catheter is left alone
    assert (out[assign == 0] == 0).all()  # nothing is added outside the predicted vessels
    assert (out[19:22, 8:26] == MID).all()
    # The outer piece cannot be more proximal than the piece between it and the ostium: it takes
    # "mid", and its noisy pixels follow the branch vote.
    assert (out[19:22, 34:55] == MID).all()
    assert (out[26:42, 29:32] == DIST).all()


def test_pixels_keep_their_labels_without_a_tree():
    empty = np.zeros((16, 16), dtype=np.int64)
    assert (label_tree(_probs(empty), CATEGORIES) == 0).all()
    only_catheter = empty.copy()
    only_catheter[4, :] = CATH
    assert (label_tree(_probs(only_catheter), CATEGORIES) == only_catheter).all()


def test_root_without_catheter_is_the_most_confident_root_segment():
    assign = _tree()
    assign[assign == CATH] = 0
    out = label_tree(_probs(assign), CATEGORIES)
    # Without a catheter the ostium is the branch voted most confidently "proximal RCA": the
    # outer piece; walking from there, the inner piece (mid) and the side branch keep their names.
    assert (out[19:22, 34:55] == PROX).all()
    assert (out[19:22, 8:26] == MID).all()
