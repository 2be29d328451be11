"""Each of our loss terms and matchers equals SAM3's on the same random tensors.

Runs where the ``sam3`` package imports (the SAM3 suite: README, quick start);
skips with the reason elsewhere. SAM3's focal losses default to a Triton kernel; on CPU they are
called with ``triton=False`` (patched into its module), as docs/design.md#loss-terms notes.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.skips import SAM3_MISSING

sam3_loss_fns = pytest.importorskip("sam3.train.loss.loss_fns", reason=SAM3_MISSING)
sam3_matcher = pytest.importorskip("sam3.train.matcher", reason=SAM3_MISSING)
sam3_wrapper = pytest.importorskip("sam3.train.loss.sam3_loss", reason=SAM3_MISSING)

from angioexp.config import load_config  # noqa: E402
from angioexp.losses import (  # noqa: E402
    BinaryHungarianMatcherV2,
    BinaryOneToManyMatcher,
    Boxes,
    IABCEMdetr,
    Masks,
    SemanticSegCriterion,
    build_criterion,
)
from angioexp.losses.box_ops import box_cxcywh_to_xyxy, pad_packed  # noqa: E402

pytestmark = pytest.mark.sam3

B, Q = 4, 6
NUM_BOXES = torch.tensor([2, 0, 3, 1])  # one find query with an absent concept
N = int(NUM_BOXES.sum())


@pytest.fixture(autouse=True)
def _cpu_focal(monkeypatch):
    """SAM3's sigmoid_focal_loss without Triton (CPU)."""
    monkeypatch.setattr(sam3_loss_fns, "sigmoid_focal_loss", functools.partial(sam3_loss_fns.sigmoid_focal_loss, triton=False))


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=gen) * 0.3 + 0.02
    return torch.cat([centre, size], dim=1)


def _outputs(gen: torch.Generator, h: int = 12, with_masks: bool = True) -> dict:
    boxes = _random_boxes(B * Q, gen).view(B, Q, 4)
    out = {
        "pred_logits": torch.randn(B, Q, 1, generator=gen) * 2,
        "pred_boxes": boxes,
        "pred_boxes_xyxy": box_cxcywh_to_xyxy(boxes),
        "presence_logit_dec": torch.randn(B, 1, generator=gen),
    }
    if with_masks:
        out["pred_masks"] = torch.randn(B, Q, h, h, generator=gen) * 3
    return out


def _targets(gen: torch.Generator, size: int = 24) -> dict:
    boxes = _random_boxes(N, gen)
    masks = torch.rand(N, size, size, generator=gen) > 0.8
    return {
        "boxes": boxes,
        "boxes_xyxy": box_cxcywh_to_xyxy(boxes),
        "num_boxes": NUM_BOXES.clone(),
        "masks": masks,
    }


def _sam3_targets(ours: dict) -> dict:
    """SAM3's batched-target dict built from ours (padded copies, object ids, validity)."""
    t = dict(ours)
    t["boxes_padded"] = pad_packed(ours["boxes"], ours["num_boxes"])
    ids = torch.arange(N)
    t["object_ids_padded"] = pad_packed(ids[:, None].float(), ours["num_boxes"], pad_value=-1)[..., 0].long()
    t["is_valid_mask"] = torch.ones(N, dtype=torch.bool)
    t["is_exhaustive"] = torch.ones(B, dtype=torch.bool)
    return t


def _sam3_indices(sam3_indices):
    """SAM3 leaves tgt_idx None when it is the identity; make it explicit for comparison."""
    batch_idx, src_idx, tgt_idx = sam3_indices
    return batch_idx, src_idx, (torch.arange(len(src_idx)) if tgt_idx is None else tgt_idx)


def _assert_terms_equal(ours: dict, theirs: dict, keys, atol=1e-6, rtol=1e-5):
    for key in keys:
        assert key in ours and key in theirs, key
        torch.testing.assert_close(ours[key].float(), torch.as_tensor(theirs[key]).float(), atol=atol, rtol=rtol, msg=key)


# ---------------------------------------------------------------------------------------------
# Matchers


