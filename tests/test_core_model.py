"""The core model: the losses' tensor contract, SAM3's parameter groups, prompts that matter."""

from __future__ import annotations

import math

import pytest
import torch

from angioexp.checkpoints import load_state_with_report
from angioexp.config import load_config
from angioexp.errors import CheckpointLoadError
from angioexp.model.build import build_model, count_parameters
from angioexp.model.core import FindQueries
from angioexp.model.prompt_encoder import UNK, PromptTokenizer
from angioexp.segments import SEGMENTS
from angioexp.train.optim import build_optimizer, param_groups
from angioexp.train.schedule import InverseSquareRoot


def _cfg(*overrides, stage=1):
    return load_config(None, ["init_from=none", "scratch.resolution=64", *overrides], stage=stage)


def _queries(b_per_image=(1, 2), points=0, boxes=False, views=None, texts=None):
    tok = PromptTokenizer()
    img_idx = [i for i, n in enumerate(b_per_image) for _ in range(n)]
    b = len(img_idx)
    texts = texts or ["coronary artery", "proximal left anterior descending", "mid left anterior descending"] * b
    return FindQueries(
        img_idx=torch.tensor(img_idx),
        text_ids=tok.batch(texts[:b]),
        point_coords=torch.rand(b, points, 2),
        point_labels=torch.ones(b, points, dtype=torch.long),
        boxes=torch.tensor([[[0.1, 0.1, 0.6, 0.7]]]).expand(b, int(boxes), 4).clone(),
        box_valid=torch.ones(b, int(boxes), dtype=torch.bool),
        views=torch.tensor(views if views is not None else [0] * len(b_per_image)),
    )


def test_outputs_follow_the_losses_contract():
    cfg = _cfg("model.decoder_layers=3", "model.num_queries=5")
    model = build_model(cfg)
    images = torch.randint(0, 255, (2, 1, 64, 48), dtype=torch.uint8)
    out = model(images, _queries((1, 2), points=3, boxes=True))
    b, q = 3, 5
    assert out["pred_logits"].shape == (b, q, 1)
    assert out["pred_boxes"].shape == (b, q, 4) and out["pred_boxes_xyxy"].shape == (b, q, 4)
    assert out["pred_masks"].shape == (b, q, 64, 48)  # full input resolution, not SAM3's 1/4
    assert out["presence_logit_dec"].shape == (b, 1)
    assert out["semantic_seg"].shape == (b, 1, 64, 48)
    assert out["view_logits"].shape == (2, cfg.model.num_views or 10)
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks", "presence_logit_dec"}
        assert aux["pred_masks"].shape == (b, q, 64, 48)
    boxes = out["pred_boxes"]
    assert ((boxes >= 0) & (boxes <= 1)).all()
    cx, cy, w, h = boxes.unbind(-1)
    assert torch.allclose(out["pred_boxes_xyxy"], torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1))


