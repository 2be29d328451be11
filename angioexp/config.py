"""One typed configuration for both training backends.

Section and key names follow SAM3's Hydra config (``scratch.lr_scale``, ``loss.masks.loss_mask``,
``matcher.cost_giou`` …) so that a value means the same thing in the ``core`` and ``sam3``
backends and in a sweep. YAML files and ``--set key=value`` overrides are validated against
these dataclasses: unknown keys are rejected with the nearest valid key, values are coerced to
the declared type and range-checked.

    cfg = load_config("my.yaml", overrides=["scratch.lr_scale=0.1"], stage=2)
    cfg.scratch.lr_transformer          # effective LRs derive from lr_scale
    flatten(cfg)                        # {"scratch.lr_scale": 0.1, ...} for MLflow params
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from angioexp.errors import ConfigError

# SAM3's base learning rates, multiplied by scratch.lr_scale (sam3/train/configs/*).
BASE_LR_TRANSFORMER = 8e-4
BASE_LR_VISION_BACKBONE = 2.5e-4
BASE_LR_LANGUAGE_BACKBONE = 5e-5


@dataclass
class DataConfig:
    """Where the training data comes from."""

    coco_dir: str | None = None  # COCO root from `angioexp convert`; None → bundled synthetic data
    index_csv: str | None = None  # a raw index.csv to convert (used when coco_dir is None)
    convert_size: int | None = None  # index_csv only: scale frames' longer side to N px (None: keep)
    cache_dir: str = "data"  # prepared datasets are cached here, keyed by their digest
    synth_cases: int = 240  # synthetic default: patients/cases to generate
    synth_seed: int = 0
    synth_size: int = 512
    synth_frames: int = 8
    train_split: str = "train"
    val_split: str = "val"
    max_val_images: int | None = None  # cap evaluation cost during training
    # Stage 2: draw frames ∝ max over their segments of (1 / segment frequency)^power, so frames
    # with rare segments (ramus, lettered sub-branches) come round more often; 0 = plain epochs
    rare_segment_power: float = 0.0
    use_clean_val_labels: bool = True  # score against gt_mask_path when the data has it


@dataclass
class AmpConfig:
    enabled: bool = True  # bf16 autocast on CUDA; ignored on CPU
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"


@dataclass
class GradientClipConfig:
    max_norm: float | None = 0.1  # SAM3 default; None disables clipping
    norm_type: float = 2.0


@dataclass
class OptimConfig:
    amp: AmpConfig = field(default_factory=AmpConfig)
    gradient_clip: GradientClipConfig = field(default_factory=GradientClipConfig)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ScratchConfig:
    """SAM3's ``scratch`` section: resolution, learning-rate scale, schedule, batch sizes."""

    # core default: the frames' native 512 (thin vessels stay sharp), trained on 256² crops (H4b,
    # measured on the synthetic benchmark); SAM3 native: 1008 (multiples of 336 keep its windows exact)
    resolution: int = 512
    enable_segmentation: bool = True
    max_ann_per_img: int = 200
    # core default 3: a model trained from scratch wants 3× SAM3's base LRs (synthetic benchmark, 600
    # steps: Stage 1 test Dice 0.817 → 0.851, tolerant AP75 0.50 → 0.84); sam3 backend: 0.1
    lr_scale: float = 3.0
    lrd_vision_backbone: float = 0.9  # layer-wise LR decay over the image encoder's stages
    wd: float = 0.1
    scheduler_warmup: int = 50  # steps
    scheduler_timescale: int = 200  # steps; InverseSquareRoot decay constant
    scheduler_cooldown: int = 50  # steps of linear decay to 0 at the end
    train_batch_size: int = 8
    val_batch_size: int = 8
    num_train_workers: int = 0
    crop_size: int | None = 256  # random square crops at train time (None: whole image; sam3 and core Stage 2: None)
    # core backend, Stage 1 only: horizontal flips at train time (a mirrored image's C-arm view
    # becomes "unknown"); never in Stage 2, whose segment names are side-specific (a mirrored tree
    # is not an anatomy)
    hflip_prob: float = 0.5

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

    focal: bool = True
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


@dataclass
class O2MConfig:
    """One-to-many auxiliary matching (BinaryOneToManyMatcher) and its loss weight."""

    enabled: bool = False
    o2m_weight: float = 2.0
    alpha: float = 0.3
    threshold: float = 0.4
    topk: int = 4


