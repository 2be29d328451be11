"""angioexp.backends.sam3.identity_loss: the Stage 2 identity objective on SAM3's semantic logits.

A hand-computed case (softmax across the prompts of an image, background logit 0), gradients
into SAM3's semantic head (a small SAM3 model from its own builders, 336 px), a NaN logit that
the NaN guard must see, the generated Hydra config with the term on and off, and a short
training run at 336 px: SAM3's real data pipeline and loss wrapper from the generated config and
the guarded trainer step, logging the identity terms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from angioexp.backends.sam3 import config_gen  # noqa: E402
from angioexp.backends.sam3.gpu_check import make_tiny_coco  # noqa: E402
from angioexp.backends.sam3.identity_loss import PromptIdentityLoss, stack_prompt_logits  # noqa: E402
from angioexp.config import NanGuardConfig, load_config  # noqa: E402
from angioexp.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.sam3
WEIGHTS = {"loss_identity_ce": 1.0, "loss_identity_dice": 1.0}
IDENTITY_ON = ["loss.identity.loss_identity_ce=20", "loss.identity.loss_identity_dice=20"]


def _targets(masks_per_query: list[list[torch.Tensor]]) -> dict:
    """SAM3's packed find targets (``Sam3Image.back_convert``): masks (N, H, W), num_boxes (Q,)."""
    flat = [m for masks in masks_per_query for m in masks]
    return {"masks": torch.stack(flat) if flat else torch.zeros(0, 1, 2, dtype=torch.bool),
            "num_boxes": torch.tensor([len(m) for m in masks_per_query]), "semantic_masks": None}


def _mask(*on: int) -> torch.Tensor:
    m = torch.zeros(1, 2, dtype=torch.bool)
    m[0, list(on)] = True
    return m


# --- the maths, by hand -------------------------------------------------------------------------------