@pytest.mark.parametrize("focal,stable", [(True, False), (False, False), (True, True)])
def test_hungarian_matcher_equals_sam3(focal, stable):
    gen = torch.Generator().manual_seed(1)
    outputs, targets = _outputs(gen, with_masks=False), _targets(gen)
    kwargs = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal=focal, alpha=0.25, gamma=2.0, stable=stable)
    ours = BinaryHungarianMatcherV2(**kwargs)(outputs, targets)
    theirs = _sam3_indices(sam3_matcher.BinaryHungarianMatcherV2(**kwargs)(outputs, _sam3_targets(targets)))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert len(ours[0]) == N  # every target matched once (Q ≥ T everywhere)


def test_hungarian_matcher_more_targets_than_queries_equals_sam3():
    gen = torch.Generator().manual_seed(2)
    num_boxes = torch.tensor([5, 1])
    boxes = _random_boxes(6, gen)
    pred = _random_boxes(2 * 3, gen).view(2, 3, 4)
    outputs = {"pred_logits": torch.randn(2, 3, 1, generator=gen), "pred_boxes": pred}
    targets = {"boxes": boxes, "num_boxes": num_boxes, "boxes_padded": pad_packed(boxes, num_boxes)}
    ours = BinaryHungarianMatcherV2()(outputs, targets)
    theirs = sam3_matcher.BinaryHungarianMatcherV2(cost_class=2, cost_bbox=5, cost_giou=2, focal=True)(outputs, targets)
    as_set = lambda idx: {tuple(int(x) for x in triple) for triple in zip(*idx)}  # noqa: E731
    assert as_set(ours) == as_set(theirs)
    assert len(ours[0]) == 3 + 1


def test_one_to_many_matcher_equals_sam3():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _outputs(gen, with_masks=False), _targets(gen)
    # make some predictions overlap targets so that matches exist
    outputs["pred_boxes"][0, :3] = targets["boxes"][0] + 0.01
    ours = BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4)(outputs, targets)
    theirs = sam3_matcher.BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4)(outputs, _sam3_targets(targets))
    assert len(ours[0]) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Loss terms (on the indices of our matcher, handed to both sides)


def _indices(outputs, targets):
    return BinaryHungarianMatcherV2()(outputs, targets)


def test_boxes_equal_sam3():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _outputs(gen, with_masks=False), _targets(gen)
    indices = _indices(outputs, targets)
    num_boxes = torch.tensor(float(N))
    ours = Boxes()(outputs, targets, indices, num_boxes)
    theirs = sam3_loss_fns.Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}).get_loss(
        outputs, _sam3_targets(targets), indices, num_boxes
    )
    _assert_terms_equal(ours, theirs, Boxes.TERMS)


@pytest.mark.parametrize("use_presence,pos_focal,pad", [(True, False, None), (False, False, None), (True, True, 200)])
def test_iabce_equals_sam3(use_presence, pos_focal, pad):
    gen = torch.Generator().manual_seed(5)
    outputs, targets = _outputs(gen, with_masks=False), _targets(gen)
    indices = _indices(outputs, targets)
    num_boxes = torch.tensor(float(N))
    kwargs = dict(pos_weight=10.0, alpha=0.25, gamma=2.0, use_presence=use_presence, pos_focal=pos_focal, pad_n_queries=pad)
    ours = IABCEMdetr(**kwargs)(outputs, targets, indices, num_boxes)
    theirs = sam3_loss_fns.IABCEMdetr(weak_loss=False, weight_dict={"loss_ce": 20.0, "presence_loss": 20.0}, **kwargs).get_loss(
        outputs, _sam3_targets(targets), indices, num_boxes
    )
    _assert_terms_equal(ours, theirs, IABCEMdetr.TERMS)
    if use_presence:
        assert float(ours["presence_loss"]) > 0