@dataclass
class BoxesLossConfig:
    loss_bbox: float = 5.0
    loss_giou: float = 2.0


@dataclass
class IABCELossConfig:
    """IABCEMdetr: IoU-aware focal classification with a presence token."""

    loss_ce: float = 20.0
    presence_loss: float = 20.0
    pos_weight: float = 10.0
    alpha: float = 0.25
    gamma: float = 2.0
    use_presence: bool = True
    pos_focal: bool = False
    # SAM3's configs pad to 200 queries: loss_ce = Σ / (pad_n_queries·B) when the model has fewer
    # queries, so a small model keeps a 200-query model's loss scale. None: mean over B·Q.
    pad_n_queries: int | None = None


@dataclass
class MasksLossConfig:
    """Instance-mask loss: sigmoid focal + Dice, optionally on importance-sampled points."""

    loss_mask: float = 200.0  # SAM3's segmentation example; the researcher used 5
    loss_dice: float = 10.0  # SAM3's segmentation example; the researcher used 5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    num_sample_points: int | None = None  # None: dense loss on every pixel
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # Who is resampled when mask logits and targets differ in size (angioexp.losses.loss_fns):
    # "targets_area" (targets area-averaged to the logits: soft, thin vessels kept), "predictions"
    # (logits upsampled to the target: SAM3's Masks), "targets_sam3" (bilinear → bool).
    resize: Literal["targets_area", "predictions", "targets_sam3"] = "targets_area"


@dataclass
class SemanticLossConfig:
    """SemanticSegCriterion: per-pixel semantic head (+ Dice, + presence)."""

    loss_semantic_seg: float = 20.0
    loss_semantic_dice: float = 30.0
    loss_semantic_presence: float = 1.0
    focal: bool = True
    focal_alpha: float = 0.6
    focal_gamma: float = 2.0
    presence_loss: bool = False
    # SAM3's presence_head: seg/Dice averaged over find queries whose concept is present only
    presence_head: bool = True
    # as loss.masks.resize; SAM3's downsample=False is "predictions", downsample=True "targets_sam3"
    resize: Literal["targets_area", "predictions", "targets_sam3"] = "targets_area"


@dataclass
class ViewLossConfig:
    """Auxiliary classification of the C-arm view from image features."""

    loss_view: float = 0.5


@dataclass
class IdentityLossConfig:
    """Dense segment identity (core, model.identity_head): per-pixel softmax over background + every
    prompt of the category set, class-weighted cross-entropy + per-class soft Dice + presence BCE."""

    loss_identity_ce: float = 20.0
    loss_identity_dice: float = 20.0
    loss_identity_presence: float = 5.0
    # class weight ∝ (pixel frequency in the batch)^-power: 0 plain CE, 1 fully balanced
    class_weight_power: float = 0.5


@dataclass
class LossConfig:
    boxes: BoxesLossConfig = field(default_factory=BoxesLossConfig)
    iabce: IABCELossConfig = field(default_factory=IABCELossConfig)
    masks: MasksLossConfig = field(default_factory=MasksLossConfig)
    semantic: SemanticLossConfig = field(default_factory=SemanticLossConfig)
    view: ViewLossConfig = field(default_factory=ViewLossConfig)
    identity: IdentityLossConfig = field(default_factory=IdentityLossConfig)


@dataclass
class PromptConfig:
    """How prompts are built for each (image, category) query (RandomGeometricInputsAPI)."""

    use_text: bool = True  # the category's text prompt as a token
    num_points: tuple[int, int] = (0, 0)  # [lo, hi] positive points per query
    num_negative_points: int = 0
    box_chance: float = 0.0  # probability that a query also gets a box prompt
    point_sample_mode: Literal["centreline", "centered", "random"] = "centreline"
    geometric_query_str: str = "visual"
    resample_box_from_mask: bool = True
    box_noise_std: float = 0.0  # box prompt jitter, relative to box side (SAM3's noise_box)
    box_noise_max: float | None = None  # clip the jitter to this many pixels (None: no clip)
    negatives_per_image: int = 2  # Stage 2: absent categories queried per image (presence training)
    # core backend, Stage 2: present categories queried per training image (sampled; None = all).
    # Bounds the cost of a step: every find query gets full-resolution mask logits.
    positives_per_image: int | None = 4


