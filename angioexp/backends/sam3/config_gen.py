"""angioexp ``Config`` → a complete SAM3 Hydra training config.

The PyPI ``sam3`` wheel ships no Hydra configs, and SAM3's examples need hand edits (paths,
``<BPE_PATH>``, a commented-out segmentation loss whose ``_target_`` names a module that does
not exist: ``sam3.losses.loss_fns``). :func:`generate` writes the whole config from the angioexp
config, following ``roboflow_v100_full_ft_100_images.yaml`` (SAM3's fine-tuning example) with
its segmentation loss enabled, and :func:`compose` loads it back through Hydra exactly as
SAM3's ``train.py`` does.

What angioexp changes against SAM3's example, and why, is in :data:`CHANGES` (also written into
the config's header). Settings that SAM3's trainer cannot honour are rejected with
``ConfigError`` (:func:`check_supported`); core-only settings are listed in the header notes.

Key mapping (angioexp → SAM3):

=============================================  ===================================================
``scratch.*`` (resolution, lr_scale, wd, …)    ``scratch.*`` (same names; LRs via ``${times:…}``)
``matcher.*``                                  model's one-to-one matcher (``trainer.model.matcher``)
                                               and ``scratch.matcher`` (aux one-to-many fallback)
``o2m.*``                                      ``loss.o2m_matcher`` / ``o2m_weight`` (0 when off)
``loss.boxes/iabce/masks/semantic.*``          ``Boxes`` / ``IABCEMdetr`` / ``Masks`` /
                                               ``SemanticSegCriterion``
``loss.identity.*`` (CE/Dice weight > 0)       + :class:`~angioexp.backends.sam3.identity_loss.PromptIdentityLoss`
                                               (opt-in; off at the sam3 defaults)
``prompts.*``                                  :class:`~angioexp.backends.sam3.transforms.CentrelinePrompts`
``optim.*``                                    ``trainer.optim`` (AdamW, clip, AMP on CUDA)
``nan_guard.*``                                ``trainer.nan_guard`` (:class:`GuardedTrainer`)
``train.max_steps``                            epochs × steps per epoch (SAM3 is epoch based)
``sam3.checkpoint`` / ``init_from``            ``trainer.model.checkpoint`` (verified load)
=============================================  ===================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from angioexp.config import Config, dump_yaml
from angioexp.errors import ConfigError, InputError

CONFIG_NAME = "angioexp_sam3"
TRAIN_KEY = "all"  # SAM3's loss key for the training set
VAL_KEY = "angio"  # dict_key of the validation collate function and meter group

CHANGES = [
    "model: angioexp.backends.sam3.model.build_sam3_model — point prompts reach the geometry "
    "encoder; matcher.* drives one-to-one matching; ViT RoPE rebuilt for scratch.resolution; "
    "text-encoder positional_embedding/text_projection initialised; text-encoder attention "
    "kernels pinned so activation-checkpoint recomputes match (sam3.activation_checkpointing "
    "switches it off); checkpoint loaded with a "
    "verified report (fails below min_loaded_fraction); load_from_HF never used",
    "trainer: angioexp.backends.sam3.trainer.GuardedTrainer — NaN guard (skip / restore + LR "
    "backoff / diverged) instead of FloatingPointError",
    "logging.tensorboard_writer: angioexp.backends.sam3.writer.make_mlflow_writer — scalars "
    "streamed live to MLflow under angioexp's metric names (docs/design.md#metric-keys)",
    "data: CentrelinePrompts after DecodeRle (prompts.*); collate input_points_embedding_dim=3",
    "loss: segmentation losses enabled with SemanticSegCriterion at sam3.train.loss.loss_fns "
    "(SAM3's commented example names sam3.losses.loss_fns, which does not exist)",
    "meters: segm COCO evaluation at original mask size (use_original_sizes_mask: true)",
]


# Keys the sam3 backend cannot honour. Left at the sam3 backend's default they are inert; set
# to anything else (in a YAML file or with --set) they are refused with the reason.
UNSUPPORTED = {
    "model.": "the core model's architecture (SAM3's is fixed)",
    "loss.view.": "SAM3 has no view head",
    "loss.identity.loss_identity_presence": "SAM3's segmentation head has no per-segment presence logits; the "
                                            "decoder's presence token is trained by loss.iabce.presence_loss",
    "eval.tree_labelling": "tree-aware labelling post-processes the core model's segment-identity output",
    "data.rare_segment_power": "the rare-segment frame sampler is the core backend's; SAM3's loader draws every image once per epoch",
    "train.ema_decay": "SAM3's trainer keeps no weight average",
    "train.budget_minutes": "SAM3's trainer is epoch based and cannot stop on a wall-clock budget; use train.max_steps",
    "scratch.crop_size": "random crops are a core-backend augmentation; the sam3 backend resizes whole images "
                         "to scratch.resolution (multi-scale from sam3.resize_min_size)",
    "prompts.negatives_per_image": "SAM3 queries every category of every image (COCO_FROM_JSON include_negatives)",
    "prompts.positives_per_image": "SAM3 queries every category of every image (COCO_FROM_JSON include_negatives)",
    "eval.mask_threshold": "SAM3's postprocessor binarises the masks (at 0.5) before angioexp scores them",
    "loss.masks.resize": "SAM3's Masks loss upsamples the predictions to the target size: only 'predictions'",
}

SAM3_RESIZE_MIN = 480  # min_size of the recipe's get_random_resize_scales (sam3.resize_min_size)

# SAM3's own fine-tuning recipe (roboflow_v100_full_ft_100_images.yaml, with its commented
# segmentation loss): path in the generated config → (SAM3's value, why angioexp differs on
# purpose — None: it does not, so a difference comes from the angioexp config). render() lists
# every difference in the generated config's header.
SAM3_RECIPE: dict[str, tuple[Any, str | None]] = {
    "scratch.resolution": (1008, None),
    "scratch.enable_segmentation": (False, "angioexp segments vessels (Masks + SemanticSegCriterion losses on)"),
    "scratch.max_ann_per_img": (200, None),
    "scratch.num_train_workers": (10, None),
    "scratch.num_val_workers": (0, None),
    "scratch.train_batch_size": (1, None),
    "scratch.val_batch_size": (1, None),
    "scratch.lr_scale": (0.1, None),
    "scratch.lrd_vision_backbone": (0.9, None),
    "scratch.wd": (0.1, None),
    "scratch.scheduler_warmup": (20, None),
    "scratch.scheduler_timescale": (20, None),
    "scratch.scheduler_cooldown": (20, None),
    "scratch.train_resize_sizes": (None, None),  # SAM3's sizes for the generated resolution (below)
    "scratch.hflip_prob": (0.0, None),
    "scratch.max_dets_per_img": (-1, None),
    "scratch.matcher._target_": ("sam3.train.matcher.BinaryHungarianMatcherV2",
                                 "a non-finite matching cost is a NaN-guard step, not a scipy crash"),
    "scratch.matcher.cost_class": (2.0, None),
    "scratch.matcher.cost_bbox": (5.0, None),
    "scratch.matcher.cost_giou": (2.0, None),
    "trainer._target_": ("sam3.train.trainer.Trainer", "NaN guard instead of FloatingPointError"),
    "trainer.model._target_": ("sam3.model_builder.build_sam3_image_model",
                               "points reach the model, matcher.* is used, verified weight loading"),
    "trainer.max_epochs": (20, "from train.max_steps (SAM3 is epoch based)"),
    "trainer.val_epoch_freq": (10, "every train.eval_every steps, rounded up to whole epochs"),
    "trainer.seed_value": (123, "angioexp's seed"),
    "trainer.skip_saving_ckpts": (True, "the run's weights become a registered model"),
    "trainer.cuda.cudnn_deterministic": (False, None),
    "trainer.cuda.cudnn_benchmark": (True, None),
    "trainer.optim.amp.enabled": (True, "AMP is CUDA-only"),
    "trainer.optim.amp.amp_dtype": ("bfloat16", None),
    "trainer.optim.gradient_clip.max_norm": (0.1, None),
    "trainer.data.train.pin_memory": (True, "pinned memory is CUDA-only"),
    "trainer.data.val.dataset.coco_json_loader.category_chunk_size": (2, "a Stage 2 frame has up to 26 categories"),
    "trainer.loss.all.o2m_weight": (2.0, None),
    "trainer.loss.all.loss_fns_find.0.weight_dict.loss_bbox": (5.0, None),
    "trainer.loss.all.loss_fns_find.0.weight_dict.loss_giou": (2.0, None),
    "trainer.loss.all.loss_fns_find.1.weight_dict.loss_ce": (20.0, None),
    "trainer.loss.all.loss_fns_find.1.weight_dict.presence_loss": (20.0, None),
    "trainer.loss.all.loss_fns_find.1.pos_weight": (10.0, None),
    "trainer.loss.all.loss_fn_semantic_seg.presence_head": (True, None),
}


IDENTITY_CHANGE = ("loss: + angioexp.backends.sam3.identity_loss.PromptIdentityLoss (loss.identity.*) — one "
                   "per-pixel softmax over background and the semantic logits of every prompt of an image, "
                   "class-weighted CE + soft Dice")


def identity_on(cfg: Config) -> bool:
    """The opt-in identity term: on when its CE or Dice weight is above 0 (both 0 at the sam3 defaults)."""
    return cfg.loss.identity.loss_identity_ce > 0 or cfg.loss.identity.loss_identity_dice > 0


def recipe_differences(sam3_cfg: dict) -> list[str]:
    """Every value of the generated config that is not SAM3's recipe, with the reason."""
    out = []
    for path, (sam3_value, why) in SAM3_RECIPE.items():
        node: Any = sam3_cfg
        for part in path.split("."):
            node = node[int(part)] if isinstance(node, list) else (node or {}).get(part)
        if path == "scratch.train_resize_sizes":
            sam3_value = train_resize_sizes(sam3_cfg["scratch"]["resolution"], SAM3_RESIZE_MIN)
        if node != sam3_value:
            out.append(f"{path}: {node!r} (SAM3: {sam3_value!r}) — {why or 'set in the angioexp config'}")
    return out


