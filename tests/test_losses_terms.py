"""Matcher, loss terms and the criterion on their own (no sam3 needed).

SAM3 equality is in test_losses_sam3_parity.py; here: degenerate boxes, empty find queries,
diverged predictions, fp32 under autocast, key names, the weighted total, bad arguments, and
that descending the criterion really fits predictions to targets.
"""

from __future__ import annotations

import math

import pytest
import torch

from angioexp.config import load_config
from angioexp.errors import ConfigError
from angioexp.losses import (
    BinaryHungarianMatcherV2,
    BinaryOneToManyMatcher,
    Boxes,
    IABCEMdetr,
    Masks,
    SemanticSegCriterion,
    ViewCriterion,
    build_criterion,
)
from angioexp.losses.box_ops import box_cxcywh_to_xyxy, diag_generalized_box_iou, generalized_box_iou, masks_to_boxes
from angioexp.losses.loss_fns import resize_to

B, Q, H = 3, 5, 32


def make_batch(seed=0, num_boxes=(2, 0, 3), mask_size=H, pred_size=H // 2, dtype=torch.float32, aux_layers=1):
    g = torch.Generator().manual_seed(seed)
    nb = torch.tensor(num_boxes)
    n = int(nb.sum())
    boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)

    def layer(with_dense=True):
        out = {
            "pred_logits": torch.randn(B, Q, 1, generator=g),
            "pred_boxes": torch.cat([torch.rand(B, Q, 2, generator=g) * 0.5 + 0.25, torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05], -1),
            "presence_logit_dec": torch.randn(B, 1, generator=g),
        }
        out["pred_boxes_xyxy"] = box_cxcywh_to_xyxy(out["pred_boxes"])
        if with_dense:
            out["pred_masks"] = torch.randn(B, Q, pred_size, pred_size, generator=g)
        return out

    outputs = layer()
    outputs["semantic_seg"] = torch.randn(B, 1, pred_size, pred_size, generator=g)
    outputs["view_logits"] = torch.randn(2, 10, generator=g)
    outputs["aux_outputs"] = [layer(with_dense=False) for _ in range(aux_layers)]
    masks = torch.zeros(n, mask_size, mask_size, dtype=torch.bool)
    for i in range(n):  # thin vertical "vessels" of width 1-3 px
        x = int(torch.randint(2, mask_size - 4, (1,), generator=g))
        masks[i, 2:-2, x : x + 1 + i % 3] = True
    targets = {"boxes": boxes, "num_boxes": nb, "masks": masks, "view_labels": torch.tensor([4, -1])}

    def cast(d):
        return {k: (cast(v) if isinstance(v, dict) else [cast(x) for x in v] if isinstance(v, list) else v.to(dtype)) for k, v in d.items()}

    return cast(outputs), targets


# ---------------------------------------------------------------------------------------------
# Boxes: degenerate (thin-vessel) boxes must stay finite in value and gradient