@dataclass
class ModelConfig:
    """Size of the core model (ignored by the sam3 backend)."""

    encoder_channels: tuple[int, ...] = (16, 32, 64, 96)  # one per stride 2, 4, 8, 16
    d_model: int = 96
    num_queries: int = 8
    decoder_layers: int = 2
    num_heads: int = 4
    use_view_conditioning: bool = True
    stem_channels: int = 8  # full-resolution encoder features (the finest skip of the pixel decoder)
    mask_dim: int = 16  # per-pixel embedding width that query embeddings are dotted with
    mask_guided_boxes: bool = True  # box = the query's mask extent, refined by the box head
    semantic_mask_base: bool = False  # instance mask logits = semantic mask + query term (Stage 2 aid; small gain in a 300-step probe)
    num_views: int = 0  # 0: derived from angioexp.prompts.views.VIEW_CLASSES
    # Stage 2 aids, on by default in core Stage 2 only (STAGE_DEFAULTS: 0.28 vs 0.24 semantic
    # per-segment Dice at 200 steps on whole frames). context_layers: global self-attention layers
    # over the stride-16 image tokens, fed back into the pixel decoder so per-pixel embeddings see
    # the whole tree. region_masks: mask logits += a coarse prompt-conditioned region map
    # (query · stride-16 memory, upsampled): "which segment" from global context, thin shape from
    # the fine embedding. Their output projections start at zero; a Stage 1 checkpoint without
    # them loads with these parameters reported as missing.
    context_layers: int = 0
    region_masks: bool = False
    # Stage 2: one per-pixel softmax over background + every segment prompt (angioexp.model.identity);
    # Stage 2 evaluations then take each segment's mask and score from it.
    identity_head: bool = False


@dataclass
class NanGuardConfig:
    max_consecutive: int = 3  # K non-finite steps in a row → restore last good state
    lr_backoff: float = 0.5  # multiply every LR by this on each restore
    max_restores: int = 4  # give up (TrainingDiverged) after this many restores
    snapshot_every: int = 25  # keep an in-memory last-good state every N good steps
    # a finite loss above this × the run's initial loss is a bad step too (null: only NaN/Inf)
    max_loss_ratio: float | None = 100.0


@dataclass
class TrainConfig:
    max_steps: int = 600
    budget_minutes: float | None = None  # stop cleanly at this wall time
    eval_every: int = 200
    log_every: int = 10
    checkpoint_every: int = 200
    out_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = True
    threads: int | None = None  # torch.set_num_threads; None = library default
    # core backend: evaluate and keep an exponential moving average of the weights (null: the
    # raw weights). Ramped as min(decay, (1+n)/(10+n)) so short runs are not dragged to the init.
    # Default Stage 1 run, val Dice every 100 steps: raw 0.73 0.78 0.74 0.85 0.86 0.85, averaged
    # 0.74 0.79 0.83 0.84 0.85 0.86 — no dips for the best-checkpoint choice to land on.
    ema_decay: float | None = 0.99


@dataclass
class EvalConfig:
    tolerance_px: int = 1  # boundary tolerance for the tolerant AP / Boundary IoU
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    overlays: int = 8  # prediction overlay PNGs per evaluation
    # Stage 2 with the identity head: relabel the predicted tree branch by branch in anatomical
    # order (angioexp.postprocess.tree_labels) instead of taking each pixel's most probable segment
    tree_labelling: bool = False


@dataclass
class TrackingConfig:
    experiment: str | None = None  # default: angioexp-stage{stage}
    register: bool = True
    primary_metric: str = "val/AP75_tol"  # champion is decided on this
    primary_mode: Literal["max", "min"] = "max"
    log_system_metrics: bool = True
    run_name: str | None = None


