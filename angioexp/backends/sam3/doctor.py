"""``angioexp doctor SAM3_CONFIG.yaml [--data COCO_DIR]``: what an existing SAM3 training config
(and a COCO folder) silently does.

Reads a SAM3 Hydra training config (e.g. ``configs/angiography/vessel_segmentation.yaml``),
lists every known pitfall it triggers — what SAM3 (PyPI 0.1.4) actually does with the setting,
the fix, and the angioexp key that does it properly — and prints the equivalent angioexp config
(``--write-config`` saves it). ``--data COCO_DIR`` checks the annotations for what SAM3's data
path trips on (zero-size boxes, RLE sizes, unused categories …). Needs neither ``sam3`` nor a GPU: the YAML is only read
(Hydra ``${…}`` interpolations and SAM3's ``times``/``add`` resolvers are evaluated here).

Exit code: 0 when no pitfall is found, 1 when some are, 2 on a bad file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from angioexp.errors import InputError

# SAM3's builder constants (sam3/model_builder.py, PyPI 0.1.4).
BUILDER_MATCHER = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "alpha": 0.25, "gamma": 2.0}
NATIVE_RESOLUTION = 1008
# SAM3's own segmentation example (roboflow_v100_full_ft_100_images.yaml, commented loss block).
EXAMPLE_MASK_WEIGHTS = {"loss_mask": 200.0, "loss_dice": 10.0}
IDENTITY_TARGET = "identity_loss.PromptIdentityLoss"  # the sam3 backend's opt-in identity term


@dataclass
class Finding:
    code: str
    severity: str  # "error": the setting has no effect or breaks; "warning": likely harmful
    where: str  # config key path
    what: str  # what SAM3 does with it
    fix: str
    angioexp: str  # the angioexp setting that does it

    def render(self, index: int) -> str:
        return (f"{index}. [{self.severity}] {self.code} — {self.where}\n"
                f"   SAM3:     {self.what}\n   fix:      {self.fix}\n   angioexp: {self.angioexp}")


# --- reading a Hydra config without Hydra ---------------------------------------------------------

_INTERP = re.compile(r"\$\{([^${}]+)\}")
_RESOLVERS = {
    "times": lambda *a: math.prod(float(x) for x in a),
    "add": lambda x, y: float(x) + float(y),
    "subtract": lambda x, y: float(x) - float(y),
    "divide": lambda x, y: float(x) / float(y),
    "pow": lambda x, y: float(x) ** float(y),
    "int": lambda x: int(float(x)),
    "ceil_int": lambda x: int(math.ceil(float(x))),
    "string": str,
}


class HydraView:
    """Dotted lookups into a loaded YAML with ``${a.b}`` and ``${times:x,y}`` resolved."""

    def __init__(self, data: dict):
        self.data = data

    def raw(self, path: str, default=None):
        node: Any = self.data
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node

    def get(self, path: str, default=None):
        return self.resolve(self.raw(path, default))

    def resolve(self, value, depth: int = 0):
        if depth > 20 or not isinstance(value, str) or "${" not in value:
            return value
        whole = _INTERP.fullmatch(value.strip())
        if whole:
            return self.resolve(self._one(whole.group(1), depth), depth + 1)
        return _INTERP.sub(lambda m: str(self._one(m.group(1), depth)), value)

    def _one(self, expr: str, depth: int):
        if ":" in expr:
            name, _, args = expr.partition(":")
            fn = _RESOLVERS.get(name.strip())
            if fn is None:
                return f"${{{expr}}}"
            try:
                return fn(*(self.resolve(a.strip(), depth + 1) if a.strip().startswith("$") else _num(a.strip())
                            for a in _split_args(args)))
            except (TypeError, ValueError):
                return f"${{{expr}}}"
        return self.resolve(self.raw(expr.strip()), depth + 1)


def _split_args(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    out.append(cur)
    return out


def _num(text: str):
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def walk(node, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every mapping in the tree with its dotted path (lists index as numbers)."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}.{i}")


def targets(data: dict, suffix: str) -> list[tuple[str, dict]]:
    """Mappings whose ``_target_`` ends with ``suffix`` (class name or dotted path)."""
    return [(p, n) for p, n in walk(data) if isinstance(n.get("_target_"), str) and n["_target_"].endswith(suffix)]


# --- the checks ------------------------------------------------------------------------------------


def diagnose(data: dict) -> tuple[list[Finding], dict]:
    """Findings for a SAM3 config (a loaded YAML mapping) and the equivalent angioexp config."""
    v = HydraView(data)
    findings: list[Finding] = []
    eq: dict[str, Any] = {"backend": "sam3"}

    def val(node: dict, key: str, default=None):
        return v.resolve(node.get(key, default))

    # Resolution -------------------------------------------------------------------------------
    resolution = v.get("scratch.resolution")
    if resolution is not None:
        eq["scratch.resolution"] = int(resolution)
        if int(resolution) != NATIVE_RESOLUTION:
            findings.append(Finding(
                "resolution", "error", "scratch.resolution",
                f"only the data transforms use {resolution}; the ViT is built for {NATIVE_RESOLUTION} px "
                f"(RoPE tables of 72×72 tokens) and fails on {resolution}-px images",
                "rebuild the trunk's RoPE tables for the new size (multiples of 336)",
                f"scratch.resolution: {resolution} (the sam3 backend rebuilds the ViT; multiples of 336)"))

    # Segmentation switches ---------------------------------------------------------------------------
    enable_seg = v.get("scratch.enable_segmentation")
    if enable_seg is not None:
        eq["scratch.enable_segmentation"] = bool(enable_seg)
    masks_losses = targets(data, "loss_fns.Masks")
    for path, node in targets(data, "collator.collate_fn_api"):
        validation = path.endswith("_val") or ".val." in f".{path}."  # its batches train nothing
        if masks_losses and not validation and not v.resolve(node.get("with_seg_masks", False)):
            findings.append(Finding(
                "masks_not_collated", "error", f"{path}.with_seg_masks",
                "the collate function drops the masks, so the Masks loss returns 0 (loss_mask, loss_dice "
                "are constant zeros) and the mask head never trains",
                "with_seg_masks: true (and load_segmentation: true on the dataset)",
                "scratch.enable_segmentation: true (the generated config wires all three switches)"))
    for path, node in targets(data, "build_sam3_image_model"):
        if masks_losses and node.get("enable_segmentation") is not None and not v.resolve(node["enable_segmentation"]):
            findings.append(Finding(
                "no_mask_head", "error", f"{path}.enable_segmentation",
                "the model is built without a mask head but a Masks loss is configured",
                "enable_segmentation: true on the model", "scratch.enable_segmentation: true"))

    # Point prompts -------------------------------------------------------------------------------------
    geo = targets(data, "point_sampling.RandomGeometricInputsAPI")
    for path, node in geo:
        num_points = val(node, "num_points", 0)
        lo_hi = [int(v.resolve(x)) for x in num_points] if isinstance(num_points, list) else [int(num_points)] * 2
        box_chance = float(val(node, "box_chance", 0.0))
        mode = val(node, "point_sample_mode", "random_mask")
        query_str = val(node, "geometric_query_str", "geometric")
        eq.update({"prompts.num_points": lo_hi, "prompts.box_chance": box_chance,
                   "prompts.geometric_query_str": query_str,
                   "prompts.resample_box_from_mask": bool(val(node, "resample_box_from_mask", False)),
                   "prompts.point_sample_mode": "centreline"})
        if node.get("box_noise_std") is not None:
            eq["prompts.box_noise_std"] = float(val(node, "box_noise_std"))
        if node.get("box_noise_max") is not None:
            eq["prompts.box_noise_max"] = float(val(node, "box_noise_max"))
        if lo_hi[1] > 0:
            findings.append(Finding(
                "points_dropped", "error", f"{path}.num_points",
                "Sam3Image.forward prints 'Warning: Point prompts are ignored in PCS' and passes only boxes to "
                "the geometry encoder: every sampled point is thrown away in training",
                "a model whose forward hands input_points/labels to the geometry encoder",
                f"prompts.num_points: {lo_hi} (Sam3ImageWithPoints passes them on)"))
        renamers = [n for _, n in targets(data, "OverwriteTextQuery") if v.resolve(n.get("target_text")) == query_str]
        renamers += [n for _, n in targets(data, "TextQueryToVisual") if query_str == "visual" and not v.resolve(n.get("keep_text_queries", False))]
        if not renamers:
            findings.append(Finding(
                "geometric_query_never_matches", "error", f"{path}.geometric_query_str",
                f"the transform only touches queries whose text is '{query_str}', but COCO_FROM_JSON names every "
                "query after its category (e.g. 'coronary artery') and nothing renames them: no point or box "
                "is ever sampled", f"rename queries to '{query_str}' first (TextQueryToVisual / OverwriteTextQuery)",
                "prompts.* apply to every query with a target (CentrelinePrompts); prompts.use_text: false "
                "makes them geometry-only ('visual')"))
        if mode == "centered":
            findings.append(Finding(
                "centered_points_cluster", "warning", f"{path}.point_sample_mode",
                "'centered' takes distance-transform maxima: on a vessel tree every point lands on the widest "
                "(proximal) vessel, none on distal branches", "sample along the skeleton instead",
                "prompts.point_sample_mode: centreline"))
        if box_chance > 0:
            eq.setdefault("prompts.use_text", True)

    # Matcher -----------------------------------------------------------------------------------------------
    matchers = targets(data, "matcher.BinaryHungarianMatcherV2") + targets(data, "matcher.BinaryFocalHungarianMatcher")
    for path, node in matchers[:1]:
        costs = {k: float(val(node, k, BUILDER_MATCHER[k])) for k in BUILDER_MATCHER}
        eq.update({f"matcher.{k}": c for k, c in costs.items()})
        eq["matcher.focal"] = bool(val(node, "focal", True))
        differs = {k: c for k, c in costs.items() if c != BUILDER_MATCHER[k]}
        findings.append(Finding(
            "matcher_not_used", "error" if differs else "warning", path,
            "build_sam3_image_model hard-codes the model's one-to-one matcher (cost_class 2, cost_bbox 5, "
            "cost_giou 2, alpha 0.25, gamma 2); this YAML matcher only reaches the loss's one-to-many "
            "auxiliary matching" + (f" — your {differs} are ignored" if differs else
                                     " — your values equal the hard-coded ones, but changing them would do nothing"),
            "build the model with this matcher", "matcher.* (the sam3 backend builds the model's matcher from it)"))

    # Checkpoint loading ---------------------------------------------------------------------------------------
    model_nodes = targets(data, "build_sam3_image_model")
    for path, node in model_nodes:
        ckpt = val(node, "checkpoint_path")
        from_hf = val(node, "load_from_HF", True)
        if ckpt:
            eq["sam3.checkpoint"] = str(ckpt)
            findings.append(Finding(
                "checkpoint_loads_silently", "error", f"{path}.checkpoint_path",
                "keeps only keys containing 'detector', loads them with strict=False and only prints missing "
                "keys: a SAM3 trainer checkpoint (model under 'model', keys unprefixed — e.g. your Stage 1 "
                "result) loads ZERO tensors and training silently starts from random weights; nothing verifies "
                "vanilla weights either",
                "load with a report and fail below a loaded fraction",
                f"sam3.checkpoint: {ckpt} (or init_from: models:/angio-stage1@champion); min_loaded_fraction: 0.9"))
        elif from_hf:
            findings.append(Finding(
                "downloads_weights", "warning", f"{path}.load_from_HF",
                "with checkpoint_path unset, load_from_HF (default true) downloads facebook/sam3 from the "
                "Hugging Face hub at start-up (fails offline)", "pass a local checkpoint_path",
                "sam3.checkpoint: /path/to/sam3.pt (angioexp never downloads)"))
        else:
            findings.append(Finding(
                "random_weights", "error", f"{path}.load_from_HF",
                "load_from_HF: false and no checkpoint_path: every weight is random — SAM3 trains from "
                "scratch without a word, and the text encoder's positional_embedding and text_projection "
                "are torch.empty (uninitialised memory; can be NaN)",
                "give checkpoint_path (a local sam3.pt)",
                "sam3.checkpoint: /path/to/sam3.pt (init_from=none starts from scratch on purpose, CLIP-initialised)"))
        bpe = val(node, "bpe_path")
        if bpe is None or "<" in str(bpe):
            findings.append(Finding(
                "bpe_missing", "error", f"{path}.bpe_path",
                "the PyPI sam3 wheel has no assets/bpe_simple_vocab_16e6.txt.gz, and the default path points "
                "outside the package", "point bpe_path at a copy (open-clip-torch ships the same file)",
                "sam3.bpe_path (default: found in an installed package)"))

    # NaN handling ----------------------------------------------------------------------------------------------
    trainer_target = v.get("trainer._target_", "")
    if str(trainer_target).endswith("trainer.Trainer"):
        findings.append(Finding(
            "nan_kills_run", "warning", "trainer._target_",
            "Trainer._run_step raises FloatingPointError on the first non-finite loss (the run dies; with "
            "AMP, non-finite gradients are skipped silently by the GradScaler)",
            "skip bad (non-finite or exploding) steps, restore + back off the LR after repeats, count events",
            "nan_guard.max_consecutive / lr_backoff / max_restores / max_loss_ratio (GuardedTrainer)"))
    if matchers or model_nodes:  # SAM3's builder always attaches BinaryHungarianMatcherV2
        findings.append(Finding(
            "matcher_nan_crash", "warning", matchers[0][0] if matchers else model_nodes[0][0],
            "BinaryHungarianMatcherV2 hands its cost matrix to scipy inside model.forward: one NaN "
            "prediction raises 'matrix contains invalid numeric entries' before any loss exists, so no "
            "NaN check sees it and the run dies (facebookresearch/sam3 #289, #440)",
            "treat a non-finite matching cost as a bad step (skip, restore after repeats)",
            "the sam3 backend's GuardedHungarianMatcher feeds it to the NaN guard (nan_guard.*)"))

    findings += _loss_key_findings(v)
    findings += _eval_findings(v, enable_seg, model_nodes)
    findings += _loader_findings(v)
    findings += _memory_findings(v, enable_seg)

    # Loss weights ---------------------------------------------------------------------------------------------
    for path, node in masks_losses[:1]:
        weights = node.get("weight_dict") or {}
        mask_w = {k: float(v.resolve(weights.get(k, 0.0))) for k in EXAMPLE_MASK_WEIGHTS}
        eq.update({"loss.masks.loss_mask": mask_w["loss_mask"], "loss.masks.loss_dice": mask_w["loss_dice"],
                   "loss.masks.focal_alpha": float(val(node, "focal_alpha", 0.25)),
                   "loss.masks.focal_gamma": float(val(node, "focal_gamma", 2.0))})
        low = {k: (w, EXAMPLE_MASK_WEIGHTS[k]) for k, w in mask_w.items() if w < EXAMPLE_MASK_WEIGHTS[k]}
        if low:
            findings.append(Finding(
                "mask_loss_weights_low", "warning", f"{path}.weight_dict",
                "SAM3's own segmentation example weights loss_mask 200 and loss_dice 10; here "
                + ", ".join(f"{k} {w:g} ({e / w:.0f}× lower)" if w else f"{k} 0" for k, (w, e) in low.items())
                + " — the mask terms barely move the total loss next to loss_ce 20 / presence 20 (blobby masks)",
                "use SAM3's weights, or sweep them",
                "loss.masks.loss_mask: 200, loss.masks.loss_dice: 10 (angioexp's defaults)"))
    for path, node in targets(data, "SemanticSegCriterion"):
        weights = node.get("weight_dict") or {}
        if "sam3.losses." in str(node.get("_target_")):
            findings.append(Finding(
                "semantic_target_missing", "error", f"{path}._target_",
                "sam3.losses.loss_fns does not exist (SAM3's commented example has this typo): Hydra fails",
                "sam3.train.loss.loss_fns.SemanticSegCriterion", "generated by the sam3 backend"))
        eq.update({"loss.semantic.focal": bool(val(node, "focal", False)),
                   "loss.semantic.focal_alpha": float(val(node, "focal_alpha", 0.6)),
                   "loss.semantic.focal_gamma": float(val(node, "focal_gamma", 1.6)),
                   "loss.semantic.presence_head": bool(val(node, "presence_head", False)),
                   "loss.semantic.presence_loss": False})
        for key in ("loss_semantic_seg", "loss_semantic_dice", "loss_semantic_presence"):
            if key in weights:
                eq[f"loss.semantic.{key}"] = float(v.resolve(weights[key]))
        if v.resolve(node.get("presence_loss", True)):
            head = bool(v.resolve(node.get("presence_head", False)))
            findings.append(Finding(
                "semantic_presence_loss", "error", f"{path}.presence_loss",
                "the builder makes the segmentation head without a presence head (presence_logit is None): "
                + ("with presence_head: true this crashes on the first step" if head else
                   "with presence_head false (the default) presence_loss is silently unused"),
                "presence_loss: false (the decoder's presence token is trained by IABCEMdetr presence_loss)",
                "loss.semantic.presence_loss: false; loss.iabce.presence_loss carries the presence signal"))

    for _, node in targets(data, "loss_fns.Boxes")[:1]:
        w = node.get("weight_dict") or {}
        eq.update({f"loss.boxes.{k}": float(v.resolve(w[k])) for k in ("loss_bbox", "loss_giou") if k in w})
    for _, node in targets(data, "loss_fns.IABCEMdetr")[:1]:
        w = node.get("weight_dict") or {}
        eq.update({f"loss.iabce.{k}": float(v.resolve(w[k])) for k in ("loss_ce", "presence_loss") if k in w})
        for key, cast in (("pos_weight", float), ("alpha", float), ("gamma", float), ("use_presence", bool), ("pos_focal", bool)):
            if key in node:
                eq[f"loss.iabce.{key}"] = cast(v.resolve(node[key]))
    for _, node in targets(data, IDENTITY_TARGET)[:1]:
        w = node.get("weight_dict") or {}
        eq.update({f"loss.identity.{k}": float(v.resolve(w[k])) for k in ("loss_identity_ce", "loss_identity_dice") if k in w})
        if "class_weight_power" in node:
            eq["loss.identity.class_weight_power"] = float(v.resolve(node["class_weight_power"]))
    for _, node in targets(data, "sam3_loss.Sam3LossWrapper")[:1]:
        if node.get("o2m_weight") is not None:
            eq["o2m.enabled"] = float(v.resolve(node["o2m_weight"])) > 0
            eq["o2m.o2m_weight"] = float(v.resolve(node["o2m_weight"]))

    # Evaluation ---------------------------------------------------------------------------------------------------
    for path, node in targets(data, "coco_writer.PredictionDumper"):
        iou = val(node, "iou_type", "bbox")
        if enable_seg and iou == "bbox":
            findings.append(Finding(
                "box_ap_only", "warning", f"{path}.iou_type",
                "the validation AP is box AP (iou_type bbox), not mask AP, although the model segments",
                "iou_type: segm with a segm postprocessor (use_original_sizes_mask: true)",
                "the sam3 backend evaluates masks (val/AP75) plus angioexp's Dice/clDice/tolerant AP"))
        post = node.get("postprocessor")
        post_node = v.resolve(post) if isinstance(post, str) else post
        if iou == "segm" and isinstance(post_node, dict) and not v.resolve(post_node.get("use_original_sizes_mask", False)):
            findings.append(Finding(
                "masks_scored_at_1px", "error", f"{path}.postprocessor.use_original_sizes_mask",
                "without use_original_sizes_mask the postprocessor resizes predicted masks to 1×1 px before "
                "COCO evaluation", "use_original_sizes_mask: true", "generated by the sam3 backend"))

    # Optimiser -------------------------------------------------------------------------------------------------------
    for key in ("lr_scale", "lrd_vision_backbone", "wd", "scheduler_warmup", "scheduler_timescale", "scheduler_cooldown",
                "train_batch_size", "val_batch_size", "max_ann_per_img"):
        value = v.get(f"scratch.{key}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            eq[f"scratch.{key}"] = value
    clip = v.get("trainer.optim.gradient_clip.max_norm")
    if isinstance(clip, (int, float)):
        eq["optim.gradient_clip.max_norm"] = float(clip)
    return findings, eq


def _collate(v: HydraView, phase: str, scratch_key: str) -> dict:
    node = v.get(f"trainer.data.{phase}.collate_fn")
    if not isinstance(node, dict):
        node = v.get(f"scratch.{scratch_key}")
    return node if isinstance(node, dict) else {}


def _loss_key_findings(v: HydraView) -> list[Finding]:
    """SAM3 picks a batch's loss by its collate ``dict_key`` (``Trainer._find_loss``)."""
    losses = v.get("trainer.loss")
    if not isinstance(losses, dict):
        return []
    real = {k for k, node in losses.items() if not str((v.resolve(node) or {}).get("_target_", "")).endswith("DummyLoss")}
    out = []
    train_key = v.resolve(_collate(v, "train", "collate_fn").get("dict_key"))
    if train_key is not None and train_key not in losses and "default" in losses:
        out.append(Finding(
            "train_on_dummy_loss", "error", "trainer.data.train.collate_fn.dict_key",
            f"the training batches are keyed '{train_key}', which trainer.loss does not define, so "
            "_find_loss hands them to the 'default' DummyLoss: the loss is 0 and nothing trains "
            "(facebookresearch/sam3 #367)",
            f"dict_key: all (or a trainer.loss entry named '{train_key}')",
            "generated by the sam3 backend (training key 'all', validation key 'angio')"))
    val_key = v.resolve(_collate(v, "val", "collate_fn_val").get("dict_key"))
    if val_key is not None and val_key in real:
        out.append(Finding(
            "val_key_names_a_loss", "error", "trainer.data.val.collate_fn.dict_key",
            f"the validation batches are keyed '{val_key}', which names a real loss: SAM3 computes it on "
            "validation outputs, which carry no matching, and fails with KeyError: 'indices' at the "
            "first validation (facebookresearch/sam3 #448)",
            "a validation dict_key that only the meters use (the loss falls to the 'default' DummyLoss)",
            "generated by the sam3 backend (validation key 'angio')"))
    return out