@pytest.mark.parametrize("pred_size,resize", [(24, "targets_area"), (12, "predictions")])
def test_masks_dense_equal_sam3(pred_size, resize):
    """Same size: identical by construction; different sizes: SAM3 upsamples the logits."""
    gen = torch.Generator().manual_seed(6)
    outputs, targets = _outputs(gen, h=pred_size), _targets(gen, size=24)
    indices = _indices(outputs, targets)
    num_boxes = torch.tensor(float(N))
    ours = Masks(focal_alpha=0.25, focal_gamma=2.0, resize=resize)(outputs, targets, indices, num_boxes)
    theirs = sam3_loss_fns.Masks(weight_dict={"loss_mask": 200.0, "loss_dice": 10.0}, focal_alpha=0.25, focal_gamma=2.0).get_loss(
        outputs, _sam3_targets(targets), indices, num_boxes
    )
    _assert_terms_equal(ours, theirs, Masks.TERMS)


def test_masks_point_sampled_equal_sam3():
    gen = torch.Generator().manual_seed(7)
    outputs, targets = _outputs(gen, h=12), _targets(gen, size=24)
    indices = _indices(outputs, targets)
    num_boxes = torch.tensor(float(N))
    kwargs = dict(focal_alpha=0.25, focal_gamma=2.0, num_sample_points=50, oversample_ratio=3.0, importance_sample_ratio=0.75)
    torch.manual_seed(123)
    ours = Masks(**kwargs)(outputs, targets, indices, num_boxes)
    torch.manual_seed(123)
    theirs = sam3_loss_fns.Masks(weight_dict={"loss_mask": 1.0, "loss_dice": 1.0}, **kwargs).get_loss(
        outputs, _sam3_targets(targets), indices, num_boxes
    )
    _assert_terms_equal(ours, theirs, Masks.TERMS)


@pytest.mark.parametrize(
    "focal,presence_head,presence_loss,resize,downsample,from_instances",
    [
        (True, True, False, "predictions", False, False),  # SAM3's segmentation config
        (True, True, True, "predictions", False, True),
        (False, False, False, "targets_sam3", True, False),
        (True, False, False, "targets_sam3", True, True),
        (False, True, True, "targets_sam3", True, False),
    ],
)
def test_semantic_equals_sam3(focal, presence_head, presence_loss, resize, downsample, from_instances):
    gen = torch.Generator().manual_seed(8)
    targets = _targets(gen, size=24)
    from angioexp.losses.loss_fns import semantic_targets_from_instances

    if not from_instances:
        targets["semantic_masks"] = semantic_targets_from_instances(targets["masks"], targets["num_boxes"])
    outputs = {"semantic_seg": torch.randn(B, 1, 12, 12, generator=gen) * 2, "presence_logit": torch.randn(B, 1, generator=gen)}
    kwargs = dict(focal=focal, focal_alpha=0.6, focal_gamma=2.0, presence_head=presence_head, presence_loss=presence_loss)
    ours = SemanticSegCriterion(resize=resize, **kwargs)(outputs, targets)
    weights = {"loss_semantic_seg": 20.0, "loss_semantic_dice": 30.0}
    if presence_head:
        weights["loss_semantic_presence"] = 1.0
    theirs = sam3_loss_fns.SemanticSegCriterion(weight_dict=weights, downsample=downsample, **kwargs).get_loss(outputs, targets)
    keys = ["loss_semantic_seg", "loss_semantic_dice"] + (["loss_semantic_presence"] if presence_head else [])
    _assert_terms_equal(ours, theirs, keys)


# ---------------------------------------------------------------------------------------------
# The whole objective vs Sam3LossWrapper (aux layers, one-to-many, weights, normalisation)