@dataclass
class Sam3Config:
    """Settings only the sam3 backend reads."""

    checkpoint: str | None = None  # vanilla sam3.pt, a trainer checkpoint or models:/… URI
    # key prefix of SAM3's tree in a foreign state dict (SAM3 inside another model, e.g. "model.sam.");
    # None: found by matching key suffixes and shapes
    checkpoint_prefix: str | None = None
    bpe_path: str | None = None  # None: look in installed packages
    # SAM3's trainer is epoch based: None → ceil(train.max_steps / steps per epoch) epochs.
    max_epochs: int | None = None
    # None: the whole train split per epoch (capped by train.max_steps); else a fixed subset.
    steps_per_epoch: int | None = None
    # None: evaluate every ceil(train.eval_every / steps per epoch) epochs (SAM3 validates at epoch ends)
    val_epoch_freq: int | None = None
    num_gpus: int = 1
    # SAM3's multi-scale training resize: a random size from multiples of 32 between this and
    # scratch.resolution, then padded to scratch.resolution (None: always scratch.resolution)
    resize_min_size: int | None = 480
    max_dets_per_img: int = -1  # detections kept per image for validation (SAM3: -1 = all)
    # SAM3 recomputes activations in the backward pass (its default: memory for compute);
    # False keeps them (faster, more memory; the fallback if a recompute fails).
    activation_checkpointing: bool = True


@dataclass
class Config:
    stage: Literal[1, 2] = 1
    backend: Literal["core", "sam3"] = "core"
    seed: int = 0
    init_from: str | None = None  # Stage 2 default: models:/angio-stage1@champion
    min_loaded_fraction: float = 0.9  # fail when fewer of the model's tensors were loaded
    data: DataConfig = field(default_factory=DataConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    o2m: O2MConfig = field(default_factory=O2MConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sam3: Sam3Config = field(default_factory=Sam3Config)


STAGE1_INIT_DEFAULT = "models:/angio-stage1@champion"

# Value checks: key → (predicate, message). Applied after every load/override.
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "scratch.lr_scale": (lambda v: v > 0 and math.isfinite(v), "must be > 0"),
    "scratch.resolution": (lambda v: v >= 32 and v % 16 == 0, "must be a multiple of 16 and >= 32"),
    "scratch.train_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "scratch.val_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "scratch.wd": (lambda v: v >= 0, "must be >= 0"),
    "scratch.lrd_vision_backbone": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "scratch.scheduler_warmup": (lambda v: v >= 0, "must be >= 0"),
    "scratch.scheduler_timescale": (lambda v: v >= 1, "must be >= 1"),
    "scratch.scheduler_cooldown": (lambda v: v >= 0, "must be >= 0"),
    "scratch.crop_size": (lambda v: v is None or (v >= 32 and v % 16 == 0), "must be a multiple of 16 and >= 32"),
    "optim.gradient_clip.max_norm": (lambda v: v is None or v > 0, "must be > 0 (or null to disable)"),
    "prompts.num_points": (lambda v: 0 <= v[0] <= v[1], "must be [lo, hi] with 0 <= lo <= hi"),
    "prompts.box_chance": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "prompts.box_noise_std": (lambda v: v >= 0 and math.isfinite(v), "must be >= 0"),
    "prompts.box_noise_max": (lambda v: v is None or v >= 0, "must be >= 0 (or null)"),
    "loss.iabce.pad_n_queries": (lambda v: v is None or v >= 1, "must be >= 1 (or null)"),
    "loss.masks.num_sample_points": (lambda v: v is None or v >= 1, "must be >= 1 (or null for dense)"),
    "prompts.num_negative_points": (lambda v: v >= 0, "must be >= 0"),
    "prompts.negatives_per_image": (lambda v: v >= 0, "must be >= 0"),
    "prompts.positives_per_image": (lambda v: v is None or v >= 1, "must be >= 1 (or null for all)"),
    "scratch.hflip_prob": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "model.mask_dim": (lambda v: v >= 1, "must be >= 1"),
    "model.stem_channels": (lambda v: v >= 1, "must be >= 1"),
    "model.num_queries": (lambda v: v >= 1, "must be >= 1"),
    "model.context_layers": (lambda v: v >= 0, "must be >= 0"),
    "model.d_model": (lambda v: v >= 8, "must be >= 8"),
    "nan_guard.max_consecutive": (lambda v: v >= 1, "must be >= 1"),
    "nan_guard.lr_backoff": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "nan_guard.max_loss_ratio": (lambda v: v is None or v > 1, "must be > 1 (or null: only NaN/Inf is a bad step)"),
    "train.max_steps": (lambda v: v >= 1, "must be >= 1"),
    "train.budget_minutes": (lambda v: v is None or (v > 0 and math.isfinite(v)), "must be > 0 minutes (or null)"),
    "train.ema_decay": (lambda v: v is None or 0 < v < 1, "must be in (0, 1), or null for no averaging"),
    "eval.tolerance_px": (lambda v: v >= 0, "must be >= 0"),
    "min_loaded_fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "data.synth_cases": (lambda v: v >= 3, "must be >= 3 (one patient per split at least)"),
    "data.convert_size": (lambda v: v is None or 16 <= v <= 8192, "must be 16..8192 px (or null to keep)"),
}
# Every loss weight and focal parameter must be non-negative; alphas lie in [0, 1].
for _section in dataclasses.fields(LossConfig):
    _hints = typing.get_type_hints(typing.get_type_hints(LossConfig)[_section.name])
    for _name, _type in _hints.items():
        if _type is float:
            _CHECKS[f"loss.{_section.name}.{_name}"] = (
                (lambda v: 0 <= v <= 1, "must be in [0, 1]")
                if "alpha" in _name
                else (lambda v: v >= 0 and math.isfinite(v), "must be >= 0")
            )
for _name in ("cost_class", "cost_bbox", "cost_giou", "gamma"):
    _CHECKS[f"matcher.{_name}"] = (lambda v: v >= 0, "must be >= 0")
_CHECKS["matcher.alpha"] = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
# Tighter than the generic loss checks above (must come after them).
_CHECKS["loss.masks.oversample_ratio"] = (lambda v: v >= 1 and math.isfinite(v), "must be >= 1")
_CHECKS["loss.masks.importance_sample_ratio"] = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_CHECKS["data.rare_segment_power"] = (lambda v: 0 <= v <= 2, "must be in [0, 2]")
_CHECKS["loss.identity.class_weight_power"] = (lambda v: 0 <= v <= 1, "must be in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Flatten / unflatten / lookup


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


def all_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key → its declared type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(all_keys(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


def _suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if not close:
        # try on the last component only (e.g. "lr_scal" → scratch.lr_scale)
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        tail = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        close = [tails[tail[0]]] if tail else []
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Coercion


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError("; ".join(errors) or f"invalid value {value!r}", file=source, key=key)
    if origin is Literal:
        for arg in args:
            if value == arg or (isinstance(value, str) and str(arg) == value.strip()):
                return arg
        raise ConfigError(f"must be one of {list(args)}, got {value!r}", file=source, key=key)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", file=source, key=key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"expected {len(args)} values, got {list(value)!r}", file=source, key=key)
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"expected true/false, got {value!r}", file=source, key=key)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {value!r}", file=source, key=key)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"expected an integer, got {value!r}", file=source, key=key)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", file=source, key=key)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, got {value!r}", file=source, key=key) from None
        if math.isnan(number):
            raise ConfigError("NaN is not a valid value", file=source, key=key)
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"expected a string, got {value!r}", file=source, key=key)
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# Load / override / validate


def _apply_mapping(cfg: Any, mapping: dict, prefix: str, source: str | None, keys: dict[str, Any]) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"expected a mapping, got {type(mapping).__name__}", file=source, key=prefix.rstrip(".") or None)
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if not hasattr(cfg, str(name)):
            raise ConfigError(f"unknown config key{_suggest(key, keys)}", file=source, key=key)
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            _apply_mapping(current, value, key + ".", source, keys)
        else:
            setattr(cfg, name, _coerce(value, keys[key], key, source))