def _eval_findings(v: HydraView, enable_seg, model_nodes) -> list[Finding]:
    out = []
    no_mask_head = enable_seg is False or any(
        n.get("enable_segmentation") is not None and not v.resolve(n["enable_segmentation"]) for _, n in model_nodes)
    for path, node in targets(v.data, "coco_writer.PredictionDumper"):
        if v.resolve(node.get("iou_type", "bbox")) != "segm":
            continue
        post = v.resolve(node.get("postprocessor"))
        post_iou = v.resolve(post.get("iou_type", "bbox")) if isinstance(post, dict) else None
        if post_iou != "segm" or no_mask_head:
            why = ("the model has no mask head (enable_segmentation: false)" if no_mask_head else
                   f"its postprocessor is a box postprocessor (iou_type {post_iou!r})")
            out.append(Finding(
                "segm_eval_without_masks", "error", f"{path}.iou_type",
                f"iou_type: segm, but {why}: predictions carry no masks and the evaluation fails with "
                "KeyError: 'masks' — after a whole training epoch (facebookresearch/sam3 #485, #330)",
                "a segm postprocessor (iou_type: segm, use_original_sizes_mask: true) on a model with a mask head",
                "scratch.enable_segmentation: true (the generated config pairs them)"))
    return out


def _loader_findings(v: HydraView) -> list[Finding]:
    images = v.get("trainer.data.train.dataset.limit_ids")
    batch = v.get("trainer.data.train.batch_size", v.get("scratch.train_batch_size"))
    drop_last = v.get("trainer.data.train.drop_last", False)
    gpus = v.get("launcher.gpus_per_node", 1)
    nodes = v.get("launcher.num_nodes", 1)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (images, batch, gpus, nodes)):
        return []
    per_step = int(batch) * int(gpus) * int(nodes)
    if drop_last and int(images) < per_step:
        return [Finding(
            "empty_train_loader", "error", "trainer.data.train.dataset.limit_ids",
            f"{int(images)} training images (num_images / limit_ids) < batch {int(batch)} × {int(gpus) * int(nodes)} "
            "GPU(s): each GPU's DistributedSampler share is smaller than one batch and drop_last drops it, "
            "so the loader is empty and the epoch ends without a step (facebookresearch/sam3 #251, #362)",
            f"at least {per_step} images, a smaller batch or fewer GPUs",
            "train.max_steps / sam3.steps_per_epoch (the sam3 backend counts the step plan per GPU and "
            "refuses a split smaller than one batch per GPU)")]
    return []


