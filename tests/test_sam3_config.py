"""angioexp.backends.sam3.config_gen: the generated SAM3 config composes with Hydra, says what the
angioexp config says (golden key values), and its data pipeline delivers point prompts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sam3", reason="needs the sam3 package (run with /work/venv-sam3/bin/python -m pytest -m sam3)")
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from angioexp.backends.sam3 import config_gen  # noqa: E402
from angioexp.backends.sam3.gpu_check import make_tiny_coco  # noqa: E402
from angioexp.config import load_config  # noqa: E402
from angioexp.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.sam3

OVERRIDES = [
    "backend=sam3", "scratch.resolution=672", "scratch.lr_scale=0.02", "scratch.wd=0.05",
    "scratch.train_batch_size=1", "train.max_steps=4", "train.log_every=5",
    "loss.masks.loss_mask=5", "loss.masks.loss_dice=5", "loss.iabce.pos_weight=5",
    "loss.semantic.loss_semantic_seg=5", "loss.semantic.focal_gamma=1.6",
    "matcher.cost_bbox=3", "matcher.cost_giou=4", "o2m.enabled=true",
    "prompts.num_points=[5,15]", "prompts.box_chance=0.2", "optim.gradient_clip.max_norm=0.2",
    "nan_guard.max_consecutive=2", "seed=3",
]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("coco") / "coco", n_train=2, n_val=1, size=160, seed=1)


@pytest.fixture(scope="module")
def composed(coco, tmp_path_factory):
    cfg = load_config(overrides=OVERRIDES)
    out = tmp_path_factory.mktemp("run")
    path = config_gen.generate(cfg, coco_dir=coco, out_dir=out, device="cpu")
    return path, config_gen.compose(path), out


def _find(items, suffix):
    return next(x for x in items if x["_target_"].endswith(suffix))


def test_golden_values(composed):
    path, c, out = composed
    t = c.trainer
    assert path.read_text().startswith("# @package _global_")
    assert "point prompts reach the geometry" in path.read_text()  # the CHANGES header
    golden = {
        "scratch.resolution": 672,
        "scratch.lr_transformer": pytest.approx(8e-4 * 0.02),
        "scratch.lr_vision_backbone": pytest.approx(2.5e-4 * 0.02),
        "scratch.lr_language_backbone": pytest.approx(5e-5 * 0.02),
        "scratch.wd": 0.05,
        "scratch.enable_segmentation": True,
        "scratch.matcher.cost_bbox": 3.0,
        "scratch.collate_fn.input_points_embedding_dim": 3,
        "trainer._target_": "angioexp.backends.sam3.trainer.GuardedTrainer",
        "trainer.accelerator": "cpu",
        "trainer.distributed.backend": "gloo",
        "trainer.optim.amp.enabled": False,  # AMP is CUDA only
        "trainer.optim.gradient_clip.max_norm": 0.2,
        "trainer.max_epochs": 2,  # 2 images per epoch, 4 steps
        "trainer.seed_value": 3,
        "trainer.nan_guard.max_consecutive": 2,
        "trainer.model._target_": "angioexp.backends.sam3.model.build_sam3_model",
        "trainer.model.resolution": 672,
        "trainer.model.matcher.cost_bbox": 3.0,
        "trainer.model.matcher.cost_giou": 4.0,
        "trainer.loss.all.o2m_weight": 2.0,
        "trainer.logging.tensorboard_writer._target_": "angioexp.backends.sam3.writer.make_mlflow_writer",
        "trainer.logging.log_scalar_frequency": 5,
        "trainer.meters.val.angio.segm.iou_type": "segm",
        "trainer.meters.val.angio.segm.postprocessor.use_original_sizes_mask": True,
        "trainer.meters.val.angio.segm.postprocessor.always_interpolate_masks_on_gpu": False,
        "trainer.checkpoint.save_dir": str(out.resolve() / "sam3" / "checkpoints"),
    }
    for key, expected in golden.items():
        node = c
        for part in key.split("."):
            node = node[part]
        assert node == expected, key
    losses = t.loss.all.loss_fns_find
    assert dict(_find(losses, "Masks").weight_dict) == {"loss_mask": 5.0, "loss_dice": 5.0}
    assert _find(losses, "IABCEMdetr").pos_weight == 5.0
    semantic = t.loss.all.loss_fn_semantic_seg
    assert semantic._target_ == "sam3.train.loss.loss_fns.SemanticSegCriterion"
    assert semantic.weight_dict.loss_semantic_seg == 5.0 and semantic.focal_gamma == 1.6 and not semantic.presence_loss
    lr = t.optim.options.lr
    assert [s.scheduler.base_lr for s in lr] == pytest.approx([1.6e-5, 5e-6, 1e-6])
    prompts = _find(t.data.train.dataset.transforms[0].transforms, "CentrelinePrompts")
    assert list(prompts.num_points) == [5, 15] and prompts.box_chance == 0.2
    assert t.model.bpe_path.endswith("bpe_simple_vocab_16e6.txt.gz")


def test_losses_and_datasets_instantiate(composed):
    _, c, _ = composed
    loss = instantiate(c.trainer.loss.all, _convert_="all")
    assert type(loss).__name__ == "Sam3LossWrapper" and loss.o2m_weight == 2.0
    assert instantiate(c.trainer.data.val.dataset, _convert_="all")[0].find_queries[0].query_text == "coronary artery"


def test_points_reach_the_batch_on_the_vessels(composed):
    """SAM3's real data pipeline with our transform: 5–15 prompts per query, on the vessel mask."""
    from angioexp.backends.sam3.model import Sam3ImageWithPoints

    _, c, _ = composed
    torch.manual_seed(0)
    dataset = instantiate(c.trainer.data.train.dataset, _convert_="all")
    collate = instantiate(c.scratch.collate_fn, _convert_="all")
    batch = collate([dataset[0], dataset[1]])["all"]
    stage, target = batch.find_inputs[0], batch.find_targets[0]
    points, pad = stage.input_points, stage.input_points_mask.bool()
    assert points.shape[0] == 2 and points.shape[-1] == 3
    n_boxes = (~stage.input_boxes_mask.bool()).sum(1)
    n_points = (~pad).sum(1)
    assert ((n_points + n_boxes >= 5) & (n_points + n_boxes <= 15)).all()  # a box stands in for a point
    masks = target.segments  # (2, 672, 672): one vessel tree per image
    for q in range(2):
        xy = points[q][~pad[q]][:, :2] * 672
        hits = [masks[q, max(int(y) - 1, 0):int(y) + 2, max(int(x) - 1, 0):int(x) + 2].any() for x, y in xy.tolist()]
        assert all(hits), "every positive point lies on the vessel (±1 px after resizing)"
    kwargs = Sam3ImageWithPoints.point_prompt_kwargs(stage)
    assert kwargs["point_embeddings"].shape == (points.shape[1], 2, 2)