def set_value(cfg: Config, key: str, value: Any, source: str | None = None) -> None:
    """Set one dotted key (value as YAML text or a Python value), with type coercion."""
    keys = all_keys()
    if key not in keys:
        raise ConfigError(f"unknown config key{_suggest(key, keys)}", file=source, key=key)
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            parsed = value
        # keep strings that YAML would turn into dates etc. as plain text
        value = parsed if isinstance(parsed, (int, float, bool, list, type(None), str)) else value
    target: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        target = getattr(target, part)
    setattr(target, parts[-1], _coerce(value, keys[key], key, source))


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override must look like key=value, got {text!r}", key=text)
    key, value = text.split("=", 1)
    return key.strip(), value


def validate(cfg: Config, source: str | None = None) -> Config:
    flat = flatten(cfg)
    for key, (check, message) in _CHECKS.items():
        value = flat[key]
        try:
            ok = check(tuple(value) if isinstance(value, list) else value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{message}, got {value!r}", file=source, key=key)
    if cfg.stage == 2 and cfg.backend == "core" and cfg.prompts.use_text is False and cfg.prompts.num_points[1] == 0 and cfg.prompts.box_chance == 0:
        raise ConfigError(
            "Stage 2 needs a way to say which segment is wanted: enable prompts.use_text or give points/boxes",
            file=source, key="prompts.use_text",
        )
    return cfg


# Defaults that differ by backend (added by the sam3 backend): SAM3's own fine-tuning recipe
# (roboflow_v100_full_ft_100_images.yaml). Applied by load_config to keys the YAML file and the
# overrides leave unset, so an explicit value always means the same thing in both backends.
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "sam3": {
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
        # the identity term over SAM3's semantic logits (backends/sam3/identity_loss.py) is opt-in:
        # a CE or Dice weight > 0 switches it on; SAM3 has no per-segment presence logits
        "loss.identity.loss_identity_ce": 0.0,
        "loss.identity.loss_identity_dice": 0.0,
        "loss.identity.loss_identity_presence": 0.0,
    },
}


