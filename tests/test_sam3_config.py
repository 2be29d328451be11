"""angioexp.backends.sam3.config_gen: the generated SAM3 config composes with Hydra, says what the
angioexp config says (golden key values), and its data pipeline delivers point prompts."""

from __future__ import annotations

import json

import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)
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
    assert config_gen.schedule(cfg, 20)[:3] == (3, 10, None)  # 10 steps/epoch, 3 epochs ≥ 25 steps
    cfg = load_config(overrides=["backend=sam3", "scratch.train_batch_size=2", "train.max_steps=3"])
    assert config_gen.schedule(cfg, 20)[:3] == (1, 3, 6)  # one short epoch on a fixed 6-image subset
    cfg = load_config(overrides=["backend=sam3", "sam3.steps_per_epoch=4", "sam3.max_epochs=7"])
    assert config_gen.schedule(cfg, 100)[:2] == (7, 4)


def test_schedule_counts_optimizer_steps_across_gpus():
    """SAM3's DistributedSampler gives each of G ranks 1/G of the images: an epoch is G× fewer
    optimizer steps, so train.max_steps needs G× the epochs (and a subset G× the images)."""
    cfg = load_config(overrides=["backend=sam3", "scratch.train_batch_size=2", "train.max_steps=25"])
    epochs, steps, limit, _ = config_gen.schedule(cfg, 20, world_size=4)
    assert (steps, limit) == (2, None) and epochs * steps >= 25 and epochs == 13
    cfg = load_config(overrides=["backend=sam3", "scratch.train_batch_size=1", "train.max_steps=3"])
    assert config_gen.schedule(cfg, 100, world_size=4)[:3] == (1, 3, 12)  # 3 steps × 1 image × 4 ranks
    with pytest.raises(Exception, match="each of 4"):
        config_gen.schedule(cfg, 3, world_size=4)


def test_eval_every_becomes_whole_epochs():
    cfg = load_config(overrides=["backend=sam3", "scratch.train_batch_size=1", "train.eval_every=25"])
    assert config_gen.schedule(cfg, 10)[3] == 3  # 10 steps per epoch: every 3rd epoch (30 steps)
    cfg = load_config(overrides=["backend=sam3", "train.eval_every=25", "sam3.val_epoch_freq=1"])
    assert config_gen.schedule(cfg, 10)[3] == 1


# --- SAM3's recipe where the user set nothing; every key honoured or refused --------------------------


def test_sam3_recipe_is_the_default(coco, tmp_path):
    """Nothing set: SAM3's fine-tuning recipe, and the header lists only angioexp's intended
    differences, each with its reason."""
    cfg = load_config(backend="sam3")
    path = config_gen.generate(cfg, coco_dir=coco, out_dir=tmp_path, device="cuda")
    c = config_gen.compose(path)
    assert c.scratch.resolution == 1008 and c.scratch.num_train_workers == 10
    resize = _find(c.trainer.data.train.dataset.transforms[0].transforms, "RandomResizeAPI")
    assert list(resize.sizes) == list(range(480, 1009, 32))  # SAM3's multi-scale sizes, then padding
    assert _find(c.trainer.data.train.dataset.transforms[0].transforms, "PadToSizeAPI").size == 1008
    assert c.trainer.meters.val.angio.segm.postprocessor.max_dets_per_img == -1
    assert (c.trainer.cuda.cudnn_deterministic, c.trainer.cuda.cudnn_benchmark) == (False, True)
    assert not [t for t in c.trainer.data.train.dataset.transforms[0].transforms if t._target_.endswith("Flip")]
    header = path.read_text().split("\ndefaults:")[0]
    differences = header.split("differ from SAM3's recipe")[1].split("# angioexp config:")[0]
    listed = [line for line in differences.splitlines() if line.startswith("#   - ")]
    assert listed and "set in the angioexp config" not in differences
    for key in ("scratch.enable_segmentation", "trainer._target_", "scratch.matcher._target_", "trainer.val_epoch_freq"):
        assert any(line.startswith(f"#   - {key}:") for line in listed), key
    sam3_cfg, _ = config_gen.build(cfg, coco_dir=coco, out_dir=tmp_path, device="cpu")  # on CPU: said why
    assert any("AMP is CUDA-only" in d for d in config_gen.recipe_differences(sam3_cfg))


