"""Batches of find queries: the targets contract, step-keyed determinism, prompts, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from angioexp.config import load_config
from angioexp.errors import ConfigError
from angioexp.train.data import EvalSet, TrainingSet
from tests.helpers.vessel_coco import STAGE2_LABELS, make_vessel_coco


@pytest.fixture(scope="module")
def coco1(tmp_path_factory):
    return make_vessel_coco(tmp_path_factory.mktemp("d1"), stage=1, size=64, n_train=6, n_val=3, empty_train_images=1)


@pytest.fixture(scope="module")
def coco2(tmp_path_factory):
    return make_vessel_coco(tmp_path_factory.mktemp("d2"), stage=2, size=64, n_train=6, n_val=3, seed=1)


def _cfg(*overrides, stage=1):
    return load_config(None, ["init_from=none", "scratch.resolution=64", "scratch.train_batch_size=3", *overrides], stage=stage)


def _check_contract(batch):
    t = batch.targets
    n = int(t["num_boxes"].sum())
    b = len(batch.queries)
    assert t["masks"].shape[0] == n == t["boxes"].shape[0] == t["boxes_xyxy"].shape[0]
    assert t["masks"].dtype == torch.bool and t["semantic_masks"].shape[0] == b
    assert t["view_labels"].shape == (batch.images.shape[0],)
    assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
    # each instance mask lies inside its box, and the union equals the semantic mask
    start = 0
    for i, k in enumerate(t["num_boxes"].tolist()):
        union = t["masks"][start:start + k].any(0) if k else torch.zeros_like(t["semantic_masks"][i])
        assert torch.equal(union, t["semantic_masks"][i])
        start += k
    size = batch.images.shape[-1]
    for m, (x0, y0, x1, y1) in zip(t["masks"], t["boxes_xyxy"].tolist()):
        ys, xs = m.nonzero(as_tuple=True)
        assert xs.min() == round(x0 * size) and xs.max() + 1 == round(x1 * size)
        assert ys.min() == round(y0 * size) and ys.max() + 1 == round(y1 * size)


def test_stage1_batch_follows_the_contract_and_crops(coco1):
    data = TrainingSet(coco1, _cfg("scratch.crop_size=32"), num_views=10)
    batch = data.batch(0)
    assert batch.images.shape == (3, 1, 32, 32) and batch.images.dtype == torch.uint8
    assert len(batch.queries) == 3  # one "coronary artery" query per image
    assert batch.targets["masks"].shape[-2:] == (32, 32)
    _check_contract(batch)


def test_image_without_annotations_gives_a_negative_query(coco1):
    data = TrainingSet(coco1, _cfg("scratch.train_batch_size=6"), num_views=10)
    empty = [i for i, s in enumerate(data.samples) if not s.instances]
    assert len(empty) == 1
    batch = data.batch(0)
    slot = batch.image_ids.index(data.samples[empty[0]].image_id)
    rows = (batch.queries.img_idx == slot).nonzero(as_tuple=True)[0]
    assert len(rows) == 1 and batch.targets["num_boxes"][rows[0]] == 0
    assert not batch.targets["semantic_masks"][rows[0]].any()


def test_batches_are_keyed_by_step_not_by_history(coco1):
    cfg = _cfg("scratch.crop_size=32", "prompts.num_points=[1,3]", "prompts.box_chance=0.5")
    a, b = TrainingSet(coco1, cfg, num_views=10), TrainingSet(coco1, cfg, num_views=10)
    for _ in range(3):
        a.batch(_)
    first, again = a.batch(7), b.batch(7)  # b never saw steps 0..6
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.targets["masks"], again.targets["masks"])
    assert torch.equal(first.queries.point_coords, again.queries.point_coords)
    assert not torch.equal(a.batch(8).images, first.images)


def test_every_image_is_seen_once_per_epoch_and_ranks_split_the_global_batch(coco1):
    data = TrainingSet(coco1, _cfg(), num_views=10)
    epoch0 = data.indices_for_step(0, 3) + data.indices_for_step(1, 3)
    assert sorted(epoch0) == list(range(6))
    rank0, rank1 = data.indices_for_step(0, 3, rank=0, world=2), data.indices_for_step(0, 3, rank=1, world=2)
    assert sorted(rank0 + rank1) == list(range(6))


def test_stage2_queries_present_and_absent_segments(coco2):
    cfg = _cfg("loss.per_prompt=true", "prompts.positives_per_image=2", "prompts.negatives_per_image=1", stage=2)
    data = TrainingSet(coco2, cfg, num_views=10)
    batch = data.batch(0)
    _check_contract(batch)
    for slot in range(3):
        rows = (batch.queries.img_idx == slot).nonzero(as_tuple=True)[0].tolist()
        present = [r for r in rows if batch.targets["num_boxes"][r] > 0]
        assert 1 <= len(present) <= 2 and len(rows) - len(present) <= 1
        cats = [batch.category_ids[r] for r in rows]
        assert len(set(cats)) == len(cats) and set(cats) <= set(STAGE2_LABELS)
    # the text prompt is the segment's words
    tok = data.tokenizer
    for r, cat in enumerate(batch.category_ids):
        assert batch.queries.text_ids[r, : len(tok.encode(data.prompts[cat]))].tolist() == tok.encode(data.prompts[cat])


def test_points_and_boxes_come_from_the_target(coco1):
    cfg = _cfg("prompts.num_points=[2,2]", "prompts.box_chance=1.0", "scratch.hflip_prob=0")
    batch = TrainingSet(coco1, cfg, num_views=10).batch(1)
    for r in range(len(batch.queries)):
        if batch.targets["num_boxes"][r] == 0:
            assert (batch.queries.point_labels[r] == -1).all()
            continue
        sem = batch.targets["semantic_masks"][r]
        labels = batch.queries.point_labels[r]
        # a box stands in for one of the n points (SAM3's rule)
        assert (labels == 1).sum() == 1 and batch.queries.box_valid[r, 0]
        x, y = (batch.queries.point_coords[r, 0] * 64).long().tolist()
        assert sem[y, x]  # positive points lie on the vessel
        first_instance = int(batch.targets["num_boxes"][:r].sum())  # Stage 1: one instance per query
        assert torch.allclose(batch.queries.boxes[r, 0], batch.targets["boxes_xyxy"][first_instance])


def test_flipped_images_have_an_unknown_view(coco1):
    flip = TrainingSet(coco1, _cfg("scratch.hflip_prob=1"), num_views=10).batch(0)
    keep = TrainingSet(coco1, _cfg("scratch.hflip_prob=0"), num_views=10).batch(0)
    assert (flip.targets["view_labels"] == -1).all() and (flip.queries.views == 10).all()
    assert torch.equal(flip.images, keep.images.flip(-1))
    assert (keep.targets["view_labels"] >= 0).any()


def test_eval_set_queries_every_category_on_whole_images(coco2):
    cfg = _cfg(stage=2)
    data = EvalSet(coco2, cfg, "val", num_views=10)
    batches = list(data.batches(2))
    assert [len(b.image_ids) for b, _ in batches] == [2, 1]
    batch, sizes = batches[0]
    assert batch.images.shape == (2, 1, 64, 64) and sizes == [(64, 64), (64, 64)]
    assert len(batch.queries) == 2 * len(STAGE2_LABELS)


def test_images_are_resized_to_the_working_resolution(coco1):
    data = TrainingSet(coco1, _cfg("scratch.resolution=32"), num_views=10)
    assert data.samples[1].pixels.shape == (32, 32)
    assert all(np.all(np.array(inst.mask.shape) <= 32) for s in data.samples for inst in s.instances)


def test_core_stage2_default_builds_no_prompt_queries(coco2):
    batch = TrainingSet(coco2, _cfg(stage=2), num_views=10).batch(0)  # loss.per_prompt=false
    assert batch.queries.img_idx.numel() == 0 and batch.category_ids == []


def test_stage2_never_flips_because_segment_names_are_side_specific(coco2):
    # the config says so (its Stage 2 default is 0 and a flip is refused there), the loader obeys it
    with pytest.raises(ConfigError, match=r"key 'scratch\.hflip_prob': 1\.0 contradicts stage=2"):
        _cfg("scratch.hflip_prob=1", stage=2)
    cfg = _cfg(stage=2)
    assert cfg.scratch.hflip_prob == 0
    default = TrainingSet(coco2, cfg, num_views=10).batch(0)
    keep = TrainingSet(coco2, _cfg("scratch.hflip_prob=0", stage=2), num_views=10).batch(0)
    assert torch.equal(default.images, keep.images) and (default.targets["view_labels"] >= 0).any()


@pytest.mark.parametrize("shape,size", [((512, 512), 256), ((512, 512), 128), ((384, 512), 128), ((500, 500), 256)])
def test_mask_resizing_is_a_box_average_thresholded_at_half(shape, size):
    """The block-count path (whole-number factors) gives PIL's box filter exactly; other sizes use it."""
    from PIL import Image

    from angioexp.train.data import _resize_mask

    rng = np.random.default_rng(0)
    masks = [rng.random(shape) < p for p in (0.02, 0.3, 0.5, 0.9)] + [np.zeros(shape, dtype=bool)]
    thin = np.zeros(shape, dtype=bool)
    thin[100:103, 40:300] = True  # a 3-px vessel: some blocks exactly half covered
    for mask in [*masks, thin]:
        expected = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.BOX)) >= 0.5
        assert np.array_equal(_resize_mask(mask, size), expected)