# Defaults that differ by (backend, stage), applied like BACKEND_DEFAULTS (after them).
# core Stage 2: whole frames at 256 instead of 256² crops of the 512 frame — the same pixels per
# step, but a segment's name (proximal / mid / distal, first / second diagonal) is a property of
# the whole tree, which a crop cuts away — and the global-context aids of ModelConfig (a Stage 1
# checkpoint loads into them; their new tensors are reported as new by design). Measured on the
# synthetic benchmark, 200 steps from the Stage 1 checkpoint, 16 val frames, semantic-head mean
# per-segment Dice: whole frames + aids 0.28, whole frames 0.24, 256² crops + aids 0.17 (the
# former default, 256² crops without aids: 0.23 after 600 steps).
STAGE_DEFAULTS: dict[tuple[str, int], dict[str, Any]] = {
    ("core", 2): {
        "scratch.resolution": 256,
        "scratch.crop_size": None,
        "model.context_layers": 2,
        "model.region_masks": True,
        "model.identity_head": True,
        # the identity head supervises every segment of a frame each step; the per-prompt
        # decoder (SAM3's objective, kept as an auxiliary task) needs few queries beside it
        "prompts.positives_per_image": 1,
        "prompts.negatives_per_image": 1,
        "tracking.primary_metric": "val/segments/dice_common",
    },
}


def _mapping_keys(data, prefix: str = ""):
    """Dotted keys of the leaves of a loaded YAML mapping."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _mapping_keys(value, key + ".")
        else:
            yield key


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    stage: int | None = None,
    backend: str | None = None,
) -> Config:
    """Defaults ← YAML file ← explicit stage/backend ← ``key=value`` overrides; then validate.

    Keys neither the file nor an override sets take the backend's defaults (``BACKEND_DEFAULTS``),
    then the backend and stage's (``STAGE_DEFAULTS``).

    Stage 2 gets ``init_from = models:/angio-stage1@champion`` unless the file or an override
    sets it (``init_from=none`` starts from scratch on purpose).
    """
    cfg = Config()
    keys = all_keys()
    source = str(path) if path else None
    explicit_init = False
    explicit: set[str] = set()  # keys the file or an override set (backend defaults skip them)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", file=p)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", file=p) from None
        _apply_mapping(cfg, data, "", source, keys)
        explicit_init = isinstance(data, dict) and "init_from" in data
        explicit |= set(_mapping_keys(data))
    if stage is not None:
        set_value(cfg, "stage", stage, "--stage")
    if backend is not None:
        set_value(cfg, "backend", backend, "--backend")
    for text in overrides or []:
        key, value = parse_override(text)
        set_value(cfg, key, value, "--set")
        explicit_init = explicit_init or key == "init_from"
        explicit.add(key.strip())
    layered = ((f"backend {cfg.backend} default", BACKEND_DEFAULTS.get(cfg.backend, {})),
               (f"{cfg.backend} stage {cfg.stage} default", STAGE_DEFAULTS.get((cfg.backend, cfg.stage), {})))
    for origin, defaults in layered:
        for key, value in defaults.items():
            if key not in explicit:
                set_value(cfg, key, value, origin)
    if cfg.stage == 2 and not explicit_init and cfg.init_from is None:
        cfg.init_from = STAGE1_INIT_DEFAULT
    if isinstance(cfg.init_from, str) and cfg.init_from.strip().lower() in ("", "none", "scratch"):
        cfg.init_from = None
    return validate(cfg, source)


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"angioexp-stage{cfg.stage}"