def test_stage2_text_prompts(tmp_path):
    coco = make_tiny_coco(tmp_path / "coco", n_train=1, n_val=1, size=96)
    for split in ("train", "val"):
        ann = coco / split / "annotations.json"
        data = json.loads(ann.read_text())
        data["categories"] = [{"id": 1, "name": "lad_proximal", "prompt": "proximal left anterior descending"}]
        ann.write_text(json.dumps(data))
    cfg = load_config(overrides=["backend=sam3", "stage=2", "scratch.resolution=336", "init_from=none",
                              "scratch.train_batch_size=1"])
    c = config_gen.compose(config_gen.generate(cfg, coco_dir=coco, out_dir=tmp_path / "run"))
    dataset = instantiate(c.trainer.data.val.dataset, _convert_="all")
    assert dataset[0].find_queries[0].query_text == "proximal left anterior descending"


@pytest.mark.parametrize("override, key", [
    ("loss.semantic.presence_loss=true", "loss.semantic.presence_loss"),
    ("scratch.resolution=512", "scratch.resolution"),
    ("train.budget_minutes=5", "train.budget_minutes"),
    ("loss.masks.resize=targets_sam3", "loss.masks.resize"),
])
def test_settings_sam3_cannot_honour_are_rejected(coco, tmp_path, override, key):
    cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_gen.generate(cfg, coco_dir=coco, out_dir=tmp_path)
    assert not (tmp_path / "sam3_config").exists()  # nothing half-written


def test_schedule_from_max_steps():
    cfg = load_config(overrides=["backend=sam3", "scratch.train_batch_size=2", "train.max_steps=25"])
    assert config_gen.schedule(cfg, 20) == (3, 10, None)  # 10 steps/epoch, 3 epochs ≥ 25 steps
    cfg = load_config(overrides=["backend=sam3", "scratch.train_batch_size=2", "train.max_steps=3"])
    assert config_gen.schedule(cfg, 20) == (1, 3, 6)  # one short epoch on a fixed 6-image subset
    cfg = load_config(overrides=["backend=sam3", "sam3.steps_per_epoch=4", "sam3.max_epochs=7"])
    assert config_gen.schedule(cfg, 100)[:2] == (7, 4)


def test_image_paths_of_angioexp_convert_and_plain_coco(tmp_path):
    """`angioexp convert` writes file_name 'images/x.png' (relative to the split folder), plain
    COCO 'x.png' inside images/: both resolve; a missing or escaping file is an InputError."""
    from angioexp.errors import InputError

    coco = make_tiny_coco(tmp_path / "coco", n_train=1, n_val=1, size=64)
    cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336"])
    sam3_cfg, _ = config_gen.build(cfg, coco_dir=coco, out_dir=tmp_path / "a")
    assert sam3_cfg["trainer"]["data"]["train"]["dataset"]["img_folder"] == str((coco / "train" / "images").resolve())
    for split in ("train", "val"):
        ann = coco / split / "annotations.json"
        data = json.loads(ann.read_text())
        for image in data["images"]:
            image["file_name"] = f"images/{image['file_name']}"
        ann.write_text(json.dumps(data))
    sam3_cfg, _ = config_gen.build(cfg, coco_dir=coco, out_dir=tmp_path / "b")
    assert sam3_cfg["trainer"]["data"]["train"]["dataset"]["img_folder"] == str((coco / "train").resolve())
    data["images"][0]["file_name"] = "../../outside.png"
    (coco / "val" / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="file_name"):
        config_gen.build(cfg, coco_dir=coco, out_dir=tmp_path / "c")