def test_each_query_is_decoded_against_its_own_image():
    """Masks of a find query must come from the image it points at (grouped dot product)."""
    model = build_model(_cfg()).eval()
    a = torch.randint(0, 255, (1, 1, 32, 32), dtype=torch.uint8)
    c = torch.randint(0, 255, (1, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        both = model(torch.cat([a, c]), _queries((1, 1), views=[0, 0], texts=["first diagonal"] * 2))
        alone = model(c, _queries((1,), views=[0], texts=["first diagonal"]))
    torch.testing.assert_close(both["pred_masks"][1], alone["pred_masks"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both["semantic_seg"][1], alone["semantic_seg"][0], rtol=1e-4, atol=1e-4)


def test_image_size_must_be_a_multiple_of_the_stride():
    model = build_model(_cfg())
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.zeros(1, 1, 40, 40, dtype=torch.uint8), _queries((1,)))


def test_prompt_text_view_points_and_boxes_change_the_prediction():
    model = build_model(_cfg()).eval()
    images = torch.randint(0, 255, (1, 1, 32, 32), dtype=torch.uint8)
    base = _queries((1,))
    with torch.no_grad():
        ref = model(images, base)["pred_logits"]
        for changed in (
            FindQueries(**{**base.__dict__, "text_ids": PromptTokenizer().batch(["distal circumflex"])}),
            FindQueries(**{**base.__dict__, "views": torch.tensor([5])}),
            _queries((1,), points=2),
            _queries((1,), boxes=True),
        ):
            assert not torch.allclose(model(images, changed)["pred_logits"], ref)


def test_tokenizer_shares_words_between_related_segments():
    tok = PromptTokenizer()
    prox, mid = tok.encode("proximal right coronary artery"), tok.encode("mid right coronary artery")
    assert prox[1:] == mid[1:] and prox[0] != mid[0]
    assert UNK not in [i for s in SEGMENTS for i in tok.encode(s.prompt)]
    assert tok.encode("aorta") == [UNK]  # an unknown word still gives a usable prompt
    assert tok.batch(["coronary artery", "first diagonal branch a"]).shape == (2, 4)


def test_every_parameter_sits_in_one_of_sam3s_three_lr_groups():
    cfg = _cfg("scratch.lr_scale=2", "scratch.lrd_vision_backbone=0.5", "scratch.wd=0.05")
    model = build_model(cfg)
    counts = count_parameters(model)
    assert set(counts) == {"vision_backbone", "language_backbone", "transformer", "total"}
    groups = param_groups(model, cfg.scratch)
    assert sum(p.numel() for g in groups for p in g["params"]) == counts["total"]
    by_name = {id(p): n for n, p in model.named_parameters()}
    lr_of = {by_name[id(p)]: (g["base_lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    s = cfg.scratch
    assert lr_of["transformer.decoder.layers.0.ffn.net.0.weight"] == (s.lr_transformer, 0.05)
    assert lr_of["language_backbone.text_embed.weight"] == (s.lr_language_backbone, 0.05)
    # layer-wise decay: deepest stage lrd^1, the stem lrd^(stages + 1)
    stages = len(cfg.model.encoder_channels)
    assert lr_of["vision_backbone.stages.3.down.0.weight"][0] == pytest.approx(s.lr_vision_backbone * 0.5)
    assert lr_of["vision_backbone.stem.0.weight"][0] == pytest.approx(s.lr_vision_backbone * 0.5 ** (stages + 1))
    # no weight decay on biases and norms
    assert lr_of["transformer.heads.class_embed.bias"][1] == 0.0
    assert lr_of["vision_backbone.stem.1.weight"][1] == 0.0  # GroupNorm
    assert lr_of["transformer.decoder.layers.0.norm_ffn.weight"][1] == 0.0
    assert isinstance(build_optimizer(model, cfg), torch.optim.AdamW)


def _sam3_inverse_sqrt(base_lr, warmup, cooldown, timescale, step, total):
    """SAM3's InverseSquareRootParamScheduler.__call__(step, where=step/total), written out."""
    where = step / total
    lr = base_lr
    if where > 0:
        total_steps = step / where
    else:
        total_steps = 1
    if warmup < step:
        lr = lr / math.sqrt((step + timescale - warmup) / timescale)
    if warmup:
        lr = lr * min(1.0, step / warmup)
    if cooldown:
        lr = lr * min(1.0, (total_steps - step) / cooldown)
    return lr


@pytest.mark.parametrize("warmup,timescale,cooldown", [(10, 40, 20), (0, 1, 0), (5, 5, 0)])
def test_inverse_sqrt_schedule_matches_sam3(warmup, timescale, cooldown):
    total = 100
    sched = InverseSquareRoot(warmup, timescale, cooldown, total)
    for step in range(1, total):
        assert sched.factor(step) == pytest.approx(_sam3_inverse_sqrt(1.0, warmup, cooldown, timescale, step, total))
    if warmup:
        assert sched.factor(0) == 0.0 and sched.factor(warmup) == pytest.approx(1.0)
    assert sched.factor(total) == (0.0 if cooldown else sched.factor(total))


def test_a_time_budget_plans_the_cooldown_for_the_steps_that_fit():
    sched = InverseSquareRoot(10, 40, 20, 600)
    # 50 steps done at 2 s/step, 200 s left: 100 more steps fit, so the run ends at 150 and the
    # cool-down runs over steps 130-150 instead of 580-600 (which the budget never reaches).
    fitted = sched.fitted(50, 2.0, 200.0, 600)
    assert fitted.total_steps == 150
    assert fitted.factor(150) == 0.0 and 0 < fitted.factor(140) < sched.factor(140)
    assert fitted.factor(120) == sched.factor(120)  # warm-up and decay unchanged before the cool-down
    assert sched.fitted(50, 0.1, 1e6, 600).total_steps == 600  # never past max_steps
    assert sched.fitted(50, 2.0, -5.0, 600).total_steps == 51  # over budget: ends at the next step


@pytest.mark.sam3
def test_inverse_sqrt_schedule_equals_sam3s_own_class():
    schedulers = pytest.importorskip("sam3.train.optim.schedulers")
    theirs = schedulers.InverseSquareRootParamScheduler(base_lr=8e-4, warmup_steps=10, cooldown_steps=20, timescale=40)
    ours = InverseSquareRoot(10, 40, 20, 100)
    for step in range(1, 100):
        assert 8e-4 * ours.factor(step) == pytest.approx(theirs(step, step / 100))


def test_mask_extent_boxes_are_exact_for_hard_masks_and_differentiable():
    from angioexp.model.heads import mask_extent_boxes

    logits = torch.full((1, 2, 32, 64), -30.0)
    logits[0, 0, 4:10, 8:20] = 30.0  # rows 4..9, cols 8..19
    logits.requires_grad_(True)
    boxes = mask_extent_boxes(logits).detach()
    x0, y0, x1, y1 = 8 / 64, 4 / 32, 20 / 64, 10 / 32
    torch.testing.assert_close(boxes[0, 0], torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]))
    assert boxes[0, 1, 2] == pytest.approx(1 / 64) and boxes[0, 1, 0] == pytest.approx(0.5)  # empty: centre pixel
    soft = torch.zeros(1, 1, 8, 8, requires_grad=True)
    mask_extent_boxes(soft)[..., 2].sum().backward()
    assert soft.grad.abs().sum() > 0


def test_semantic_mask_base_starts_every_instance_mask_from_the_semantic_mask():
    model = build_model(_cfg("model.semantic_mask_base=true")).eval()
    images = torch.randint(0, 255, (1, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        for p in model.transformer.heads.mask_embed.parameters():
            p.zero_()  # query term 0: every instance mask equals the semantic mask
        out = model(images, _queries((1,)))
    assert out["semantic_seg"].shape == (1, 1, 32, 32)
    torch.testing.assert_close(out["pred_masks"], out["semantic_seg"].expand_as(out["pred_masks"]))


def test_region_masks_start_as_the_fine_term_and_learn_from_the_first_step():
    """model.region_masks + model.context_layers: zero-initialised, so the model starts as the plain
    per-pixel mask and a Stage 1 checkpoint without them continues unchanged; both get gradients."""
    cfg = _cfg("model.region_masks=true", "model.context_layers=1", "model.num_queries=3")
    model = build_model(cfg)
    heads = model.transformer.heads
    images = torch.randint(0, 255, (2, 1, 64, 48), dtype=torch.uint8)
    queries = _queries((1, 2))
    out = model(images, queries)
    assert out["pred_masks"].shape == (3, 3, 64, 48)
    _, memory, _, _ = model.encode_images(images)  # memory (2, 4*3, D): stride 16
    region = heads.region(heads.region_embed(torch.randn(3, 3, cfg.model.d_model)), memory[queries.img_idx], (64 // 16, 48 // 16), (64, 48))
    assert torch.count_nonzero(region) == 0  # zero-initialised output layer
    loss = out["pred_masks"].sigmoid().mean() + out["semantic_seg"].sigmoid().mean()
    loss.backward()
    assert heads.region_embed.layers[-1].weight.grad.abs().sum() > 0
    assert model.transformer.context_to_pixels.weight.grad.abs().sum() > 0
    # a checkpoint of the plain model loads into it, with exactly the new parameters missing —
    # reported as new by design, so they do not count against min_loaded_fraction
    plain = build_model(_cfg("model.num_queries=3")).state_dict()
    result = build_model(cfg).load_state_dict(plain, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(("transformer.context", "transformer.heads.region", "transformer.heads.semantic_region"))
                                       for k in result.missing_keys)
    target = build_model(cfg)
    report = load_state_with_report(target, plain, source="plain.pt", min_loaded_fraction=1.0, new_by_design=target.is_optional_addition)
    assert sorted(report.new_by_design) == sorted(result.missing_keys) and report.missing == []
    assert report.loaded_fraction == 1.0 and "new by design" in report.summary()
    # without the rule the same load is refused (the new tensors would count as missing)
    with pytest.raises(CheckpointLoadError, match="min_loaded_fraction"):
        load_state_with_report(build_model(cfg), plain, source="plain.pt", min_loaded_fraction=0.99)
    # a tensor missing for another reason still counts
    partial = {k: v for k, v in plain.items() if not k.startswith("transformer.heads.class_embed")}
    report = load_state_with_report(build_model(cfg), partial, source="p.pt", new_by_design=target.is_optional_addition)
    assert report.missing == ["transformer.heads.class_embed.bias", "transformer.heads.class_embed.weight"]
    assert report.loaded_fraction < 1.0