def _explicit_changes(cfg: Config) -> dict[str, Any]:
    """Keys whose value differs from the sam3 backend's default for this stage: the user set them."""
    from angioexp.config import flatten, load_config

    reference = flatten(load_config(backend="sam3", stage=cfg.stage))
    return {k: v for k, v in flatten(cfg).items() if reference.get(k, v) != v}


def check_supported(cfg: Config) -> list[str]:
    """Refuse what SAM3's trainer cannot do; return the approximations it makes (header notes)."""
    from angioexp.backends.sam3.model import check_resolution

    check_resolution(cfg.scratch.resolution)
    changed = _explicit_changes(cfg)
    for key in sorted(changed):
        reason = next((why for prefix, why in UNSUPPORTED.items() if key == prefix or (prefix.endswith(".") and key.startswith(prefix))), None)
        if reason is not None:
            raise ConfigError(f"not supported by the sam3 backend: {reason} (leave it unset)", key=key)
    if cfg.loss.semantic.presence_loss:
        raise ConfigError(
            "SAM3's segmentation head is built without a presence head (presence_logit is None), so "
            "SemanticSegCriterion cannot train one; the decoder's presence token is trained by "
            "loss.iabce.presence_loss — set loss.semantic.presence_loss=false",
            key="loss.semantic.presence_loss",
        )
    if identity_on(cfg) and not cfg.scratch.enable_segmentation:
        raise ConfigError("the identity loss (loss.identity.*) needs SAM3's segmentation head: set "
                          "scratch.enable_segmentation=true or the loss.identity weights to 0",
                          key="scratch.enable_segmentation")
    if cfg.loss.semantic.resize == "targets_area":
        raise ConfigError("SAM3's SemanticSegCriterion has no area resampling: 'predictions' (upsampled logits) "
                          "or 'targets_sam3' (downsample: true)", key="loss.semantic.resize")
    # scratch.hflip_prob in Stage 2 and the sam3.* ranges are refused when the config loads
    notes = []
    if "train.checkpoint_every" in changed:
        notes.append("train.checkpoint_every: SAM3 writes checkpoint.pt at every epoch end (the last one kept)")
    if "train.eval_every" in changed and cfg.sam3.val_epoch_freq is not None:
        notes.append("train.eval_every: sam3.val_epoch_freq is set and decides when SAM3 evaluates")
    return notes


