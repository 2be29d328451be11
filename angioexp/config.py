"""One typed configuration for both training backends, resolved in one place with provenance.

Section and key names follow SAM3's Hydra config (``scratch.lr_scale``, ``loss.masks.loss_mask``,
``matcher.cost_giou`` …) so that a value means the same thing in the ``core`` and ``sam3``
backends and in a sweep. Each field carries its one-line help and its constraints
(:func:`setting`); :data:`DEFAULTS` holds every default that depends on the backend or the stage;
:data:`CONTRADICTIONS` lists the settings that cannot go together. ``load_config`` layers
field defaults ← ``DEFAULTS`` ← YAML file ← ``--set`` overrides, validates every value with
pydantic and records where each one came from (``angioexp config show``).

    cfg = load_config("my.yaml", overrides=["scratch.lr_scale=0.1"], stage=2)
    cfg.scratch.lr_transformer          # effective LRs derive from lr_scale
    flatten(cfg)                        # {"scratch.lr_scale": 0.1, ...} for MLflow params
    sources(cfg)                        # {"scratch.lr_scale": "--set", "scratch.resolution": "core stage 2", ...}
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, NamedTuple

import pydantic
import yaml

from angioexp.errors import ConfigError

# SAM3's base learning rates, multiplied by scratch.lr_scale (sam3/train/configs/*).
BASE_LR_TRANSFORMER = 8e-4
BASE_LR_VISION_BACKBONE = 2.5e-4
BASE_LR_LANGUAGE_BACKBONE = 5e-5

STAGE1_INIT_DEFAULT = "models:/angio-stage1@champion"

Check = tuple[Callable[[Any], bool], str]  # (predicate on the typed value, "must be …" message)


def setting(default: Any, help: str, *, check: Check | None = None, why: str = "",
            parse: Callable[[Any], Any] | None = None, **bounds: float) -> Any:
    """A config field: its default, its one-line ``help`` (docs/configuration.md) and its
    constraints — ``bounds`` (pydantic's ge, gt, le, lt, multiple_of; a null value passes) and/or
    ``check``; ``why`` is added to the message of a value out of bounds; ``parse`` maps a raw
    value first (spellings of the field's own)."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "check": check, "why": why, "parse": parse})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


UNIT = {"ge": 0, "le": 1}  # a probability, an alpha, a fraction
WEIGHT = {"ge": 0}  # a loss weight or cost


@dataclass
class DataConfig:
    """Where the training data comes from."""

    coco_dir: str | None = setting(None, "COCO root from `angioexp convert`; null: the bundled synthetic data")
    index_csv: str | None = setting(None, "a raw index.csv to convert (used when data.coco_dir is null)")
    convert_size: int | None = setting(None, "index_csv only: scale frames' longer side to N px (null: keep)", ge=16, le=8192)
    cache_dir: str = setting("data", "prepared datasets are cached here, keyed by their digest")
    # single annotated frames by default: the training sets want many distinct trees, not cine
    # frames of one (2200 cases: ≥ 1,500 train and ≥ 300 test frames after the patient-level split)
    synth_cases: int = setting(2200, "synthetic data: patients/cases to generate", ge=3, why="one patient per split at least")
    synth_seed: int = setting(0, "synthetic data: generator seed")
    synth_size: int = setting(512, "synthetic data: frame side in px")
    synth_frames: int = setting(1, "synthetic data: frames per case")
    train_split: str = setting("train", "split trained on")
    val_split: str = setting("val", "split evaluated during training")
    max_val_images: int | None = setting(None, "cap evaluation cost during training (null: the whole split)")
    # Stage 2: draw frames ∝ max over their segments of (1 / segment frequency)^power, so frames
    # with rare segments (ramus, lettered sub-branches) come round more often; 0 = plain epochs
    rare_segment_power: float = setting(0.0, "Stage 2: oversample frames with rare segments, ∝ (1/frequency)^power (0: plain epochs)", ge=0, le=2)
    use_clean_val_labels: bool = setting(True, "score against gt_mask_path when the data has it")


@dataclass
class AmpConfig:
    enabled: bool = setting(True, "mixed precision autocast on CUDA; ignored on CPU")
    amp_dtype: Literal["bfloat16", "float16"] = setting("bfloat16", "autocast dtype (float16 needs a GradScaler: sam3 backend only)")


@dataclass
class GradientClipConfig:
    max_norm: float | None = setting(0.1, "gradient norm clip (SAM3 default; null disables clipping)", gt=0)
    norm_type: float = setting(2.0, "p of the clipped p-norm")


@dataclass
class OptimConfig:
    amp: AmpConfig = section(AmpConfig, "automatic mixed precision")
    gradient_clip: GradientClipConfig = section(GradientClipConfig, "gradient clipping")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    eps: float = setting(1e-8, "AdamW epsilon")


@dataclass
class ScratchConfig:
    """SAM3's ``scratch`` section: resolution, learning-rate scale, schedule, batch sizes."""

    # core default: the frames' native 512 (thin vessels stay sharp), trained on 256² crops (H4b,
    # measured on the synthetic benchmark); SAM3 native: 1008 (multiples of 336 keep its windows exact)
    resolution: int = setting(512, "working image side in px (SAM3 native: 1008)", ge=32, multiple_of=16)
    enable_segmentation: bool = setting(True, "train the mask heads (SAM3's enable_segmentation)")
    max_ann_per_img: int = setting(200, "annotations kept per image")
    # core default 3: a model trained from scratch wants 3× SAM3's base LRs (synthetic benchmark, 600
    # steps: Stage 1 test Dice 0.817 → 0.851, tolerant AP75 0.50 → 0.84); sam3 backend: 0.1
    lr_scale: float = setting(3.0, "multiplies SAM3's base learning rates (lr_transformer etc. derive from it)", gt=0)
    lrd_vision_backbone: float = setting(0.9, "layer-wise LR decay over the image encoder's stages", gt=0, le=1)
    wd: float = setting(0.1, "AdamW weight decay", ge=0)
    scheduler_warmup: int = setting(50, "linear LR warm-up, steps", ge=0)
    scheduler_timescale: int = setting(200, "InverseSquareRoot decay constant, steps", ge=1)
    scheduler_cooldown: int = setting(50, "steps of linear LR decay to 0 at the end", ge=0)
    train_batch_size: int = setting(8, "images per training step", ge=1)
    val_batch_size: int = setting(8, "images per evaluation batch", ge=1)
    num_train_workers: int = setting(0, "data-loader worker processes")
    crop_size: int | None = setting(256, "random square crops at train time (null: whole image)", ge=32, multiple_of=16)
    # a mirrored image's C-arm view becomes "unknown"; never in Stage 2, whose segment names are
    # side-specific (a mirrored tree is not an anatomy): see DEFAULTS and CONTRADICTIONS
    hflip_prob: float = setting(0.5, "horizontal flip probability at train time (Stage 1 only)", **UNIT)

    @property
    def lr_transformer(self) -> float:
        return BASE_LR_TRANSFORMER * self.lr_scale

    @property
    def lr_vision_backbone(self) -> float:
        return BASE_LR_VISION_BACKBONE * self.lr_scale

    @property
    def lr_language_backbone(self) -> float:
        return BASE_LR_LANGUAGE_BACKBONE * self.lr_scale


@dataclass
class MatcherConfig:
    """BinaryHungarianMatcherV2 costs (one-to-one matching)."""

    focal: bool = setting(True, "focal classification cost (else plain probability)")
    cost_class: float = setting(2.0, "classification cost weight", **WEIGHT)
    cost_bbox: float = setting(5.0, "L1 box cost weight", **WEIGHT)
    cost_giou: float = setting(2.0, "GIoU box cost weight", **WEIGHT)
    alpha: float = setting(0.25, "focal cost alpha", **UNIT)
    gamma: float = setting(2.0, "focal cost gamma", **WEIGHT)


@dataclass
class O2MConfig:
    """One-to-many auxiliary matching (BinaryOneToManyMatcher) and its loss weight."""

    enabled: bool = setting(False, "supervise one-to-many (DAC) queries (sam3 backend only)")
    o2m_weight: float = setting(2.0, "weight of the one-to-many loss")
    alpha: float = setting(0.3, "one-to-many matcher alpha")
    threshold: float = setting(0.4, "one-to-many matcher IoU threshold")
    topk: int = setting(4, "predictions matched to each target")


@dataclass
class BoxesLossConfig:
    loss_bbox: float = setting(5.0, "L1 box loss weight", **WEIGHT)
    loss_giou: float = setting(2.0, "GIoU box loss weight", **WEIGHT)


@dataclass
class IABCELossConfig:
    """IABCEMdetr: IoU-aware focal classification with a presence token."""

    loss_ce: float = setting(20.0, "classification loss weight", **WEIGHT)
    presence_loss: float = setting(20.0, "presence-token loss weight", **WEIGHT)
    pos_weight: float = setting(10.0, "weight of positive queries", **WEIGHT)
    alpha: float = setting(0.25, "focal alpha", **UNIT)
    gamma: float = setting(2.0, "focal gamma", **WEIGHT)
    use_presence: bool = setting(True, "train the presence token")
    pos_focal: bool = setting(False, "focal modulation of positives too")
    # SAM3's configs pad to 200 queries: loss_ce = Σ / (pad_n_queries·B) when the model has fewer
    # queries, so a small model keeps a 200-query model's loss scale. None: mean over B·Q.
    pad_n_queries: int | None = setting(None, "normalise loss_ce as if there were N queries (SAM3: 200; null: mean over B·Q)", ge=1)


@dataclass
class MasksLossConfig:
    """Instance-mask loss: sigmoid focal + Dice, optionally on importance-sampled points."""

    loss_mask: float = setting(200.0, "mask focal loss weight (SAM3's segmentation example)", **WEIGHT)
    loss_dice: float = setting(10.0, "mask Dice loss weight (SAM3's segmentation example)", **WEIGHT)
    focal_alpha: float = setting(0.25, "mask focal alpha", **UNIT)
    focal_gamma: float = setting(2.0, "mask focal gamma", **WEIGHT)
    num_sample_points: int | None = setting(None, "importance-sampled points per mask (null: dense loss on every pixel)", ge=1)
    oversample_ratio: float = setting(3.0, "point sampling: candidates per kept point", ge=1)
    importance_sample_ratio: float = setting(0.75, "point sampling: share of the most uncertain points", **UNIT)
    # "targets_area" (targets area-averaged to the logits: soft, thin vessels kept), "predictions"
    # (logits upsampled to the target: SAM3's Masks), "targets_sam3" (bilinear → bool).
    resize: Literal["targets_area", "predictions", "targets_sam3"] = setting(
        "targets_area", "who is resampled when logits and targets differ in size (see angioexp.losses.loss_fns)")


@dataclass
class SemanticLossConfig:
    """SemanticSegCriterion: per-pixel semantic head (+ Dice, + presence)."""

    loss_semantic_seg: float = setting(20.0, "semantic focal/BCE loss weight", **WEIGHT)
    loss_semantic_dice: float = setting(30.0, "semantic Dice loss weight", **WEIGHT)
    loss_semantic_presence: float = setting(1.0, "semantic presence loss weight", **WEIGHT)
    focal: bool = setting(True, "focal (else plain BCE) semantic loss")
    focal_alpha: float = setting(0.6, "semantic focal alpha", **UNIT)
    focal_gamma: float = setting(2.0, "semantic focal gamma", **WEIGHT)
    presence_loss: bool = setting(False, "train a semantic presence head")
    presence_head: bool = setting(True, "average seg/Dice over find queries whose concept is present only (SAM3)")
    # SAM3's downsample=False is "predictions", downsample=True "targets_sam3"
    resize: Literal["targets_area", "predictions", "targets_sam3"] = setting("targets_area", "as loss.masks.resize, for the semantic head")


@dataclass
class ViewLossConfig:
    """Auxiliary classification of the C-arm view from image features."""

    loss_view: float = setting(0.5, "C-arm view classification loss weight", **WEIGHT)


@dataclass
class IdentityLossConfig:
    """Dense segment identity (core, model.identity_head): per-pixel softmax over background + every
    prompt of the category set, class-weighted cross-entropy + per-class soft Dice + presence BCE."""

    loss_identity_ce: float = setting(20.0, "identity cross-entropy weight", **WEIGHT)
    loss_identity_dice: float = setting(20.0, "identity per-class soft Dice weight", **WEIGHT)
    loss_identity_presence: float = setting(5.0, "identity presence BCE weight", **WEIGHT)
    class_weight_power: float = setting(0.5, "class weight ∝ (pixel frequency)^-power: 0 plain CE, 1 fully balanced", **UNIT)


@dataclass
class LossConfig:
    per_prompt: bool = setting(True, "train SAM3's per-prompt objective (each sampled prompt decoded: instance masks, boxes, "
                               "presence, its semantic mask); false — core Stage 2 with model.identity_head — trains the "
                               "identity and view terms alone and decodes no prompt in training")
    boxes: BoxesLossConfig = section(BoxesLossConfig, "box losses")
    iabce: IABCELossConfig = section(IABCELossConfig, "classification and presence (IABCEMdetr)")
    masks: MasksLossConfig = section(MasksLossConfig, "instance-mask losses")
    semantic: SemanticLossConfig = section(SemanticLossConfig, "semantic-head losses (SemanticSegCriterion)")
    view: ViewLossConfig = section(ViewLossConfig, "auxiliary C-arm view loss")
    identity: IdentityLossConfig = section(IdentityLossConfig, "dense segment-identity losses (core identity head)")


@dataclass
class PromptConfig:
    """How prompts are built for each (image, category) query (RandomGeometricInputsAPI)."""

    use_text: bool = setting(True, "the category's text prompt as a token")
    num_points: tuple[int, int] = setting((0, 0), "[lo, hi] positive points per query",
                                          check=(lambda v: 0 <= v[0] <= v[1], "must be [lo, hi] with 0 <= lo <= hi"))
    num_negative_points: int = setting(0, "negative points per query", ge=0)
    box_chance: float = setting(0.0, "probability that a query also gets a box prompt", **UNIT)
    point_sample_mode: Literal["centreline", "centered", "random"] = setting("centreline", "where positive points are drawn")
    geometric_query_str: str = setting("visual", "text of a query that has only geometric prompts")
    resample_box_from_mask: bool = setting(True, "box prompts from the mask's extent")
    box_noise_std: float = setting(0.0, "box prompt jitter, relative to the box side (SAM3's noise_box)", ge=0)
    box_noise_max: float | None = setting(None, "clip the box jitter to this many px (null: no clip)", ge=0)
    negatives_per_image: int = setting(2, "Stage 2: absent categories queried per image (presence training)", ge=0)
    # Bounds the cost of a step: every find query gets full-resolution mask logits.
    positives_per_image: int | None = setting(4, "core Stage 2: present categories queried per training image (null: all)", ge=1)


@dataclass
class ModelConfig:
    """Size of the core model (ignored by the sam3 backend)."""

    encoder_channels: tuple[int, ...] = setting((16, 32, 64, 96), "encoder widths, one per stride 2, 4, 8, 16")
    d_model: int = setting(96, "transformer width", ge=8)
    num_queries: int = setting(8, "object queries", ge=1)
    decoder_layers: int = setting(2, "transformer decoder layers")
    num_heads: int = setting(4, "attention heads")
    use_view_conditioning: bool = setting(True, "condition on the C-arm view")
    stem_channels: int = setting(8, "full-resolution encoder features (the finest skip of the pixel decoder)", ge=1)
    mask_dim: int = setting(16, "per-pixel embedding width that query embeddings are dotted with", ge=1)
    mask_guided_boxes: bool = setting(True, "box = the query's mask extent, refined by the box head")
    semantic_mask_base: bool = setting(False, "instance mask logits = semantic mask + query term (Stage 2 aid)")
    num_views: int = setting(0, "C-arm view classes (0: from angioexp.prompts.views.VIEW_CLASSES)")
    # Stage 2 aids (DEFAULTS: 0.28 vs 0.24 semantic per-segment Dice at 200 steps on whole frames).
    # Their output projections start at zero; a Stage 1 checkpoint without them loads with these
    # parameters reported as missing.
    context_layers: int = setting(0, "global self-attention layers over stride-16 tokens, fed back to the pixel decoder", ge=0)
    region_masks: bool = setting(False, "mask logits += a coarse prompt-conditioned region map")
    identity_head: bool = setting(False, "Stage 2: one per-pixel softmax over background + every segment prompt")
    identity_levels: int = setting(0, "identity head: pixel-decoder maps (strides 8, 4, …) that refine its coarse region map", ge=0)
    presence_evidence: bool = setting(False, "identity head: a segment's presence also reads its own pixels' probabilities (area, peak)")


@dataclass
class NanGuardConfig:
    max_consecutive: int = setting(3, "non-finite steps in a row before the last good state is restored", ge=1)
    lr_backoff: float = setting(0.5, "multiply every LR by this on each restore", gt=0, lt=1)
    max_restores: int = setting(4, "give up (TrainingDiverged) after this many restores")
    snapshot_every: int = setting(25, "keep an in-memory last-good state every N good steps")
    max_loss_ratio: float | None = setting(100.0, "a finite loss above this × the initial loss is a bad step too (null: only NaN/Inf)", gt=1)


@dataclass
class TrainConfig:
    max_steps: int = setting(600, "optimizer steps", ge=1)
    budget_minutes: float | None = setting(None, "stop cleanly at this wall time (null: no limit)", gt=0)
    eval_every: int = setting(200, "evaluate every N steps")
    log_every: int = setting(10, "log training metrics every N steps")
    checkpoint_every: int = setting(200, "write a checkpoint every N steps")
    out_dir: str = setting("runs", "run folders are created here")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    deterministic: bool = setting(True, "deterministic kernels (cudnn.benchmark off)")
    threads: int | None = setting(None, "torch.set_num_threads (null: the library default)")
    # Ramped as min(decay, (1+n)/(10+n)) so short runs are not dragged to the init. Default Stage 1
    # run, val Dice every 100 steps: raw 0.73 0.78 0.74 0.85 0.86 0.85, averaged 0.74 0.79 0.83
    # 0.84 0.85 0.86 — no dips for the best-checkpoint choice to land on.
    ema_decay: float | None = setting(0.99, "core: evaluate an exponential moving average of the weights (null: raw weights)", gt=0, lt=1)


@dataclass
class EvalConfig:
    tolerance_px: int = setting(1, "boundary tolerance for the tolerant AP / Boundary IoU", ge=0)
    score_threshold: float = setting(0.5, "detections below this score are dropped")
    mask_threshold: float = setting(0.5, "mask probability threshold")
    overlays: int = setting(8, "prediction overlay PNGs per evaluation")
    tree_labelling: bool = setting(False, "Stage 2 identity head: relabel the predicted tree branch by branch in anatomical order")


@dataclass
class TrackingConfig:
    experiment: str | None = setting(None, "MLflow experiment (null: angioexp-stage{stage})")
    register: bool = setting(True, "register the trained model and move its aliases")
    primary_metric: str = setting("val/AP75_tol", "the champion is decided on this metric")
    primary_mode: Literal["max", "min"] = setting("max", "whether primary_metric is better high or low")
    log_system_metrics: bool = setting(True, "MLflow system metrics (CPU, GPU, memory)")
    run_name: str | None = setting(None, "MLflow run name (null: derived from stage, backend, data)")


@dataclass
class Sam3Config:
    """Settings only the sam3 backend reads."""

    checkpoint: str | None = setting(None, "vanilla sam3.pt, a trainer checkpoint or a models:/… URI")
    checkpoint_prefix: str | None = setting(None, "key prefix of SAM3's tree in a foreign state dict (null: found by matching)")
    bpe_path: str | None = setting(None, "SAM3's BPE vocabulary (null: look in installed packages)")
    max_epochs: int | None = setting(None, "SAM3's trainer is epoch based (null: ceil(train.max_steps / steps per epoch))")
    steps_per_epoch: int | None = setting(None, "fixed subset per epoch (null: the whole train split, capped by train.max_steps)")
    val_epoch_freq: int | None = setting(None, "evaluate every N epochs (null: from train.eval_every)", ge=1)
    num_gpus: int = setting(1, "GPUs (torchrun processes)")
    # a random size from multiples of 32 between this and scratch.resolution, padded to it
    resize_min_size: int | None = setting(480, "multi-scale training resize: smallest size (null: always scratch.resolution)",
                                          ge=32, why="SAM3's sizes are multiples of 32")
    max_dets_per_img: int = setting(-1, "detections kept per image for validation (-1: all, SAM3's default)",
                                    check=(lambda v: v == -1 or v >= 1, "must be -1 (all detections) or >= 1"))
    # SAM3's default trades compute for memory; False is the fallback if a recompute fails
    activation_checkpointing: bool = setting(True, "recompute activations in the backward pass")


@dataclass
class Config:
    stage: Literal[1, 2] = setting(1, "1: the whole vessel tree; 2: SYNTAX segments")
    backend: Literal["core", "sam3"] = setting("core", "core: angioexp's own model; sam3: SAM3's trainer")
    seed: int = setting(0, "random seed")
    init_from: str | None = setting(None, "weights to start from: checkpoint, run or models:/ URI (none/scratch: from scratch)",
                                    parse=lambda v: None if isinstance(v, str) and v.strip().lower() in ("", "none", "scratch") else v)
    min_loaded_fraction: float = setting(0.9, "fail when fewer of the model's tensors were loaded", **UNIT)
    data: DataConfig = section(DataConfig, "training data")
    scratch: ScratchConfig = section(ScratchConfig, "SAM3's scratch section: resolution, learning rates, schedule, batches")
    optim: OptimConfig = section(OptimConfig, "optimizer")
    matcher: MatcherConfig = section(MatcherConfig, "one-to-one Hungarian matcher costs")
    o2m: O2MConfig = section(O2MConfig, "one-to-many auxiliary matching")
    loss: LossConfig = section(LossConfig, "loss weights (SAM3's names)")
    prompts: PromptConfig = section(PromptConfig, "how prompts are built per query")
    model: ModelConfig = section(ModelConfig, "the core model's size (ignored by the sam3 backend)")
    nan_guard: NanGuardConfig = section(NanGuardConfig, "non-finite step recovery")
    train: TrainConfig = section(TrainConfig, "training loop")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    tracking: TrackingConfig = section(TrackingConfig, "MLflow tracking and registry")
    sam3: Sam3Config = section(Sam3Config, "settings only the sam3 backend reads")


# ---------------------------------------------------------------------------------------------
# Defaults by (backend, stage): the one place besides the fields above where a default lives.
# load_config applies the rows that match, least specific first — (backend, ANY), (ANY, stage),
# (backend, stage) — to every key the YAML file and the overrides leave unset, so an explicit
# value always means the same thing in both backends and stages.

ANY = None

DEFAULTS: dict[tuple[str | None, int | None], dict[str, Any]] = {
    # SAM3's own fine-tuning recipe (roboflow_v100_full_ft_100_images.yaml)
    ("sam3", ANY): {
        "scratch.resolution": 1008,  # the ViT's native size (the core default 512 is not a multiple of 336)
        "scratch.crop_size": None,  # SAM3 trains on whole images (the core default crops 256²)
        "scratch.train_batch_size": 1,
        "scratch.val_batch_size": 1,
        "scratch.lr_scale": 0.1,
        "scratch.scheduler_warmup": 20,
        "scratch.scheduler_timescale": 20,
        "scratch.scheduler_cooldown": 20,
        "o2m.enabled": True,  # SAM3 always decodes one-to-many (DAC) queries; o2m_weight 2
        "train.ema_decay": None,  # SAM3's trainer keeps no weight average
        "scratch.num_train_workers": 10,  # RLE decoding + point sampling at 1008 px off the main process
        "scratch.hflip_prob": 0.0,  # SAM3's recipe does not flip
        "train.deterministic": False,  # SAM3: cudnn.benchmark on, cudnn.deterministic off
        "loss.masks.resize": "predictions",  # SAM3's Masks and SemanticSegCriterion upsample the logits
        "loss.semantic.resize": "predictions",
        "loss.view.loss_view": 0.0,  # SAM3 has no view head
        # the dense identity term is an opt-in extra on SAM3's objective (no per-segment presence)
        "loss.identity.loss_identity_ce": 0.0,
        "loss.identity.loss_identity_dice": 0.0,
        "loss.identity.loss_identity_presence": 0.0,
    },
    # Stage 2, every backend
    (ANY, 2): {
        "init_from": STAGE1_INIT_DEFAULT,  # fine-tune the Stage 1 champion (init_from=none: from scratch)
        "scratch.hflip_prob": 0.0,  # segment names are side-specific: a mirrored tree is not an anatomy
    },
    # core Stage 2: whole frames at 256 — a segment's name (proximal / mid / distal, first / second
    # diagonal) is a property of the whole tree, which a crop cuts away — with the global-context
    # aids of ModelConfig; a Stage 1 checkpoint loads into them, their new tensors reported as new
    # by design (docs/decisions.md: core Stage 2 on whole frames at 256)
    ("core", 2): {
        "scratch.resolution": 256,
        "scratch.crop_size": None,
        "model.context_layers": 2,
        "model.region_masks": True,
        "model.identity_head": True,
        "model.identity_levels": 2,  # region map refined at strides 8 and 4 (docs/decisions.md)
        "model.presence_evidence": True,  # presence reads its segment's pixels (docs/decisions.md)
        # the identity head supervises every segment of a frame each step; SAM3's per-prompt
        # objective beside it cost steps and scored lower at equal steps (docs/decisions.md), so
        # it is off; turned back on, it decodes one present and one absent prompt per image
        "loss.per_prompt": False,
        # at 2 frames per step the batch's pixel frequencies are noisy: milder class weights
        # scored higher (docs/decisions.md)
        "loss.identity.class_weight_power": 0.25,
        "prompts.positives_per_image": 1,
        "prompts.negatives_per_image": 1,
        # small batches: more updates per minute, a higher score at equal time; the step cap is
        # what the main job's 14-minute Stage 2 budget fits on 2 CPU cores (docs/decisions.md)
        "scratch.train_batch_size": 2,
        "train.max_steps": 3000,
        "train.eval_every": 1000,
        "train.checkpoint_every": 1000,
        "tracking.primary_metric": "val/segments/dice_common",
    },
}


# ---------------------------------------------------------------------------------------------
# Settings that cannot go together, refused at load time naming both keys. A key ending in "."
# is a section: the first of its keys that differs from its default is named.


class Contradiction(NamedTuple):
    key: str
    other: str
    when: Callable[[Config], bool]
    why: str
    # what the code did before this rule existed, applied to a run's stored config (which ran)
    stored_fix: dict[str, Any] | None = None


CONTRADICTIONS: list[Contradiction] = [
    Contradiction("o2m.enabled", "backend", lambda c: c.backend == "core" and c.o2m.enabled,
                  "the core model has no one-to-many queries (its criterion fails at the first step); "
                  "set o2m.enabled=false or backend=sam3"),
    Contradiction("optim.amp.amp_dtype", "backend",
                  lambda c: c.backend == "core" and c.optim.amp.enabled and c.optim.amp.amp_dtype == "float16",
                  "the core loop runs autocast without a GradScaler, so float16 gradients underflow; use bfloat16, "
                  "optim.amp.enabled=false or backend=sam3"),
    Contradiction("scratch.hflip_prob", "stage", lambda c: c.stage == 2 and c.scratch.hflip_prob > 0,
                  "no flips in Stage 2: segment names are side-specific (a mirrored tree is not an anatomy)",
                  stored_fix={"scratch.hflip_prob": 0.0}),
    Contradiction("sam3.", "backend", lambda c: c.backend == "core" and _changed_under(c, "sam3.") is not None,
                  "only the sam3 backend reads sam3.*; set backend=sam3 or leave it unset"),
    Contradiction("loss.per_prompt", "model.identity_head",
                  lambda c: not c.loss.per_prompt and not (c.backend == "core" and c.model.identity_head),
                  "without the per-prompt objective only the core identity head would learn anything; "
                  "set loss.per_prompt=true, or model.identity_head=true with backend=core"),
    Contradiction("model.identity_levels", "model.encoder_channels",
                  lambda c: c.model.identity_levels > len(c.model.encoder_channels),
                  "the pixel decoder has one top-down map per entry of model.encoder_channels; "
                  "ask for at most that many identity levels"),
    Contradiction("prompts.use_text", "stage",
                  lambda c: (c.stage == 2 and c.backend == "core" and not c.prompts.use_text
                             and c.prompts.num_points[1] == 0 and c.prompts.box_chance == 0),
                  "Stage 2 needs a way to say which segment is wanted: enable prompts.use_text or give points/boxes"),
]


# ---------------------------------------------------------------------------------------------
# Keys, flatten / unflatten


class Leaf(NamedTuple):
    type: Any  # declared type
    field: dataclasses.Field


@functools.cache
def key_fields(cls: type = None, prefix: str = "") -> dict[str, Leaf]:
    """Every settable dotted key → its declared type and dataclass field (help, constraints)."""
    hints = typing.get_type_hints(cls or Config)
    out: dict[str, Leaf] = {}
    for f in dataclasses.fields(cls or Config):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(key_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = Leaf(hints[f.name], f)
    return out


def all_keys(cls: type = None, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key → its declared type."""
    return {key: leaf.type for key, leaf in key_fields(cls, prefix).items()}


def sections(cls: type = None, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every section's dotted name → its field (the help text is in its metadata)."""
    hints = typing.get_type_hints(cls or Config)
    out = {}
    for f in dataclasses.fields(cls or Config):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f"{prefix}{f.name}"] = f
            out.update(sections(hints[f.name], f"{prefix}{f.name}."))
    return out


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclass → {"section.key": value}; derived LRs included under scratch.*."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    if isinstance(cfg, ScratchConfig):
        out[f"{prefix}lr_transformer"] = cfg.lr_transformer
        out[f"{prefix}lr_vision_backbone"] = cfg.lr_vision_backbone
        out[f"{prefix}lr_language_backbone"] = cfg.lr_language_backbone
    return out


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (YAML-ready; tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _put(cfg: Any, key: str, value: Any) -> None:
    section_name, _, name = key.rpartition(".")
    setattr(_get(cfg, section_name) if section_name else cfg, name, value)


def _build(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kwargs[f.name] = _build(hints[f.name], flat, key + ".") if dataclasses.is_dataclass(hints[f.name]) else flat[key]
    return cls(**kwargs)


def _suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if not close:
        # try on the last component only (e.g. "lr_scal" → scratch.lr_scale)
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        tail = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        close = [tails[tail[0]]] if tail else []
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Typed values: pydantic validates each key against its declared type and its field's constraints


_PYDANTIC = pydantic.ConfigDict(coerce_numbers_to_str=True, allow_inf_nan=False)
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string",
               "tuple": "a list", "list": "a list"}


def without_null(tp: Any) -> Any:
    """``X | None`` → X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def nullable(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def describe_bounds(key: str) -> str:
    """The field's constraints in words ("must be in [0, 1]"), "" when it has none."""
    meta = key_fields()[key].field.metadata
    b, parts = meta["bounds"], []
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = (b["le"], "]") if "le" in b else (b["lt"], ")") if "lt" in b else None
    if "multiple_of" in b:
        parts.append(f"a multiple of {b['multiple_of']}")
    if lo and hi:
        parts.append(f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}")
    elif lo:
        parts.append(f"{'>=' if lo[0] == '[' else '>'} {lo[1]}")
    elif hi:
        parts.append(f"{'<=' if hi[1] == ']' else '<'} {hi[0]}")
    text = "must be " + " and ".join(parts) if parts else (meta["check"][1] if meta["check"] else "")
    if text and meta["why"]:
        text += f" ({meta['why']})"
    if parts and nullable(key_fields()[key].type):
        text += " (or null)"
    return text


def _checked(check: Check) -> Callable[[Any], Any]:
    predicate, message = check

    def validator(value):
        if value is not None and not predicate(value):
            raise ValueError(message)
        return value

    return validator


@functools.cache
def _adapter(key: str) -> pydantic.TypeAdapter:
    leaf = key_fields()[key]
    meta = leaf.field.metadata
    extras = ([pydantic.Field(**meta["bounds"])] if meta["bounds"] else []) + (
        [pydantic.AfterValidator(_checked(meta["check"]))] if meta["check"] else [])
    return pydantic.TypeAdapter(Annotated[(leaf.type, *extras)] if extras else leaf.type, config=_PYDANTIC)


def _where(source: str | None) -> str | None:
    """A source label as an error location: the file's path for a file."""
    return source[len("file "):] if source and source.startswith("file ") else source


def _typed(key: str, value: Any, source: str | None) -> Any:
    """``value`` (YAML-typed, or text) as the key's declared type, checked; ConfigError otherwise."""
    leaf = key_fields()[key]
    base = without_null(leaf.type)
    fail = functools.partial(ConfigError, file=_where(source), key=key)
    if leaf.field.metadata["parse"]:
        value = leaf.field.metadata["parse"](value)
    # what pydantic does not take: "none" for null, "1,3" for a list, a Path for text; a bool is no number
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and nullable(leaf.type) and value.strip().lower() in ("null", "none", "~"):
        value = None
    if isinstance(value, str) and typing.get_origin(base) is tuple:
        value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
    if isinstance(value, bool) and base in (int, float):
        raise fail(f"expected {_TYPE_WORDS[base.__name__]}, got {value!r}")
    try:
        return _adapter(key).validate_python(value)
    except pydantic.ValidationError as exc:
        errors = [e for e in exc.errors() if e["type"] != "none_required"] or exc.errors()
        kind = errors[0]["type"]
        if kind in _BOUND_ERRORS:
            reason = describe_bounds(key)
        elif kind == "literal_error":
            reason = f"must be one of {list(typing.get_args(base))}"
        elif kind == "value_error":
            reason = str(errors[0]["ctx"]["error"])
        elif kind in ("too_long", "too_short"):
            reason = f"expected {len(typing.get_args(base))} values"
        elif kind == "finite_number":
            reason = "must be a finite number"
        else:
            word = next((w for prefix, w in _TYPE_WORDS.items() if kind.startswith(prefix)), None)
            reason = f"expected {word}" if word else errors[0]["msg"]
        raise fail(f"{reason}, got {value!r}") from None


def show_value(value: Any) -> str:
    """A value as YAML writes it inline (true, null, [1, 3], 0.1)."""
    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=10_000).removesuffix("\n").removesuffix("\n...")


def _yaml_value(text: str) -> Any:
    """``--set`` text → the value YAML gives it (strings YAML would turn into dates stay text)."""
    try:
        parsed = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    return parsed if isinstance(parsed, (int, float, bool, list, type(None), str)) else text


# ---------------------------------------------------------------------------------------------
# Provenance


def sources(cfg: Config) -> dict[str, str]:
    """Where each key's value came from: "default", "backend sam3", "stage 2", "core stage 2",
    "file my.yaml", "--set", a command-line flag ("--stage", "--max-steps") or "code"."""
    recorded = getattr(cfg, "_sources", {})
    return {key: recorded.get(key, "default") for key in key_fields()}


def _record(cfg: Config, key: str, source: str) -> None:
    if not hasattr(cfg, "_sources"):
        cfg._sources = {}
    cfg._sources[key] = source


def _layers(backend: str, stage: int) -> list[tuple[str, dict[str, Any]]]:
    """The DEFAULTS rows that apply, least specific first, each with its source label."""
    rows = (((backend, ANY), f"backend {backend}"), ((ANY, stage), f"stage {stage}"),
            ((backend, stage), f"{backend} stage {stage}"))
    return [(label, DEFAULTS[row]) for row, label in rows if row in DEFAULTS]


def defaults_for(backend: str, stage: int) -> dict[str, tuple[Any, str]]:
    """Every key's default for this backend and stage → (value, source)."""
    out = {key: (leaf.field.default, "default") for key, leaf in key_fields().items()}
    for label, row in _layers(backend, stage):
        out.update({key: (value, label) for key, value in row.items()})
    return out


def _changed_under(cfg: Config, prefix: str) -> str | None:
    """The first key under ``prefix`` whose value differs from this backend and stage's default."""
    defaults = defaults_for(cfg.backend, cfg.stage)
    for key in key_fields():
        if key.startswith(prefix) and _get(cfg, key) != _typed(key, defaults[key][0], defaults[key][1]):
            return key
    return None


# ---------------------------------------------------------------------------------------------
# Load / override / validate


def _mapping_leaves(data: Any, source: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """A YAML mapping → {dotted key: (value, source)}; unknown keys refused with the nearest."""
    where = _where(source)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", file=where, key=prefix.rstrip(".") or None)
    leaves, groups, out = key_fields(), sections(), {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in groups:
            out.update(_mapping_leaves(value, source, key + "."))
        elif key in leaves:
            out[key] = (value, source)
        else:
            raise ConfigError(f"unknown config key{_suggest(key, leaves)}", file=where, key=key)
    return out


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override must look like key=value, got {text!r}", key=text)
    key, value = text.split("=", 1)
    return key.strip(), value


# Keys added after runs were stored: a stored config without one ran the code of its day, which
# behaved like this value, whatever today's default is.
BEFORE_THE_KEY_EXISTED: dict[str, Any] = {"loss.per_prompt": True, "model.identity_levels": 0,
                                           "model.presence_evidence": False}


def _resolve(explicit: dict[str, tuple[Any, str]], *, stored: bool) -> Config:
    """Field defaults ← DEFAULTS rows of the resolved (backend, stage) ← ``explicit``; validated."""
    if stored:
        explicit = {**{key: (value, "stored config (key added later)") for key, value in BEFORE_THE_KEY_EXISTED.items()},
                    **explicit}
    pick = {key: explicit.get(key, (key_fields()[key].field.default, "default")) for key in ("stage", "backend")}
    stage, backend = (_typed(key, *pick[key]) for key in ("stage", "backend"))
    resolved = {**defaults_for(backend, stage), **explicit}
    cfg = _build(Config, {key: _typed(key, value, origin) for key, (value, origin) in resolved.items()})
    cfg._sources = {key: origin for key, (_, origin) in resolved.items()}
    return validate(cfg, stored=stored)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    stage: int | None = None,
    backend: str | None = None,
    stored: bool = False,
) -> Config:
    """Field defaults ← :data:`DEFAULTS` for the backend and stage ← YAML file ← explicit
    stage/backend ← ``key=value`` overrides; then validated (:func:`validate`).

    ``stored``: the file is a run's own config (it ran): see :func:`validate`.
    """
    explicit: dict[str, tuple[Any, str]] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", file=p)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", file=p) from None
        explicit.update(_mapping_leaves(data, f"file {path}"))
    if stage is not None:
        explicit["stage"] = (stage, "--stage")
    if backend is not None:
        explicit["backend"] = (backend, "--backend")
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in key_fields():
            raise ConfigError(f"unknown config key{_suggest(key, key_fields())}", file="--set", key=key)
        explicit[key] = (_yaml_value(value), "--set")
    return _resolve(explicit, stored=stored)


def config_from_dict(data: dict, *, source: str | Path | None = None) -> Config:
    """A run's stored config (a checkpoint's or a logged config.yaml's plain dict) → Config."""
    return _resolve(_mapping_leaves(data, f"file {source}" if source else "stored config"), stored=True)


def set_value(cfg: Config, key: str, value: Any, source: str | None = None) -> None:
    """Set one dotted key (value as YAML text or a Python value), typed and checked; recorded as
    the value's source. Call :func:`validate` after the last one (contradictions)."""
    if key not in key_fields():
        raise ConfigError(f"unknown config key{_suggest(key, key_fields())}", file=source, key=key)
    _put(cfg, key, _typed(key, _yaml_value(value) if isinstance(value, str) else value, source))
    _record(cfg, key, source or "code")


def validate(cfg: Config, source: str | None = None, *, stored: bool = False) -> Config:
    """Check every value against its field and refuse :data:`CONTRADICTIONS`, naming both keys.

    ``stored``: a run's own config, which already ran — contradictions are not refused, and those
    the code used to resolve silently are resolved the same way (``Contradiction.stored_fix``)."""
    origin = sources(cfg)
    for key in key_fields():  # values code assigned directly are checked (and typed) too
        _put(cfg, key, _typed(key, _get(cfg, key), source or origin[key]))
    for rule in CONTRADICTIONS:
        if not rule.when(cfg):
            continue
        if stored:
            for key, value in (rule.stored_fix or {}).items():
                set_value(cfg, key, value, "stored config (fixed)")
            continue
        key = _changed_under(cfg, rule.key) if rule.key.endswith(".") else rule.key
        blame = origin[key] if origin[key] != "default" else origin[rule.other]
        other_origin = f" ({origin[rule.other]})" if origin[rule.other] != blame else ""
        raise ConfigError(f"{show_value(_get(cfg, key))} contradicts {rule.other}={show_value(_get(cfg, rule.other))}"
                          f"{other_origin}: {rule.why}", file=source or _where(blame), key=key)
    return cfg


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"angioexp-stage{cfg.stage}"