def _memory_findings(v: HydraView, enable_seg) -> list[Finding]:
    out = []
    resolution = v.get("scratch.resolution")
    batch = v.get("trainer.data.train.batch_size", v.get("scratch.train_batch_size"))
    if isinstance(resolution, (int, float)) and resolution >= NATIVE_RESOLUTION and enable_seg \
            and isinstance(batch, (int, float)) and batch >= 2:
        out.append(Finding(
            "oom_at_1008", "warning", "scratch.train_batch_size",
            f"batch {int(batch)} at {int(resolution)} px with segmentation on runs out of memory on 80 GB "
            "GPUs (facebookresearch/sam3 #343, #189, #163)",
            "batch 1 (SAM3's recipe), activation checkpointing on, bf16",
            "scratch.train_batch_size: 1; sam3.activation_checkpointing: true; optim.amp.amp_dtype: bfloat16"))
    amp_dtype = v.get("trainer.optim.amp.amp_dtype")
    if amp_dtype == "bfloat16" and v.get("trainer.optim.amp.enabled", True) and _gpu_without_bf16():
        out.append(Finding(
            "no_bf16_gpu", "warning", "trainer.optim.amp.amp_dtype",
            "this machine's GPU has no bfloat16: autocast falls back to float32 activations, which at "
            "1008 px run out of memory (facebookresearch/sam3 #343, #189, #163)",
            "float16 with the GradScaler, or a GPU with bf16 (Ampere or newer)",
            "optim.amp.amp_dtype: float16 (the sam3 backend's guard leaves the GradScaler's own overflows "
            "to the scaler)"))
    return out