def train_resize_sizes(resolution: int, min_size: int | None) -> list[int]:
    """SAM3's multi-scale training sizes (``get_random_resize_scales(resolution, min_size,
    rounded=False)``: multiples of 32 in [min_size, resolution]); [resolution] when none fit
    (a resolution below min_size, e.g. 336 px with SAM3's 480)."""
    if min_size is None:
        return [resolution]
    from sam3.train.transforms.basic import get_random_resize_scales

    return get_random_resize_scales(resolution, min_size, False) or [resolution]


def schedule(cfg: Config, num_train_images: int, world_size: int = 1) -> tuple[int, int, int | None, int]:
    """(max_epochs, optimizer steps per epoch, limit_ids for the train set, val_epoch_freq) for
    ``train.max_steps``. With ``world_size`` processes SAM3's DistributedSampler gives each rank
    1/world_size of the images, and one optimizer step consumes a batch on every rank."""
    batch = cfg.scratch.train_batch_size
    full_epoch = num_train_images // world_size // batch  # per rank, drop_last
    if full_epoch < 1:
        raise InputError(f"{num_train_images} training images < one batch of {batch} on each of {world_size} "
                         "process(es)", key="scratch.train_batch_size")
    steps = min(cfg.sam3.steps_per_epoch or full_epoch, full_epoch, cfg.train.max_steps)
    limit = steps * batch * world_size if steps < full_epoch else None  # a fixed subset of the images
    epochs = cfg.sam3.max_epochs or math.ceil(cfg.train.max_steps / steps)
    val_every = cfg.sam3.val_epoch_freq or max(1, math.ceil(cfg.train.eval_every / steps))
    return epochs, steps, limit, val_every