def test_user_settings_are_listed_as_differences(coco, tmp_path):
    cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", "scratch.num_train_workers=0"])
    sam3_cfg, _ = config_gen.build(cfg, coco_dir=coco, out_dir=tmp_path, device="cuda")
    differences = config_gen.recipe_differences(sam3_cfg)
    assert "scratch.resolution: 336 (SAM3: 1008) — set in the angioexp config" in differences
    assert "scratch.num_train_workers: 0 (SAM3: 10) — set in the angioexp config" in differences


@pytest.mark.parametrize("override, path, expected", [
    ("train.deterministic=true", "trainer.cuda.cudnn_deterministic", True),
    ("train.deterministic=true", "trainer.cuda.cudnn_benchmark", False),
    ("scratch.num_train_workers=3", "trainer.data.train.num_workers", 3),
    ("sam3.max_dets_per_img=50", "trainer.meters.val.angio.segm.postprocessor.max_dets_per_img", 50),
    ("sam3.resize_min_size=224", "scratch.train_resize_sizes", [224, 256, 288, 320]),
    ("sam3.resize_min_size=null", "scratch.train_resize_sizes", [336]),
    ("sam3.resize_min_size=480", "scratch.train_resize_sizes", [336]),  # SAM3's floor above 336 px: one size
    ("train.eval_every=1", "trainer.val_epoch_freq", 1),
])
def test_keys_sam3_used_to_ignore_are_honoured(coco, tmp_path, override, path, expected):
    cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", override])
    node = config_gen.compose(config_gen.generate(cfg, coco_dir=coco, out_dir=tmp_path))
    for part in path.split("."):
        node = node[part]
    assert (list(node) if isinstance(expected, list) else node) == expected


def test_hflip_is_sam3s_flip_in_stage1_and_refused_in_stage2(coco, tmp_path):
    cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", "scratch.hflip_prob=0.5",
                                 "prompts.num_points=[2,2]"])
    c = config_gen.compose(config_gen.generate(cfg, coco_dir=coco, out_dir=tmp_path / "s1"))
    names = [t._target_.rsplit(".", 1)[1] for t in c.trainer.data.train.dataset.transforms[0].transforms]
    assert names.index("CentrelinePrompts") < names.index("RandomHorizontalFlip") < names.index("RandomResizeAPI")
    flip = _find(c.trainer.data.train.dataset.transforms[0].transforms, "RandomHorizontalFlip")
    assert flip.p == 0.5
    # SAM3's flip moves our prompts with the image: every point stays on the (flipped) vessel
    import random

    random.seed(0)
    torch.manual_seed(0)
    dataset = instantiate(c.trainer.data.train.dataset, _convert_="all")
    collate = instantiate(c.scratch.collate_fn, _convert_="all")
    for _ in range(3):
        batch = collate([dataset[0]])["all"]
        stage, masks = batch.find_inputs[0], batch.find_targets[0].segments
        for x, y in (stage.input_points[0][~stage.input_points_mask[0].bool()][:, :2] * 336).tolist():
            assert masks[0, max(int(y) - 1, 0):int(y) + 2, max(int(x) - 1, 0):int(x) + 2].any()
    with pytest.raises(ConfigError, match="scratch.hflip_prob"):  # refused when the config loads
        load_config(overrides=["backend=sam3", "stage=2", "init_from=none", "scratch.resolution=336",
                               "scratch.hflip_prob=0.5"])


def test_clean_validation_labels_are_used(coco, tmp_path):
    import shutil

    shutil.copyfile(coco / "val" / "annotations.json", coco / "val" / "annotations_gt.json")
    try:
        for flag, name in (("true", "annotations_gt.json"), ("false", "annotations.json")):
            cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", f"data.use_clean_val_labels={flag}"])
            sam3_cfg, _ = config_gen.build(cfg, coco_dir=coco, out_dir=tmp_path)
            assert sam3_cfg["trainer"]["data"]["val"]["dataset"]["ann_file"].endswith(name)
    finally:
        (coco / "val" / "annotations_gt.json").unlink()