def _gpu_without_bf16() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available() and not torch.cuda.is_bf16_supported())


def equivalent_config(eq: dict) -> dict:
    """The flat ``key: value`` map as a validated, nested angioexp config dict."""
    from angioexp.config import Config, set_value, to_dict, validate

    cfg = Config()
    nested: dict = {}
    for key, value in eq.items():
        set_value(cfg, key, value, source="angioexp doctor")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    validate(cfg)
    full = to_dict(cfg)

    def pick(src, shape):
        return {k: pick(src[k], v) if isinstance(v, dict) else src[k] for k, v in shape.items()}

    return pick(full, nested)


# --- a COCO folder: what SAM3's data path does with it ---------------------------------------------


def coco_files(root: str | Path) -> list[Path]:
    """The annotation files of a COCO folder: ``annotations.json`` (or Roboflow's
    ``_annotations.coco.json``) in it or in its split folders."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("COCO folder not found", file=root)
    names = ("annotations.json", "_annotations.coco.json")
    files = [root / n for n in names if (root / n).is_file()]
    files += sorted(p / n for p in root.iterdir() if p.is_dir() for n in names if (p / n).is_file())
    if not files:
        raise InputError("no annotations.json in it or in its split folders", file=root)
    return files


def _examples(items: list, n: int = 3) -> str:
    return ", ".join(str(i) for i in items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def diagnose_coco(path: Path) -> list[Finding]:
    """Findings for one COCO annotations file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc}", file=path) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise InputError("not a COCO file (needs lists 'images', 'annotations', 'categories')", file=path)
    images = {im.get("id"): im for im in data["images"] if isinstance(im, dict)}
    anns = [a for a in data["annotations"] if isinstance(a, dict) and not a.get("iscrowd")]
    out = []

    flat = [a["id"] for a in anns if isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4
            and (a["bbox"][2] <= 0 or a["bbox"][3] <= 0)]
    if flat:
        out.append(Finding(
            "zero_size_boxes", "error", f"{path}: annotations {_examples(flat)}",
            "boxes of zero width or height (a straight vessel segment along a pixel row or column): "
            "SAM3's generalized_box_iou divides by the box areas without an epsilon, so the matching cost "
            "and the GIoU loss turn NaN (facebookresearch/sam3 #289, #440)",
            "give every box at least 1 px of width and height (or drop the annotation)",
            "angioexp convert writes boxes from the masks (≥ 1 px); the sam3 backend's matcher turns a "
            "NaN cost into a NaN-guard step (nan_guard.*)"))

    annotated = {a.get("image_id") for a in anns}
    empty = [i for i in images if i not in annotated]
    if empty:
        out.append(Finding(
            "images_without_annotations", "warning", f"{path}: images {_examples(empty)}",
            f"{len(empty)} of {len(images)} images have no annotation: SAM3's COCO_FROM_JSON "
            "(include_negatives) queries every category on them as absent — right for a frame without "
            "vessels, wrong for a frame whose labels were lost in conversion",
            "check that these frames really show no vessel (or remove them)",
            "angioexp convert refuses empty masks (one line naming the row)"))

    used = {a.get("category_id") for a in anns}
    unused = [c.get("id") for c in data["categories"] if isinstance(c, dict) and c.get("id") not in used]
    if unused:
        names = {c.get("id"): c.get("name") for c in data["categories"] if isinstance(c, dict)}
        out.append(Finding(
            "unused_categories", "warning", f"{path}: categories {_examples([f'{i} ({names[i]})' for i in unused])}",
            "categories without a single annotation: SAM3 queries each of them on every image as a negative "
            "(include_negatives), so it learns to answer 'absent' for a concept it never sees",
            "drop the categories (or add their annotations)",
            "Stage 2 categories come from angioexp/segments.py; angioexp convert lists only present ones"))

    wrong_size = []
    for a in anns:
        seg, image = a.get("segmentation"), images.get(a.get("image_id"))
        if isinstance(seg, dict) and image and list(seg.get("size", [])) != [image.get("height"), image.get("width")]:
            wrong_size.append(f"{a.get('id')} (RLE {seg.get('size')} vs image {image.get('height')}×{image.get('width')})")
    if wrong_size:
        out.append(Finding(
            "rle_size_mismatch", "error", f"{path}: annotations {_examples(wrong_size)}",
            "RLE masks whose size differs from their image: DecodeRle decodes them at the RLE's size, so the "
            "mask no longer lines up with the resized image (or a transform fails on the shape mismatch)",
            "re-encode the masks at the image's size",
            "angioexp convert resizes labels to the frame (nearest) and encodes them at its size"))

    per_query: dict = {}
    for a in anns:
        key = (a.get("image_id"), a.get("category_id"))
        per_query[key] = per_query.get(key, 0) + 1
    several = [f"image {i} category {c} ({n})" for (i, c), n in per_query.items() if n > 1]
    if several:
        out.append(Finding(
            "several_targets_per_query", "warning", f"{path}: {_examples(several)}",
            "several annotations of one category on one image make one find query with several targets; "
            "SAM3's point sampler (RandomGeometricInputsAPI) asserts 'Geometric queries only support a "
            "single target object' on such a query",
            "merge the pieces into one annotation per category and image, or prompt with text only",
            "prompts.* (CentrelinePrompts samples points from the union of a query's targets)"))
    return out