@pytest.mark.parametrize(
    "target",
    [
        [0.5, 0.5, 0.0, 0.4],  # zero width: a straight vertical vessel
        [0.5, 0.5, 0.4, 0.0],  # zero height
        [0.5, 0.5, 0.0, 0.0],  # a point
    ],
)
@pytest.mark.parametrize("pred_equal_to_target", [True, False])
def test_boxes_loss_is_finite_for_degenerate_boxes(target, pred_equal_to_target):
    tgt = torch.tensor([target])
    pred = (tgt.clone() if pred_equal_to_target else torch.tensor([[0.52, 0.48, 0.0, 0.1]])).requires_grad_(True)
    outputs = {"pred_boxes": pred[None], "pred_boxes_xyxy": box_cxcywh_to_xyxy(pred)[None]}
    targets = {"boxes": tgt, "boxes_xyxy": box_cxcywh_to_xyxy(tgt)}
    indices = (torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    losses = Boxes()(outputs, targets, indices, torch.tensor(1.0))
    total = losses["loss_bbox"] + losses["loss_giou"]
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(pred.grad).all()
    # the naive formula (SAM3's, unguarded) is 0/0 here — this is what the guard is for
    x0, y0, x1, y1 = box_cxcywh_to_xyxy(tgt)[0]
    assert float((x1 - x0) * (y1 - y0)) == 0.0


def test_giou_of_ordinary_boxes_matches_definition():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou = 1 / 7
    enclosing, union = 9.0, 7.0
    expected = iou - (enclosing - union) / enclosing
    assert math.isclose(float(generalized_box_iou(a, b)[0, 0]), expected, rel_tol=1e-6)
    assert math.isclose(float(diag_generalized_box_iou(a, b)[0]), expected, rel_tol=1e-6)


def test_masks_to_boxes_uses_exclusive_far_edge():
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[0, 3, 5] = True
    assert masks_to_boxes(m).tolist() == [[5.0, 3.0, 6.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------------------------
# Matchers


def test_matcher_finds_the_obvious_assignment_and_skips_empty_queries():
    targets = {
        "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.1]]),
        "num_boxes": torch.tensor([2, 0, 1]),
    }
    pred = torch.full((3, 4, 4), 0.5)
    pred[..., 2:] = 0.05
    pred[0, 3] = targets["boxes"][0]
    pred[0, 1] = targets["boxes"][1]
    pred[2, 2] = targets["boxes"][2]
    outputs = {"pred_logits": torch.zeros(3, 4, 1), "pred_boxes": pred}
    batch_idx, src_idx, tgt_idx = BinaryHungarianMatcherV2()(outputs, targets)
    assert batch_idx.tolist() == [0, 0, 2]
    assert src_idx.tolist() == [3, 1, 2]
    assert tgt_idx.tolist() == [0, 1, 2]


def test_matcher_with_no_targets_at_all_returns_empty_indices():
    outputs, targets = make_batch(num_boxes=(0, 0, 0))
    targets["boxes"] = torch.zeros(0, 4)
    for matcher in (BinaryHungarianMatcherV2(), BinaryOneToManyMatcher()):
        idx = matcher(outputs, targets)
        assert all(i.numel() == 0 and i.dtype == torch.long for i in idx)


def test_matcher_survives_nan_predictions():
    outputs, targets = make_batch()
    outputs["pred_boxes"][0, 2] = float("nan")
    outputs["pred_logits"][1] = float("inf")
    batch_idx, src_idx, tgt_idx = BinaryHungarianMatcherV2()(outputs, targets)
    assert len(tgt_idx) == int(targets["num_boxes"].sum())


def test_matcher_respects_validity_masks():
    outputs, targets = make_batch()
    valid = torch.ones(B, Q, dtype=torch.bool)
    valid[:, 0] = False
    batch_idx, src_idx, _ = BinaryHungarianMatcherV2()(outputs, targets, out_is_valid=valid)
    assert 0 not in src_idx.tolist()


def test_one_to_many_matcher_assigns_several_queries_to_one_target():
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    pred = target.repeat(1, 6, 1) + torch.linspace(0, 0.05, 6)[None, :, None]
    pred[0, 4:] = torch.tensor([0.1, 0.1, 0.05, 0.05])  # two far-away queries
    outputs = {"pred_logits": torch.zeros(1, 6, 1), "pred_boxes": pred}
    batch_idx, src_idx, tgt_idx = BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4)(
        outputs, {"boxes": target, "num_boxes": torch.tensor([1])}
    )
    assert 2 <= len(src_idx) <= 4
    assert set(src_idx.tolist()) <= {0, 1, 2, 3}
    assert tgt_idx.tolist() == [0] * len(src_idx)


# ---------------------------------------------------------------------------------------------
# Individual terms


def test_iabce_presence_masks_score_loss_of_absent_queries():
    outputs, targets = make_batch()
    indices = BinaryHungarianMatcherV2()(outputs, targets)
    term = IABCEMdetr(pos_weight=10.0, gamma=2.0, use_presence=True)
    base = term(outputs, targets, indices, 5.0)
    outputs["pred_logits"][1] += 5.0  # find query 1 has no targets: its scores are not trained
    again = term(outputs, targets, indices, 5.0)
    assert torch.equal(base["loss_ce"], again["loss_ce"])
    outputs["presence_logit_dec"][1] = 10.0  # ...but its presence logit is
    assert term(outputs, targets, indices, 5.0)["presence_loss"] > base["presence_loss"]


def test_masks_resize_modes():
    logits = torch.zeros(1, 8, 8)
    target = torch.zeros(1, 16, 16)
    target[0, :, 5] = 1  # a 1-px vessel
    _, area = resize_to(logits, target, "targets_area")
    _, sam3 = resize_to(logits, target, "targets_sam3")
    up, same = resize_to(logits, target, "predictions")
    assert area.shape == sam3.shape == (1, 8, 8) and up.shape == same.shape == (1, 16, 16)
    assert math.isclose(float(area.sum()), float(target.sum()) / 4)  # mass preserved, soft 0.5
    assert float(area.max()) == 0.5
    assert float(sam3.sum()) > float(area.sum())  # bilinear→bool dilates the thin vessel


def test_masks_loss_on_sampled_points_is_finite_and_differentiable():
    outputs, targets = make_batch()
    outputs["pred_masks"].requires_grad_(True)
    indices = BinaryHungarianMatcherV2()(outputs, targets)
    term = Masks(num_sample_points=64, oversample_ratio=3.0, importance_sample_ratio=0.75)
    losses = term(outputs, targets, indices, 5.0)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0


def test_masks_without_matches_give_connected_zero():
    outputs, targets = make_batch(num_boxes=(0, 0, 0))
    targets["boxes"], targets["masks"] = torch.zeros(0, 4), torch.zeros(0, H, H, dtype=torch.bool)
    outputs["pred_masks"].requires_grad_(True)
    empty = torch.empty(0, dtype=torch.long)
    losses = Masks()(outputs, targets, (empty, empty, empty), 1.0)
    assert float(losses["loss_mask"].detach()) == 0.0 and losses["loss_mask"].requires_grad


def test_semantic_presence_head_ignores_absent_queries():
    outputs, targets = make_batch()
    term = SemanticSegCriterion(presence_head=True)
    base = term(outputs, targets)
    outputs["semantic_seg"][1] += 3.0  # query 1 is absent (no instances)
    assert torch.equal(term(outputs, targets)["loss_semantic_seg"], base["loss_semantic_seg"])
    assert not torch.equal(SemanticSegCriterion(presence_head=False)(outputs, targets)["loss_semantic_seg"], base["loss_semantic_seg"])


def test_semantic_presence_loss_needs_the_presence_logit():
    outputs, targets = make_batch()
    with pytest.raises(ValueError, match="presence_logit"):
        SemanticSegCriterion(presence_head=True, presence_loss=True)(outputs, targets)
    outputs["presence_logit"] = torch.zeros(B, 1)
    assert SemanticSegCriterion(presence_head=True, presence_loss=True)(outputs, targets)["loss_semantic_presence"] > 0


def test_view_loss_ignores_unknown_views():
    logits = torch.randn(3, 10)
    known = ViewCriterion()({"view_logits": logits}, {"view_labels": torch.tensor([2, -1, 7])})["loss_view"]
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([2, 7]))
    torch.testing.assert_close(known, expected)
    none = ViewCriterion()({"view_logits": logits}, {"view_labels": torch.tensor([-1, -1, -1])})["loss_view"]
    assert float(none) == 0.0 and not torch.isnan(none)


# ---------------------------------------------------------------------------------------------
# The criterion


def test_criterion_keys_and_weighted_total():
    cfg = load_config()
    outputs, targets = make_batch(aux_layers=2)
    losses = build_criterion(cfg)(outputs, targets)
    expected_keys = {
        "loss_bbox", "loss_giou", "loss_ce", "presence_loss", "loss_mask", "loss_dice",
        "loss_semantic_seg", "loss_semantic_dice", "loss_semantic_presence", "loss_view", "loss",
    }
    expected_keys |= {f"{k}_aux_{i}" for k in ("loss_bbox", "loss_giou", "loss_ce", "presence_loss") for i in (0, 1)}
    assert set(losses) == expected_keys
    L = cfg.loss
    weights = {
        "loss_bbox": L.boxes.loss_bbox, "loss_giou": L.boxes.loss_giou, "loss_ce": L.iabce.loss_ce,
        "presence_loss": L.iabce.presence_loss, "loss_mask": L.masks.loss_mask, "loss_dice": L.masks.loss_dice,
        "loss_semantic_seg": L.semantic.loss_semantic_seg, "loss_semantic_dice": L.semantic.loss_semantic_dice,
        "loss_semantic_presence": L.semantic.loss_semantic_presence, "loss_view": L.view.loss_view,
    }
    manual = sum(w * losses[k] for k, w in weights.items())
    manual = manual + sum(weights[k.split("_aux_")[0]] * v for k, v in losses.items() if "_aux_" in k)
    torch.testing.assert_close(losses["loss"], manual)
    assert all(torch.isfinite(v) for v in losses.values())


def test_criterion_o2m_terms_and_error_when_missing():
    cfg = load_config()
    cfg.o2m.enabled = True  # the criterion's o2m path (a core config refuses it: the core model has no o2m queries)
    outputs, targets = make_batch()
    with pytest.raises(ValueError, match="pred_logits_o2m"):
        build_criterion(cfg)(outputs, targets)
    more, _ = make_batch(seed=5)
    outputs.update({f"{k}_o2m": more[k] for k in ("pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks")})
    losses = build_criterion(cfg)(outputs, targets)
    assert {"loss_bbox_o2m", "loss_ce_o2m", "loss_mask_o2m", "presence_loss_o2m"} <= set(losses)
    without = build_criterion(load_config())(outputs, targets)  # o2m disabled: ignored
    assert "loss_ce_o2m" not in without


def test_criterion_without_segmentation_has_no_mask_terms():
    cfg = load_config(overrides=["scratch.enable_segmentation=false"])
    outputs, targets = make_batch()
    del outputs["pred_masks"], outputs["semantic_seg"]
    losses = build_criterion(cfg)(outputs, targets)
    assert "loss_mask" not in losses and "loss_semantic_seg" not in losses and "loss_ce" in losses


def test_missing_output_for_a_weighted_term_names_the_switch():
    outputs, targets = make_batch()
    del outputs["view_logits"]
    with pytest.raises(ValueError, match="loss.view.loss_view"):
        build_criterion(load_config())(outputs, targets)
    assert "loss_view" not in build_criterion(load_config(overrides=["loss.view.loss_view=0"]))(outputs, targets)


def test_criterion_runs_in_fp32_under_bf16_autocast():
    outputs, targets = make_batch(dtype=torch.bfloat16)
    outputs["pred_masks"].requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = build_criterion(load_config())(outputs, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    losses["loss"].backward()
    assert outputs["pred_masks"].grad.dtype == torch.bfloat16 and torch.isfinite(outputs["pred_masks"].grad.float()).all()
    # the same numbers as an fp32 run on the bf16-rounded inputs
    ref = build_criterion(load_config())(*make_batch(dtype=torch.bfloat16))
    torch.testing.assert_close(losses["loss"], ref["loss"])


def test_zero_weight_keeps_a_nan_term_out_of_the_total():
    outputs, targets = make_batch()
    outputs["view_logits"][:] = float("nan")
    losses = build_criterion(load_config(overrides=["loss.view.loss_view=0"]))(outputs, targets)
    assert torch.isnan(losses["loss_view"]) and torch.isfinite(losses["loss"])


def test_descending_the_criterion_fits_boxes_scores_and_masks():
    """Free predictions optimised with the full objective converge to the targets."""
    torch.manual_seed(0)
    outputs, targets = make_batch(aux_layers=0, pred_size=H)
    params = {k: torch.nn.Parameter(outputs[k].clone()) for k in ("pred_logits", "pred_masks", "presence_logit_dec", "semantic_seg")}
    box_raw = torch.nn.Parameter(torch.logit(outputs["pred_boxes"].clamp(0.01, 0.99)))
    criterion = build_criterion(load_config(overrides=["loss.view.loss_view=0"]))
    opt = torch.optim.Adam([*params.values(), box_raw], lr=0.05)
    first = None
    for _ in range(150):
        boxes = box_raw.sigmoid()
        out = {**params, "pred_boxes": boxes, "pred_boxes_xyxy": box_cxcywh_to_xyxy(boxes), "view_logits": outputs["view_logits"]}
        losses = criterion(out, targets)
        first = first if first is not None else {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["loss"].item() < 0.2 * first["loss"]
    assert losses["loss_bbox"].item() < 0.05 and losses["loss_giou"].item() < 0.1
    assert losses["loss_dice"].item() < 0.5 * first["loss_dice"]


_NORMALISATION_WORKER = """
import sys, torch
from angioexp.losses.criterion import Sam3Criterion
from angioexp.losses.matcher import BinaryHungarianMatcherV2
rank, init_file = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
criterion = Sam3Criterion(BinaryHungarianMatcherV2(), [])
num_boxes = torch.tensor([1, 1]) if rank == 0 else torch.tensor([3, 3])
print(float(criterion.num_boxes({"num_boxes": num_boxes})))
torch.distributed.destroy_process_group()
"""


def test_num_boxes_is_averaged_over_ranks(tmp_path):
    """SAM3's "global" normalisation: every rank divides by the mean instance count (here 4)."""
    import subprocess
    import sys

    init_file = str(tmp_path / "init")
    procs = [
        subprocess.Popen([sys.executable, "-c", _NORMALISATION_WORKER, str(rank), init_file], stdout=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [float(o.splitlines()[-1]) for o in outputs] == [4.0, 4.0]


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: Boxes(weight_dict={"loss_bbox": -1.0}), "loss_bbox must be a finite number >= 0"),
        (lambda: Boxes(weight_dict={"loss_box": 1.0}), "unknown loss term"),
        (lambda: IABCEMdetr(pos_weight=-1.0), "pos_weight must be >= 0"),
        (lambda: IABCEMdetr(pos_weight=1.0, alpha=1.5), "alpha must be in"),
        (lambda: Masks(focal_alpha=-0.1), "focal_alpha must be in"),
        (lambda: Masks(num_sample_points=0), "num_sample_points"),
        (lambda: Masks(resize="nearest"), "resize must be one of"),
        (lambda: SemanticSegCriterion(focal_alpha=2.0), "focal_alpha must be in"),
        (lambda: BinaryHungarianMatcherV2(cost_class=0, cost_bbox=0, cost_giou=0), "cannot all be 0"),
        (lambda: BinaryHungarianMatcherV2(alpha=-0.5), "matcher.alpha"),
        (lambda: BinaryOneToManyMatcher(topk=0), "o2m.topk"),
    ],
)
def test_constructors_reject_bad_values(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_config_rejects_bad_loss_values_before_the_criterion():
    with pytest.raises(ConfigError, match="loss.masks.focal_alpha"):
        load_config(overrides=["loss.masks.focal_alpha=1.5"])
    with pytest.raises(ConfigError, match="loss.boxes.loss_giou"):
        load_config(overrides=["loss.boxes.loss_giou=-2"])


def test_packed_targets_must_agree_with_num_boxes():
    outputs, targets = make_batch()
    targets["num_boxes"] = torch.tensor([2, 1, 3])
    with pytest.raises(ValueError, match="num_boxes"):
        build_criterion(load_config())(outputs, targets)