@pytest.mark.parametrize("override, key", [
    ("model.d_model=64", "model.d_model"),
    ("loss.view.loss_view=1", "loss.view.loss_view"),
    ("train.ema_decay=0.9", "train.ema_decay"),
    ("scratch.crop_size=256", "scratch.crop_size"),
    ("prompts.negatives_per_image=5", "prompts.negatives_per_image"),
    ("eval.mask_threshold=0.3", "eval.mask_threshold"),
    ("loss.semantic.resize=targets_area", "loss.semantic.resize"),
    ("sam3.resize_min_size=16", "sam3.resize_min_size"),
    ("sam3.max_dets_per_img=0", "sam3.max_dets_per_img"),
    ("sam3.val_epoch_freq=0", "sam3.val_epoch_freq"),
])
def test_keys_sam3_cannot_honour_are_refused_when_set(coco, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # when loaded (sam3.*) or generated
        cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", override])
        config_gen.generate(cfg, coco_dir=coco, out_dir=tmp_path)


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


# Keys the parent process reads (train_sam3, the CLI, tracking, angioexp's own evaluation of
# SAM3's predictions), so they do not show in the generated config; and the approximated one.
READ_BY_THE_PARENT = ("data.", "tracking.", "eval.tolerance_px", "eval.score_threshold", "eval.overlays",
                      "train.out_dir", "train.device", "train.threads", "init_from", "sam3.checkpoint",
                      "sam3.bpe_path", "stage", "backend")
APPROXIMATED = ("train.checkpoint_every",)
OTHER_VALUE = {  # where "the next value" is not valid or changes nothing
    "scratch.resolution": 672, "sam3.resize_min_size": 224, "optim.amp.amp_dtype": "float16",
    "loss.semantic.resize": "targets_sam3", "loss.masks.resize": "targets_sam3",
    "prompts.point_sample_mode": "random", "prompts.num_points": [2, 3], "optim.betas": [0.8, 0.99],
    "model.encoder_channels": [8, 8, 16, 16], "scratch.crop_size": 256, "train.ema_decay": 0.9,
    "train.budget_minutes": 5, "prompts.box_noise_max": 5.0, "loss.iabce.pad_n_queries": 100,
    "sam3.max_epochs": 3, "sam3.steps_per_epoch": 1,
    "sam3.val_epoch_freq": 2, "sam3.checkpoint_prefix": "model.sam.", "loss.semantic.presence_loss": True,
    "prompts.box_chance": 0.5, "eval.mask_threshold": 0.25, "scratch.hflip_prob": 0.5, "data.max_val_images": 1,
}


def _other_value(key, value):
    if key in OTHER_VALUE:
        return OTHER_VALUE[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, str):
        return value + "_other"
    raise AssertionError(f"no other value for {key}={value!r}: add it to OTHER_VALUE")


def test_every_key_is_honoured_or_refused(tmp_path):
    """Each angioexp key, set to another valid value with the sam3 backend, either changes the
    generated SAM3 config or is refused naming the key — none is silently ignored."""
    from angioexp.config import all_keys, flatten

    coco = make_tiny_coco(tmp_path / "coco", n_train=2, n_val=1, size=64)
    (coco / "val" / "annotations_gt.json").write_text((coco / "val" / "annotations.json").read_text())
    # prompts, point-sampled mask losses and the identity term on, so that prompts.*,
    # loss.masks.*_ratio and loss.identity.class_weight_power are in effect
    base = ["backend=sam3", "scratch.resolution=336", "prompts.num_points=[1,2]", "loss.masks.num_sample_points=500",
            "loss.identity.loss_identity_ce=20"]
    reference_cfg = load_config(overrides=base)
    reference, _ = config_gen.build(reference_cfg, coco_dir=coco, out_dir=tmp_path / "run", device="cuda")
    defaults = flatten(reference_cfg)
    ignored = []
    for key in all_keys():
        if key.startswith(READ_BY_THE_PARENT) and key not in ("data.max_val_images", "data.use_clean_val_labels"):
            continue
        try:  # refused at load time (a contradiction or the field's own check) or by the generator
            cfg = load_config(overrides=base + [f"{key}={json.dumps(_other_value(key, defaults[key]))}"])
            generated, notes = config_gen.build(cfg, coco_dir=coco, out_dir=tmp_path / "run", device="cuda")
        except ConfigError as exc:
            assert exc.key == key, (key, str(exc))
            continue
        if key in APPROXIMATED:
            assert any(note.startswith(key) for note in notes), key
        elif generated == reference:
            ignored.append(key)
    assert ignored == [], f"set with the sam3 backend, these keys change nothing: {ignored}"