def diagnose_data(root: str | Path) -> list[Finding]:
    return [f for path in coco_files(root) for f in diagnose_coco(path)]


def identity_data_findings(root: str | Path) -> list[Finding]:
    """With the identity term on: one finding when no image of the folder has two segment categories."""
    most, categories = 0, set()
    for path in coco_files(root):
        data = json.loads(path.read_text(encoding="utf-8"))  # diagnose_coco has checked its shape
        categories |= {c.get("id") for c in data["categories"] if isinstance(c, dict)}
        per_image: dict = {}
        for a in data["annotations"]:
            if isinstance(a, dict) and not a.get("iscrowd"):
                per_image.setdefault(a.get("image_id"), set()).add(a.get("category_id"))
        most = max([most, *(len(c) for c in per_image.values())])
    if most >= 2:
        return []
    single = len(categories) <= 1
    return [Finding(
        "identity_without_segments", "warning", f"{root}: {len(categories)} categor{'y' if single else 'ies'}, "
        f"at most {most} per image",
        "PromptIdentityLoss takes one softmax over the prompts of an image; "
        + ("with a single category that is sigmoid(semantic logit), what loss.semantic.* trains already"
           if single else "no image has two segments for it to tell apart"),
        "use it on Stage 2 data (several segment categories per frame), or switch it off",
        "loss.identity.loss_identity_ce and loss_identity_dice: 0 (the sam3 default)")]