def test_full_criterion_equals_sam3_loss_wrapper():
    gen = torch.Generator().manual_seed(9)
    cfg = load_config(
        overrides=[
            "loss.masks.resize=predictions",
            "loss.semantic.resize=predictions",
            "loss.view.loss_view=0",
        ]
    )
    cfg.o2m.enabled = True  # SAM3's objective (a core config refuses o2m: the core model has no o2m queries)
    outputs = _outputs(gen, h=12)
    outputs["aux_outputs"] = [_outputs(gen, with_masks=False) for _ in range(2)]
    for layer in [outputs, *outputs["aux_outputs"]]:
        o2m = _outputs(gen, with_masks=layer is outputs)
        layer.update({f"{k}_o2m": v for k, v in o2m.items() if k != "presence_logit_dec"})
    outputs["semantic_seg"] = torch.randn(B, 1, 12, 12, generator=gen)
    outputs["presence_logit"] = torch.randn(B, 1, generator=gen)
    targets = _targets(gen, size=24)

    ours = build_criterion(cfg)(outputs, targets)

    # SAM3: the model computes o2o indices itself; the wrapper does the rest.
    m, lo = cfg.matcher, cfg.loss
    matcher = sam3_matcher.BinaryHungarianMatcherV2(
        cost_class=m.cost_class, cost_bbox=m.cost_bbox, cost_giou=m.cost_giou, focal=m.focal, alpha=m.alpha, gamma=m.gamma
    )
    sam3_targets = _sam3_targets(targets)
    for layer in [outputs, *outputs["aux_outputs"]]:
        layer["indices"] = matcher(layer, sam3_targets)
    wrapper = sam3_wrapper.Sam3LossWrapper(
        loss_fns_find=[
            sam3_loss_fns.Boxes(weight_dict={"loss_bbox": lo.boxes.loss_bbox, "loss_giou": lo.boxes.loss_giou}),
            sam3_loss_fns.IABCEMdetr(
                weak_loss=False,
                weight_dict={"loss_ce": lo.iabce.loss_ce, "presence_loss": lo.iabce.presence_loss},
                pos_weight=lo.iabce.pos_weight,
                alpha=lo.iabce.alpha,
                gamma=lo.iabce.gamma,
                use_presence=lo.iabce.use_presence,
                pos_focal=lo.iabce.pos_focal,
            ),
            sam3_loss_fns.Masks(
                weight_dict={"loss_mask": lo.masks.loss_mask, "loss_dice": lo.masks.loss_dice},
                focal_alpha=lo.masks.focal_alpha,
                focal_gamma=lo.masks.focal_gamma,
            ),
        ],
        normalization="local",  # "global" without torch.distributed is the same number
        matcher=matcher,
        o2m_matcher=sam3_matcher.BinaryOneToManyMatcher(alpha=cfg.o2m.alpha, threshold=cfg.o2m.threshold, topk=cfg.o2m.topk),
        o2m_weight=cfg.o2m.o2m_weight,
        use_o2m_matcher_on_o2m_aux=False,
    )
    theirs = wrapper.compute_loss(outputs, sam3_targets)
    semantic = sam3_loss_fns.SemanticSegCriterion(
        weight_dict={
            "loss_semantic_seg": lo.semantic.loss_semantic_seg,
            "loss_semantic_dice": lo.semantic.loss_semantic_dice,
            "loss_semantic_presence": lo.semantic.loss_semantic_presence,
        },
        focal=lo.semantic.focal,
        focal_alpha=lo.semantic.focal_alpha,
        focal_gamma=lo.semantic.focal_gamma,
        downsample=False,
        presence_head=lo.semantic.presence_head,
        presence_loss=lo.semantic.presence_loss,
    )(outputs, targets)
    theirs.update({k: v for k, v in semantic.items() if k != sam3_loss_fns.CORE_LOSS_KEY})
    sam3_total = theirs[sam3_loss_fns.CORE_LOSS_KEY] + semantic[sam3_loss_fns.CORE_LOSS_KEY]

    loss_keys = [k for k in theirs if k.startswith(("loss_", "presence_loss")) and "acc" not in k]
    assert {"loss_bbox_aux_1", "loss_ce_o2m", "loss_giou_aux_0_o2m", "loss_mask_o2m", "loss_semantic_dice"} <= set(loss_keys)
    for key in loss_keys:
        expected = torch.as_tensor(theirs[key]).float()
        if key.endswith("_o2m"):  # SAM3 reports o2m terms already × o2m_weight; ours are unweighted
            expected = expected / cfg.o2m.o2m_weight
        torch.testing.assert_close(ours[key], expected, atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(ours["loss"], sam3_total.float(), atol=1e-3, rtol=1e-5)