def _read_coco(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("COCO annotations not found (run `angioexp convert` first)", file=path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc}", file=path) from None


def _split(coco_dir: Path, split: str, ann_name: str = "annotations.json") -> tuple[Path, Path, dict]:
    """(image root SAM3 joins ``file_name`` to, annotations path, annotations).

    ``angioexp convert`` writes ``file_name: images/x.png`` (relative to the split folder); plain
    COCO has ``x.png`` in ``images/``. Every file must exist and stay inside the split folder.
    """
    from angioexp.fileio import resolve_under

    split_dir = coco_dir / split
    ann = split_dir / ann_name
    data = _read_coco(ann)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(f"missing '{key}'", file=ann)
    if not data["categories"]:
        raise InputError("no categories", file=ann)
    if not data["images"]:
        raise InputError("no images", file=ann)
    for root in (split_dir, split_dir / "images"):
        if resolve_under(split_dir, root / str(data["images"][0].get("file_name", "")), file=ann,
                         column="file_name").is_file():
            break
    else:
        raise InputError(f"image 0: file not found under {split_dir} or {split_dir / 'images'}", file=ann, column="file_name")
    for i, image in enumerate(data["images"]):
        path = resolve_under(split_dir, root / str(image.get("file_name", "")), file=ann, row=i, column="file_name")
        if not path.is_file():
            raise InputError(f"image {image.get('id')}: file not found: {path}", file=ann, row=i, column="file_name")
    return root, ann, data


def category_prompt(category: dict) -> str:
    """The text SAM3 is queried with for a COCO category: its ``prompt``, else its name."""
    return category.get("prompt") or category["name"]


def _prompts_json(categories: list[dict]) -> str | None:
    """SAM3's COCO_FROM_JSON ``prompts`` (text per category id) when categories carry prompts."""
    if not any("prompt" in c for c in categories):
        return None
    return repr([{"id": int(c["id"]), "name": category_prompt(c)} for c in categories])


def build(
    cfg: Config,
    *,
    coco_dir: str | Path,
    out_dir: str | Path,
    device: str = "cpu",
    run_id: str | None = None,
    tracking_uri: str | None = None,
    bpe_path: str | None = None,
    checkpoint: str | None = None,
    loss_hook: str | None = None,
    save_checkpoints: bool = True,
) -> tuple[dict, list[str]]:
    """The SAM3 config as a plain dict (``OmegaConf.create``-ready) and the notes."""
    from angioexp.backends.sam3.weights import find_bpe_vocab

    from angioexp.train.inference import ground_truth_path

    notes = check_supported(cfg)
    coco_dir = Path(coco_dir).resolve()
    out_dir = Path(out_dir).resolve()
    train_images, train_ann, train_data = _split(coco_dir, cfg.data.train_split)
    val_images, val_ann, val_data = _split(
        coco_dir, cfg.data.val_split, ground_truth_path(coco_dir, cfg.data.val_split, cfg).name)  # data.use_clean_val_labels
    cuda = device.startswith("cuda")
    world_size = cfg.sam3.num_gpus if cuda else 1
    epochs, steps_per_epoch, train_limit, val_epoch_freq = schedule(cfg, len(train_data["images"]), world_size)
    s, L, P = cfg.scratch, cfg.loss, cfg.prompts
    bpe = str(find_bpe_vocab(bpe_path or cfg.sam3.bpe_path))
    prompts_on = P.num_points[1] > 0 or P.box_chance > 0
    if not P.use_text and not prompts_on:
        raise ConfigError("prompts.use_text=false needs points or boxes (prompts.num_points / box_chance)", key="prompts.use_text")

    def prompt_transform(seed):
        return {
            "_target_": "angioexp.backends.sam3.transforms.CentrelinePrompts",
            "num_points": list(P.num_points), "num_negative_points": P.num_negative_points,
            "box_chance": P.box_chance, "point_sample_mode": P.point_sample_mode,
            "resample_box_from_mask": P.resample_box_from_mask, "box_noise_std": P.box_noise_std,
            "box_noise_max": P.box_noise_max, "use_text": P.use_text,
            "geometric_query_str": P.geometric_query_str, "seed": seed,
        }

    def filt(name, **kw):
        return {"_target_": "sam3.train.transforms.filter_query_transforms.FlexibleFilterFindGetQueries",
                "query_filter": {"_target_": f"sam3.train.transforms.filter_query_transforms.{name}", **kw}}

    resize = {
        "_target_": "sam3.train.transforms.basic_for_api.RandomResizeAPI",
        "sizes": "${scratch.resolution}",
        "max_size": {"_target_": "sam3.train.transforms.basic.get_random_resize_max_size", "size": "${scratch.resolution}"},
        "square": True, "consistent_transform": False,
    }
    # SAM3's multi-scale training: a random size, then padded to the resolution
    train_resize = {**resize, "sizes": "${scratch.train_resize_sizes}"}
    flip = [{"_target_": "sam3.train.transforms.basic_for_api.RandomHorizontalFlip",
             "consistent_transform": False, "p": "${scratch.hflip_prob}"}] if s.hflip_prob else []
    decode = {"_target_": "sam3.train.transforms.segmentation.DecodeRle"}
    to_tensor = {"_target_": "sam3.train.transforms.basic_for_api.ToTensorAPI"}
    normalize = {"_target_": "sam3.train.transforms.basic_for_api.NormalizeAPI",
                 "mean": "${scratch.train_norm_mean}", "std": "${scratch.train_norm_std}"}
    train_transforms = [
        {"_target_": "sam3.train.transforms.basic_for_api.ComposeAPI", "transforms": [
            filt("FilterCrowds"), decode,
            *([prompt_transform(None)] if prompts_on else []),
            *flip,  # after the prompts: SAM3's hflip moves points and boxes with the image
            train_resize,
            {"_target_": "sam3.train.transforms.basic_for_api.PadToSizeAPI", "size": "${scratch.resolution}",
             "consistent_transform": False},
            to_tensor, filt("FilterEmptyTargets"), normalize, filt("FilterEmptyTargets"),
        ]},
        filt("FilterFindQueriesWithTooManyOut", max_num_objects="${scratch.max_ann_per_img}"),
    ]
    val_transforms = [
        {"_target_": "sam3.train.transforms.basic_for_api.ComposeAPI", "transforms": [
            *([decode, prompt_transform(cfg.seed)] if prompts_on else []),
            resize, to_tensor,
            {**normalize, "mean": "${scratch.val_norm_mean}", "std": "${scratch.val_norm_std}"},
        ]},
    ]

    matcher = {"focal": cfg.matcher.focal, "cost_class": cfg.matcher.cost_class, "cost_bbox": cfg.matcher.cost_bbox,
               "cost_giou": cfg.matcher.cost_giou, "alpha": cfg.matcher.alpha, "gamma": cfg.matcher.gamma}
    loss_fns = [
        {"_target_": "sam3.train.loss.loss_fns.Boxes",
         "weight_dict": {"loss_bbox": L.boxes.loss_bbox, "loss_giou": L.boxes.loss_giou}},
        {"_target_": "sam3.train.loss.loss_fns.IABCEMdetr", "weak_loss": False,
         "weight_dict": {"loss_ce": L.iabce.loss_ce, "presence_loss": L.iabce.presence_loss},
         "pos_weight": L.iabce.pos_weight, "alpha": L.iabce.alpha, "gamma": L.iabce.gamma,
         "use_presence": L.iabce.use_presence, "pos_focal": L.iabce.pos_focal,
         "pad_n_queries": L.iabce.pad_n_queries if L.iabce.pad_n_queries is not None else 200, "pad_scale_pos": 1.0},
    ]
    if s.enable_segmentation:
        masks = {"_target_": "sam3.train.loss.loss_fns.Masks", "compute_aux": False,
                 "focal_alpha": L.masks.focal_alpha, "focal_gamma": L.masks.focal_gamma,
                 "weight_dict": {"loss_mask": L.masks.loss_mask, "loss_dice": L.masks.loss_dice}}
        if L.masks.num_sample_points is not None:
            masks.update(num_sample_points=L.masks.num_sample_points, oversample_ratio=L.masks.oversample_ratio,
                         importance_sample_ratio=L.masks.importance_sample_ratio)
        loss_fns.append(masks)
        semantic = {"_target_": "sam3.train.loss.loss_fns.SemanticSegCriterion",
                    "presence_head": L.semantic.presence_head, "presence_loss": False,
                    "focal": L.semantic.focal, "focal_alpha": L.semantic.focal_alpha,
                    "focal_gamma": L.semantic.focal_gamma,
                    "downsample": L.semantic.resize == "targets_sam3",
                    "weight_dict": {"loss_semantic_seg": L.semantic.loss_semantic_seg,
                                    "loss_semantic_presence": L.semantic.loss_semantic_presence,
                                    "loss_semantic_dice": L.semantic.loss_semantic_dice}}
        if identity_on(cfg):  # after SAM3's terms: the recipe's loss_fns_find indices stay
            loss_fns.append({"_target_": "angioexp.backends.sam3.identity_loss.PromptIdentityLoss",
                             "weight_dict": {"loss_identity_ce": L.identity.loss_identity_ce,
                                             "loss_identity_dice": L.identity.loss_identity_dice},
                             "class_weight_power": L.identity.class_weight_power,
                             "downsample": L.semantic.resize == "targets_sam3"})
    else:
        semantic = None
    loss = {
        "_target_": "sam3.train.loss.sam3_loss.Sam3LossWrapper",
        "matcher": "${scratch.matcher}",
        "o2m_weight": cfg.o2m.o2m_weight if cfg.o2m.enabled else 0.0,
        "o2m_matcher": {"_target_": "sam3.train.matcher.BinaryOneToManyMatcher",
                        "alpha": cfg.o2m.alpha, "threshold": cfg.o2m.threshold, "topk": cfg.o2m.topk},
        "use_o2m_matcher_on_o2m_aux": False,
        "loss_fns_find": loss_fns,
        "loss_fn_semantic_seg": semantic,
        "scale_by_find_batch_size": True,
    }

    log_dir = out_dir / "sam3"
    val_prompts = _prompts_json(val_data["categories"])
    train_prompts = _prompts_json(train_data["categories"])
    val_loader = {"_target_": "sam3.train.data.coco_json_loaders.COCO_FROM_JSON", "_partial_": True,
                  "include_negatives": True, "category_chunk_size": 4}
    train_loader = {"_target_": "sam3.train.data.coco_json_loaders.COCO_FROM_JSON", "_partial_": True,
                    "include_negatives": True}
    if val_prompts:
        val_loader["prompts"] = val_prompts
    if train_prompts:
        train_loader["prompts"] = train_prompts
    amp = cfg.optim.amp.enabled and cuda
    sam3_cfg: dict[str, Any] = {
        "paths": {"coco_root": str(coco_dir), "experiment_log_dir": str(log_dir), "bpe_path": bpe},
        "scratch": {
            "enable_segmentation": s.enable_segmentation, "d_model": 256, "resolution": s.resolution,
            "max_ann_per_img": s.max_ann_per_img, "use_presence_eval": True,
            "train_norm_mean": [0.5, 0.5, 0.5], "train_norm_std": [0.5, 0.5, 0.5],
            "val_norm_mean": [0.5, 0.5, 0.5], "val_norm_std": [0.5, 0.5, 0.5],
            "num_train_workers": s.num_train_workers, "num_val_workers": 0,
            "train_resize_sizes": train_resize_sizes(s.resolution, cfg.sam3.resize_min_size),
            "hflip_prob": s.hflip_prob, "max_dets_per_img": cfg.sam3.max_dets_per_img,
            "lr_scale": s.lr_scale,
            "lr_transformer": "${times:8e-4,${scratch.lr_scale}}",
            "lr_vision_backbone": "${times:2.5e-4,${scratch.lr_scale}}",
            "lr_language_backbone": "${times:5e-5,${scratch.lr_scale}}",
            "lrd_vision_backbone": s.lrd_vision_backbone, "wd": s.wd,
            "scheduler_timescale": s.scheduler_timescale, "scheduler_warmup": s.scheduler_warmup,
            "scheduler_cooldown": s.scheduler_cooldown,
            "train_batch_size": s.train_batch_size, "val_batch_size": s.val_batch_size,
            "gradient_accumulation_steps": 1,
            "matcher": {"_target_": "angioexp.backends.sam3.matcher.GuardedHungarianMatcher", **matcher, "stable": False},
            "collate_fn": {"_target_": "sam3.train.data.collator.collate_fn_api", "_partial_": True,
                           "repeats": 1, "dict_key": TRAIN_KEY, "with_seg_masks": "${scratch.enable_segmentation}",
                           "input_points_embedding_dim": 3},
            "collate_fn_val": {"_target_": "sam3.train.data.collator.collate_fn_api", "_partial_": True,
                               "repeats": 1, "dict_key": VAL_KEY, "with_seg_masks": False,
                               "input_points_embedding_dim": 3},
            "steps_per_epoch": steps_per_epoch,
        },
        "trainer": {
            "_target_": "angioexp.backends.sam3.trainer.GuardedTrainer",
            "nan_guard": dataclasses.asdict(cfg.nan_guard),
            "events_path": str(out_dir / "events.jsonl"),
            "loss_hook": loss_hook,
            "skip_saving_ckpts": not save_checkpoints,
            "empty_gpu_mem_cache_after_eval": True,
            "skip_first_val": True,
            "max_epochs": epochs,
            "accelerator": "cuda" if cuda else "cpu",
            "seed_value": cfg.seed,
            "val_epoch_freq": val_epoch_freq,
            "cuda": {"cudnn_deterministic": cfg.train.deterministic, "cudnn_benchmark": not cfg.train.deterministic},
            "mode": "train",
            "gradient_accumulation_steps": "${scratch.gradient_accumulation_steps}",
            "distributed": {"backend": "nccl" if cuda else "gloo", "find_unused_parameters": True,
                            "gradient_as_bucket_view": True},
            "env_variables": None if cuda else {"MDETR_CPU_REDUCE": "1"},  # gathers over gloo
            "loss": {TRAIN_KEY: loss,
                     "default": {"_target_": "sam3.train.loss.sam3_loss.DummyLoss", "device": "cuda" if cuda else "cpu"}},
            "data": {
                "train": {
                    "_target_": "sam3.train.data.torch_dataset.TorchDataset",
                    "dataset": {
                        "_target_": "sam3.train.data.sam3_image_dataset.Sam3ImageDataset",
                        "limit_ids": train_limit, "transforms": train_transforms,
                        "load_segmentation": "${scratch.enable_segmentation}",
                        "max_ann_per_img": 500000, "multiplier": 1, "max_train_queries": 50000,
                        "max_val_queries": 50000, "training": True, "use_caching": False,
                        "img_folder": str(train_images), "ann_file": str(train_ann),
                        "coco_json_loader": train_loader,
                    },
                    "shuffle": True, "batch_size": "${scratch.train_batch_size}",
                    "num_workers": "${scratch.num_train_workers}", "pin_memory": cuda, "drop_last": True,
                    "collate_fn": "${scratch.collate_fn}",
                },
                "val": {
                    "_target_": "sam3.train.data.torch_dataset.TorchDataset",
                    "dataset": {
                        "_target_": "sam3.train.data.sam3_image_dataset.Sam3ImageDataset",
                        "limit_ids": cfg.data.max_val_images,
                        # GT masks are only needed to sample prompts (evaluation reads the JSON);
                        # undecoded RLE masks would break RandomResizeAPI.
                        "load_segmentation": prompts_on,
                        "coco_json_loader": val_loader,
                        "img_folder": str(val_images), "ann_file": str(val_ann),
                        "transforms": val_transforms, "max_ann_per_img": 100000, "multiplier": 1,
                        "training": False,
                    },
                    "shuffle": False, "batch_size": "${scratch.val_batch_size}",
                    "num_workers": "${scratch.num_val_workers}", "pin_memory": cuda, "drop_last": False,
                    "collate_fn": "${scratch.collate_fn_val}",
                },
            },
            "model": {
                "_target_": "angioexp.backends.sam3.model.build_sam3_model",
                "bpe_path": "${paths.bpe_path}",
                "resolution": "${scratch.resolution}",
                "enable_segmentation": "${scratch.enable_segmentation}",
                "matcher": matcher,
                "activation_checkpointing": cfg.sam3.activation_checkpointing,
                "checkpoint": checkpoint,
                "checkpoint_prefix": cfg.sam3.checkpoint_prefix,
                "min_loaded_fraction": cfg.min_loaded_fraction,
                "report_path": str(out_dir / "init_report.json"),
            },
            "meters": {"val": {VAL_KEY: {"segm" if s.enable_segmentation else "bbox": {
                "_target_": "sam3.eval.coco_writer.PredictionDumper",
                "iou_type": "segm" if s.enable_segmentation else "bbox",
                "dump_dir": str(out_dir / "predictions"),
                "merge_predictions": True,
                "postprocessor": {
                    "_target_": "sam3.eval.postprocessors.PostProcessImage",
                    "max_dets_per_img": "${scratch.max_dets_per_img}", "iou_type": "segm" if s.enable_segmentation else "bbox",
                    "use_original_ids": True, "use_original_sizes_box": True,
                    "use_original_sizes_mask": True, "convert_mask_to_rle": True,
                    "always_interpolate_masks_on_gpu": cuda, "use_presence": "${scratch.use_presence_eval}",
                },
                "gather_pred_via_filesys": False,
                "maxdets": 100,
                "pred_file_evaluators": [{
                    "_target_": "sam3.eval.coco_eval_offline.CocoEvaluatorOfflineWithPredFileEvaluators",
                    "gt_path": str(val_ann), "tide": False,
                    "iou_type": "segm" if s.enable_segmentation else "bbox",
                }],
            }}}},
            "optim": {
                "amp": {"enabled": amp, "amp_dtype": cfg.optim.amp.amp_dtype},
                "optimizer": {"_target_": "torch.optim.AdamW", "betas": list(cfg.optim.betas), "eps": cfg.optim.eps},
                "gradient_clip": {"_target_": "sam3.train.optim.optimizer.GradientClipper",
                                  "max_norm": cfg.optim.gradient_clip.max_norm,
                                  "norm_type": cfg.optim.gradient_clip.norm_type},
                "param_group_modifiers": [{
                    "_target_": "sam3.train.optim.optimizer.layer_decay_param_modifier", "_partial_": True,
                    "layer_decay_value": "${scratch.lrd_vision_backbone}",
                    "apply_to": "backbone.vision_backbone.trunk",
                    "overrides": [{"pattern": "*pos_embed*", "value": 1.0}],
                }],
                "options": {
                    "lr": [
                        _isr("${scratch.lr_transformer}"),
                        {**_isr("${scratch.lr_vision_backbone}"), "param_names": ["backbone.vision_backbone.*"]},
                        {**_isr("${scratch.lr_language_backbone}"), "param_names": ["backbone.language_backbone.*"]},
                    ],
                    "weight_decay": [
                        {"scheduler": {"_target_": "fvcore.common.param_scheduler.ConstantParamScheduler", "value": "${scratch.wd}"}},
                        {"scheduler": {"_target_": "fvcore.common.param_scheduler.ConstantParamScheduler", "value": 0.0},
                         "param_names": ["*bias*"], "module_cls_names": ["torch.nn.LayerNorm"]},
                    ],
                },
            },
            "checkpoint": {"save_dir": str(log_dir / "checkpoints"), "save_freq": 0},
            "logging": {
                "tensorboard_writer": {
                    "_target_": "angioexp.backends.sam3.writer.make_mlflow_writer",
                    "run_id": run_id, "tracking_uri": tracking_uri,
                    "events_path": str(out_dir / "events.jsonl"),
                    "batch_size": "${scratch.train_batch_size}", "should_log": True,
                    "resume": (log_dir / "checkpoints" / "checkpoint.pt").exists(),
                },
                "wandb_writer": None,
                "log_dir": str(log_dir / "logs"),
                "log_freq": cfg.train.log_every,
                "log_scalar_frequency": cfg.train.log_every,
            },
        },
        "launcher": {"num_nodes": 1, "gpus_per_node": cfg.sam3.num_gpus if cuda else 1,
                     "experiment_log_dir": str(log_dir)},
        "submitit": {"use_cluster": False, "port_range": [10000, 65000]},
    }
    return sam3_cfg, notes


def _isr(base_lr: str) -> dict:
    return {"scheduler": {"_target_": "sam3.train.optim.schedulers.InverseSquareRootParamScheduler",
                          "base_lr": base_lr, "timescale": "${scratch.scheduler_timescale}",
                          "warmup_steps": "${scratch.scheduler_warmup}",
                          "cooldown_steps": "${scratch.scheduler_cooldown}"}}


def render(sam3_cfg: dict, notes: list[str], cfg: Config) -> str:
    header = ["# @package _global_", "# Generated by angioexp from the angioexp config below — edit that, not this.",
              "# What angioexp changes against SAM3's example config:"]
    header += [f"#   - {c}" for c in CHANGES + ([IDENTITY_CHANGE] if identity_on(cfg) else [])]
    header.append("# Values that differ from SAM3's recipe (roboflow_v100_full_ft_100_images.yaml):")
    header += [f"#   - {d}" for d in recipe_differences(sam3_cfg)] or ["#   (none)"]
    if notes:
        header.append("# angioexp settings the sam3 backend approximates:")
        header += [f"#   - {n}" for n in notes]
    header.append("# angioexp config:")
    header += [f"#   {line}" for line in dump_yaml(cfg).splitlines()]
    body = yaml.safe_dump({"defaults": ["_self_"], **sam3_cfg}, sort_keys=False, width=120)
    return "\n".join(header) + "\n" + body


def generate(cfg: Config, *, coco_dir, out_dir, **kwargs) -> Path:
    """Write ``<out_dir>/sam3_config/angioexp_sam3.yaml`` (atomically) and return its path."""
    from angioexp.fileio import atomic_file

    sam3_cfg, notes = build(cfg, coco_dir=coco_dir, out_dir=out_dir, **kwargs)
    path = Path(out_dir) / "sam3_config" / f"{CONFIG_NAME}.yaml"
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(render(sam3_cfg, notes, cfg))
    return path


def compose(config_path: str | Path):
    """Compose a generated config with Hydra, as SAM3's ``train.py`` does (resolvers registered)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    config_path = Path(config_path).resolve()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_path.parent), version_base="1.2"):
        return hydra_compose(config_name=config_path.stem)


def register_resolvers() -> None:
    """SAM3's OmegaConf resolvers (``times``, ``add`` …), registered once per process."""
    from omegaconf import OmegaConf

    if OmegaConf.has_resolver("times"):
        return
    from sam3.train.utils.train_utils import register_omegaconf_resolvers

    register_omegaconf_resolvers()