def load_sam3_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError("SAM3 config not found", file=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {exc}", file=path) from None
    if not isinstance(data, dict):
        raise InputError("expected a mapping at the top level (a SAM3 Hydra config)", file=path)
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a SAM3 Hydra training config (YAML)")
    parser.add_argument("--data", metavar="COCO_DIR", help="also check a COCO folder (annotations.json in it or "
                        "in its split folders) for what SAM3's data path trips on")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--write-config", metavar="PATH", help="save the equivalent angioexp config here")


def run(args: argparse.Namespace) -> int:
    from angioexp.fileio import atomic_file

    if not args.config and not args.data:
        raise InputError("give a SAM3 config, --data COCO_DIR, or both")
    findings, equivalent, text, sam3_cfg = [], None, "", {}
    if args.config:
        sam3_cfg = load_sam3_yaml(args.config)
        findings, eq = diagnose(sam3_cfg)
        equivalent = equivalent_config(eq)
        text = yaml.safe_dump(equivalent, sort_keys=False)
        if args.write_config:
            with atomic_file(args.write_config, "w", encoding="utf-8") as handle:
                handle.write(f"# angioexp equivalent of {args.config} (angioexp doctor)\n{text}")
    if args.data:
        findings += diagnose_data(args.data)
        if targets(sam3_cfg, IDENTITY_TARGET):
            findings += identity_data_findings(args.data)
    subject = " + ".join(str(x) for x in (args.config, args.data) if x)
    if args.json:
        print(json.dumps({"config": args.config and str(args.config), "data": args.data and str(args.data),
                          "findings": [asdict(f) for f in findings], "angioexp_config": equivalent}, indent=2))
    else:
        print(f"{subject}: {len(findings)} pitfall(s) found" if findings else f"{subject}: no known pitfall found")
        for i, finding in enumerate(findings, 1):
            print(finding.render(i))
        if equivalent is not None:
            print("\nEquivalent angioexp config (angioexp train --config THIS.yaml):")
            print(text)
    return 1 if findings else 0