def test_one_softmax_across_the_prompts_of_an_image():
    # One image of 1×2 px, two prompts. Query A's logits [ln 2, 0], query B's [0, ln 3]; A's
    # truth is pixel 0, B's pixel 1. With background logit 0:
    #   pixel 0: exp (1, 2, 1) → p = (1/4, 1/2, 1/4), label A: −ln(1/2) = ln 2
    #   pixel 1: exp (1, 1, 3) → p = (1/5, 1/5, 3/5), label B: −ln(3/5) = ln(5/3)
    # Class weights (power 0.5): A and B have equal frequency, so CE = (ln 2 + ln 5/3) / 2.
    # Soft Dice (smooth 1): A: p = (1/2, 1/5), inter 1/2 → 1 − 2/2.7; B: p = (1/4, 3/5), inter 3/5
    # → 1 − 2.2/2.85; the mean of the two.
    seg = torch.tensor([[[[math.log(2), 0.0]]], [[[0.0, math.log(3)]]]])
    outputs = {"semantic_seg": seg, "img_ids": torch.tensor([0, 0])}
    targets = _targets([[_mask(0)], [_mask(1)]])
    values = PromptIdentityLoss(WEIGHTS)(outputs=outputs, targets=targets, indices=None, num_boxes=1)
    ce, dice = (math.log(2) + math.log(5 / 3)) / 2, ((1 - 2 / 2.7) + (1 - 2.2 / 2.85)) / 2
    assert values["loss_identity_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert values["loss_identity_dice"].item() == pytest.approx(dice, rel=1e-5)
    assert values["core_loss"].item() == pytest.approx(ce + dice, rel=1e-5)
    # Independent sigmoids (SemanticSegCriterion's view) would give pixel 0 to A at p 2/3 and to B
    # at p 1/2; the softmax makes A and B compete: p(A) + p(B) + p(background) = 1 per pixel.
    logits, labels = stack_prompt_logits(outputs, targets)
    assert torch.allclose(logits.softmax(1).sum(1), torch.ones(1, 1, 2))
    assert labels.tolist() == [[[1, 2]]]


def test_images_with_different_prompt_counts_and_no_segment():
    # Image 0 as above; image 1 has one query with no target (absent category): its class 2 is
    # padding (-inf: probability 0), both its pixels are background at p = 1/2 each.
    seg = torch.tensor([[[[math.log(2), 0.0]]], [[[0.0, math.log(3)]]], [[[0.0, 0.0]]]], requires_grad=True)
    outputs = {"semantic_seg": seg, "img_ids": torch.tensor([3, 3, 7])}
    targets = _targets([[_mask(0)], [_mask(1)], []])
    logits, labels = stack_prompt_logits(outputs, targets)
    assert logits.shape == (2, 3, 1, 2) and torch.isinf(logits[1, 2]).all() and labels.tolist() == [[[1, 2]], [[0, 0]]]
    values = PromptIdentityLoss(WEIGHTS, class_weight_power=0.5)(outputs=outputs, targets=targets, indices=None, num_boxes=1)
    # frequencies: background 2/4, A 1/4, B 1/4 → weights ∝ f^-0.5 = (√2, 2, 2), pixel mean 1:
    # divided by (1/2·√2 + 1/4·2 + 1/4·2) = √2/2 + 1
    norm = math.sqrt(2) / 2 + 1
    w_bg, w_seg = math.sqrt(2) / norm, 2 / norm
    ce = (w_seg * math.log(2) + w_seg * math.log(5 / 3) + 2 * w_bg * math.log(2)) / (2 * w_seg + 2 * w_bg)
    assert values["loss_identity_ce"].item() == pytest.approx(ce, rel=1e-5)
    # Dice only over the (image, segment) pairs in the truth: image 1 adds nothing
    assert values["loss_identity_dice"].item() == pytest.approx(((1 - 2 / 2.7) + (1 - 2.2 / 2.85)) / 2, rel=1e-5)
    values["core_loss"].backward()
    assert torch.isfinite(seg.grad).all() and seg.grad.abs().sum() > 0


def test_all_negative_batch_and_the_one_to_many_pass():
    # No image has a segment: SAM3 gives no masks; the loss is plain background CE, Dice 0.
    seg = torch.zeros(2, 1, 2, 2, requires_grad=True)
    outputs = {"semantic_seg": seg, "img_ids": torch.tensor([0, 0])}
    values = PromptIdentityLoss(WEIGHTS)(outputs=outputs, targets=_targets([[], []]), indices=None, num_boxes=1)
    assert values["loss_identity_ce"].item() == pytest.approx(math.log(3), rel=1e-5)
    assert values["loss_identity_dice"].item() == 0.0
    values["core_loss"].backward()
    assert torch.isfinite(seg.grad).all()
    # Sam3LossWrapper also calls loss_fns_find on the one-to-many queries' outputs (no semantic
    # map there) and on auxiliary layers: nothing to add.
    loss = PromptIdentityLoss(WEIGHTS)
    assert loss(outputs={"pred_logits": torch.zeros(1, 2, 1)}, targets={}, indices=None, num_boxes=1) == {"core_loss": 0.0}
    assert loss(outputs=outputs, targets={}, indices=None, num_boxes=1, is_aux=True) == {"core_loss": 0.0}


def test_upsampled_logits_and_downsampled_targets():
    # SemanticSegCriterion's two resize modes: logits 2×2 vs targets 4×4
    seg = torch.randn(2, 1, 2, 2)
    truth = torch.zeros(2, 4, 4, dtype=torch.bool)
    truth[0, :, :2] = True
    truth[1, :, 2:] = True
    targets = {"masks": truth, "num_boxes": torch.tensor([1, 1]), "semantic_masks": None}
    outputs = {"semantic_seg": seg, "img_ids": torch.tensor([0, 0])}
    logits, labels = stack_prompt_logits(outputs, targets, downsample=False)
    assert logits.shape == (1, 3, 4, 4) and labels[0, 0].tolist() == [1, 1, 2, 2]
    logits, labels = stack_prompt_logits(outputs, targets, downsample=True)
    assert logits.shape == (1, 3, 2, 2) and labels[0].tolist() == [[1, 2], [1, 2]]


def test_a_nan_logit_reaches_the_guard_as_a_bad_step():
    """No exception and no masking: the loss is non-finite, GuardedTrainer's guard skips the step."""
    from angioexp.backends.sam3.trainer import Sam3NanGuard

    seg = torch.tensor([[[[0.0, float("nan")]]], [[[0.0, 1.0]]]])
    values = PromptIdentityLoss(WEIGHTS)(outputs={"semantic_seg": seg, "img_ids": torch.tensor([0, 0])},
                                         targets=_targets([[_mask(0)], [_mask(1)]]), indices=None, num_boxes=1)
    assert not math.isfinite(values["core_loss"].item())
    model = torch.nn.Linear(1, 1)
    guard = Sam3NanGuard(NanGuardConfig(), model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.check_loss(values["core_loss"], torch.device("cpu"))[0] == "loss"


def test_without_image_ids_it_says_what_it_needs():
    with pytest.raises(ValueError, match="outputs\\['img_ids'\\]"):
        stack_prompt_logits({"semantic_seg": torch.zeros(1, 1, 2, 2)}, _targets([[]]))


# --- SAM3's semantic head -------------------------------------------------------------------------------


def _two_prompt_batch():
    """One 336-px image, two text queries (two segments side by side), SAM3's batch layout."""
    from sam3.model.data_misc import BatchedDatapoint, BatchedFindTarget, FindStage

    generator = torch.Generator().manual_seed(2)
    masks = torch.zeros(2, 84, 84, dtype=torch.bool)
    masks[0, 20:60, 30:40] = True
    masks[1, 20:60, 44:54] = True
    boxes = torch.tensor([[0.417, 0.476, 0.119, 0.476], [0.583, 0.476, 0.119, 0.476]])  # cx, cy, w, h
    stage = FindStage(img_ids=torch.tensor([0, 0]), text_ids=torch.tensor([0, 1]),
                      input_boxes=torch.zeros(0, 2, 4), input_boxes_mask=torch.ones(2, 0, dtype=torch.bool),
                      input_boxes_label=torch.zeros(0, 2, dtype=torch.long),
                      input_points=torch.zeros(2, 0, 3), input_points_mask=torch.zeros(2, 0, dtype=torch.bool))
    target = BatchedFindTarget(num_boxes=torch.tensor([1, 1]), boxes=boxes, boxes_padded=boxes[:, None],
                               repeated_boxes=boxes, segments=masks, semantic_segments=None,
                               is_valid_segment=torch.tensor([True, True]), is_exhaustive=torch.tensor([True, True]),
                               object_ids=torch.tensor([0, 1]), object_ids_padded=torch.tensor([[0], [1]]))
    return BatchedDatapoint(img_batch=torch.randn(1, 3, 336, 336, generator=generator),
                            find_text_batch=["proximal segment", "distal segment"],
                            find_inputs=[stage], find_targets=[target], find_metadatas=[None])


def test_gradients_reach_the_semantic_head():
    from tests.test_sam3_act_ckpt import _tiny_sam3_model

    from angioexp.backends.sam3.cpu import cpu_shims

    model = _tiny_sam3_model()
    batch = _two_prompt_batch()
    with cpu_shims():
        out = model(batch)[-1]
        assert out["semantic_seg"].shape[:2] == (2, 1) and out["img_ids"].tolist() == [0, 0]
        values = PromptIdentityLoss(WEIGHTS)(outputs=out, targets=model.back_convert(batch.find_targets[0]),
                                             indices=out["indices"], num_boxes=2)
        values["core_loss"].backward()
    head = model.segmentation_head.semantic_seg_head
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    # through the pixel decoder into the prompt-conditioned encoder: the text tells the maps apart
    fusion = [p.grad for n, p in model.named_parameters() if n.startswith("transformer.encoder.") and p.grad is not None]
    assert fusion and any(g.abs().sum() > 0 for g in fusion)


# --- the generated config ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segment_coco(tmp_path_factory):
    """make_tiny_coco's vessel tree cut into two segment categories (left / right half of the
    frame), plus a third category present in no image (a negative query on every image)."""
    import pycocotools.mask as mask_utils

    coco = make_tiny_coco(tmp_path_factory.mktemp("coco") / "coco", n_train=2, n_val=1, size=336, seed=4)
    names = ["proximal segment", "distal segment", "side branch"]
    for split in ("train", "val"):
        path = coco / split / "annotations.json"
        data = json.loads(path.read_text())
        annotations = []
        for ann in data["annotations"]:
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode("ascii"))
            tree = mask_utils.decode(rle).astype(bool)
            for category, half in ((1, np.s_[:, :168]), (2, np.s_[:, 168:])):
                part = np.zeros_like(tree)
                part[half] = tree[half]
                encoded = mask_utils.encode(np.asfortranarray(part.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(encoded))
                encoded["counts"] = encoded["counts"].decode("ascii")
                annotations.append({**ann, "id": len(annotations) + 1, "category_id": category, "segmentation": encoded,
                                    "bbox": [x, y, w, h], "area": float(part.sum())})
        data["annotations"] = annotations
        data["categories"] = [{"id": i + 1, "name": n, "supercategory": "vessel"} for i, n in enumerate(names)]
        path.write_text(json.dumps(data))
    return coco


def _identity_nodes(sam3_cfg) -> list:
    return [f for f in sam3_cfg["trainer"]["loss"]["all"]["loss_fns_find"] if f["_target_"].endswith("PromptIdentityLoss")]


def test_generated_config_has_the_term_only_when_on(segment_coco, tmp_path):
    base = ["backend=sam3", "stage=2", "init_from=none", "scratch.resolution=336"]
    off = load_config(overrides=base)
    assert off.loss.identity.loss_identity_ce == 0 and off.loss.identity.loss_identity_dice == 0  # the sam3 default
    generated, _ = config_gen.build(off, coco_dir=segment_coco, out_dir=tmp_path / "off")
    assert _identity_nodes(generated) == []
    path = config_gen.generate(off, coco_dir=segment_coco, out_dir=tmp_path / "off")
    assert "PromptIdentityLoss" not in path.read_text().split("# angioexp config:")[0]

    on = load_config(overrides=base + ["loss.identity.loss_identity_ce=20", "loss.identity.loss_identity_dice=10",
                                       "loss.identity.class_weight_power=0.25"])
    path = config_gen.generate(on, coco_dir=segment_coco, out_dir=tmp_path / "on")
    header = path.read_text().split("# angioexp config:")[0]
    assert config_gen.IDENTITY_CHANGE in header
    composed = config_gen.compose(path)
    wrapper = instantiate(composed.trainer.loss.all, _convert_="all")
    (node,) = [f for f in wrapper.loss_fns_find if isinstance(f, PromptIdentityLoss)]
    assert node.weight_dict == {"loss_identity_ce": 20.0, "loss_identity_dice": 10.0}
    assert node.class_weight_power == 0.25 and node.downsample is False
    # SAM3's own terms keep their places (the recipe's loss_fns_find indices)
    find = composed.trainer.loss.all.loss_fns_find
    assert [f._target_.rsplit(".", 1)[-1] for f in find] == ["Boxes", "IABCEMdetr", "Masks", "PromptIdentityLoss"]


@pytest.mark.parametrize("override, key", [
    ("loss.identity.loss_identity_presence=5", "loss.identity.loss_identity_presence"),
    ("scratch.enable_segmentation=false", "scratch.enable_segmentation"),
])
def test_what_the_term_cannot_do_is_refused(segment_coco, tmp_path, override, key):
    cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", *IDENTITY_ON, override])
    with pytest.raises(ConfigError) as info:
        config_gen.build(cfg, coco_dir=segment_coco, out_dir=tmp_path / "run")
    assert info.value.key == key


# --- a short training run -----------------------------------------------------------------------------


@pytest.fixture()
def single_process_group(tmp_path):
    """Sam3LossWrapper normalises by an all_reduce over the trainer's process group (gloo on CPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("single_process_group")
def test_short_training_run_logs_finite_identity_terms(segment_coco, tmp_path):
    """Two optimizer steps at 336 px: SAM3's data pipeline, collate function and loss wrapper as
    the generated config instantiates them, a small SAM3 model from SAM3's builders, and
    GuardedTrainer's step (SAM3's Trainer._step logs every loss term)."""
    from sam3.train.optim.optimizer import Optimizer
    from sam3.train.utils.train_utils import AverageMeter
    from tests.test_sam3_act_ckpt import _tiny_sam3_model
    from tests.test_sam3_trainer import make_trainer

    from angioexp.backends.sam3.cpu import cpu_shims
    from angioexp.backends.sam3.writer import map_key

    cfg = load_config(overrides=["backend=sam3", "stage=2", "init_from=none", "scratch.resolution=336",
                                 "scratch.num_train_workers=0", "train.log_every=1", "prompts.num_points=[1,2]",
                                 *IDENTITY_ON])
    composed = config_gen.compose(config_gen.generate(cfg, coco_dir=segment_coco, out_dir=tmp_path / "run", device="cpu"))
    torch.manual_seed(0)
    dataset = instantiate(composed.trainer.data.train.dataset, _convert_="all")
    collate = instantiate(composed.scratch.collate_fn, _convert_="all")

    t = make_trainer(tmp_path, snapshot_every=0)  # SAM3's Optimizer wrapper, scaler, a recording logger
    del t._step  # SAM3's own Trainer._step this time: model → back_convert → loss → logged terms
    t.model = _tiny_sam3_model()
    t.loss = {"all": instantiate(composed.trainer.loss.all, _convert_="all")}
    t.meters = {}
    t.optim = Optimizer(torch.optim.AdamW(t.model.parameters(), lr=1e-3), schedulers=[{"lr": lambda where: 1e-3}])
    t._install_guard()
    head = t.model.segmentation_head.semantic_seg_head.weight
    before = head.detach().clone()

    loss_key = "Losses/train_all_loss"
    meters = {loss_key: AverageMeter(loss_key, t.device, ":.2e")}
    with cpu_shims():
        for index in range(2):
            batch = collate([dataset[index]])
            assert len(batch["all"].find_text_batch) == 3  # every category queried: 2 segments + 1 absent
            t._run_step(batch, "train", meters, {})
            t.optim.optimizer.step()

    assert t.guard.events == 0 and t.steps["train"] == 2
    logged = {(map_key(name), step): value for name, value, step in t.logger.logged if map_key(name)}
    for step in (0, 1):
        for term in ("train/loss_identity_ce", "train/loss_identity_dice", "train/loss_semantic_seg", "train/loss"):
            assert math.isfinite(logged[(term, step)]), (term, step)
        assert logged[("train/loss_identity_ce", step)] > 0
    assert not torch.equal(before, head.detach())  # the step changed the semantic head
