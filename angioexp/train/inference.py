"""Predictions of a core model on a COCO split, and their evaluation.

    preds = predict_split("runs/x/checkpoints/best.pt", coco_dir, "val")   # COCO results, RLE masks
    metrics, artifacts = evaluate_split(model, coco_dir, "val", cfg=cfg, out_dir=…)

Every (image, category) pair is one text-prompted find query on the whole image at
``scratch.resolution``; each of its Q object queries becomes one COCO result with
score = sigmoid(class logit) × sigmoid(presence logit) — SAM3's scoring — and its mask logits
upsampled to the image's original size and thresholded at ``eval.mask_threshold``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from angioexp.data.coco import prediction_source
from angioexp.fileio import write_json_atomic
from angioexp.train.device import amp_dtype

log = logging.getLogger(__name__)

MIN_SCORE = 0.01  # results below this cannot change AP meaningfully; dropping them keeps files small


def _load_model(checkpoint_or_model, cfg, device):
    """(model, cfg) from an nn.Module (+ cfg) or a checkpoint path (its stored config rebuilds it)."""
    if isinstance(checkpoint_or_model, torch.nn.Module):
        if cfg is None:
            raise ValueError("predicting with a model object needs its cfg")
        return checkpoint_or_model, cfg
    from angioexp.checkpoints import extract_state_dict, load_state_with_report, read_checkpoint
    from angioexp.model.build import build_model

    payload = read_checkpoint(checkpoint_or_model)
    if cfg is None:
        stored = payload.get("config") if isinstance(payload, dict) else None
        if not isinstance(stored, dict):
            from angioexp.errors import InputError

            raise InputError("checkpoint has no 'config' entry, so the model it belongs to is unknown: use one "
                             "written by `angioexp train` (<run folder>/checkpoints/best.pt or last.pt)",
                             file=checkpoint_or_model)
        from angioexp.checkpoints import config_from_dict

        cfg = config_from_dict(stored, source=checkpoint_or_model)
    model = build_model(cfg)
    load_state_with_report(model, extract_state_dict(payload), source=str(checkpoint_or_model), min_loaded_fraction=1.0)
    return model.to(device), cfg


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@torch.no_grad()
def predict_batch(model, batch, sizes: list[tuple[int, int]], *, mask_threshold: float = 0.5, min_score: float = MIN_SCORE,
                  semantic_out: list | None = None) -> list[dict]:
    """One evaluation batch → COCO results (one per object query with score ≥ ``min_score``).

    ``semantic_out``: a list that receives one result per find query from the semantic head
    as well (the prompted concept's semantic mask, score = the presence probability) — SAM3's
    semantic-segmentation output (the whole tree in Stage 1, one segment per prompt in Stage 2),
    scored beside the instance masks.
    """
    out = model(batch.images, batch.queries)
    presence = out["presence_logit_dec"].float().sigmoid()  # (B, 1)
    scores = out["pred_logits"][..., 0].float().sigmoid() * presence  # (B, Q)
    logit_threshold = math.log(mask_threshold / (1 - mask_threshold))
    img_idx = batch.queries.img_idx.tolist()

    def emit(into: list, b: int, category_id, logits: torch.Tensor, mask_scores: list[float]) -> None:
        """logits (k, S, S) of find query b → one COCO result per non-empty mask, at the frame's size."""
        slot = img_idx[b]
        logits = logits.float()
        if tuple(logits.shape[-2:]) != tuple(sizes[slot]):
            logits = F.interpolate(logits[:, None], size=sizes[slot], mode="bilinear", align_corners=False)[:, 0]
        for mask, score in zip((logits > logit_threshold).cpu().numpy(), mask_scores):
            if mask.any():
                into.append({"image_id": int(batch.image_ids[slot]), "category_id": int(category_id),
                             "segmentation": _encode(mask), "score": float(score)})

    results: list[dict] = []
    for b, category_id in enumerate(batch.category_ids):
        keep = (scores[b] >= min_score).nonzero(as_tuple=True)[0]
        if keep.numel():
            emit(results, b, category_id, out["pred_masks"][b, keep], scores[b, keep].tolist())
        if semantic_out is not None:
            emit(semantic_out, b, category_id, out["semantic_seg"][b], presence[b].tolist())
    return results


MIN_COMPONENT_FRACTION = 2e-5  # of the frame (5 px at 512²): smaller pieces of a segment are noise


@torch.no_grad()
def predict_identity_batch(model, batch, sizes: list[tuple[int, int]], class_text_ids: torch.Tensor, category_ids: list[int],
                           *, min_score: float = MIN_SCORE, semantic_out: list | None = None,
                           label_maps_out: dict | None = None, tree_labelling: bool = False) -> list[dict]:
    """Stage 2 through the segment-identity head: one softmax over background + every prompt.

    Per image and category c: the semantic result is the pixels whose most probable class is c,
    scored with c's presence probability; the instance results are that mask's connected
    components (8-connected; pieces under ``MIN_COMPONENT_FRACTION`` of the frame dropped), each
    scored presence × its mean probability of being c — the chance that this piece is there and
    is c. ``label_maps_out`` (image id → int (H, W) label map of category ids) receives the label
    maps. ``tree_labelling``: labels per skeleton branch in anatomical order instead of per pixel
    (:func:`angioexp.postprocess.tree_labels.label_tree`).
    """
    from scipy import ndimage

    pixel_embed, memory, coarse, levels = model.encode_images(batch.images)
    logits, presence_logits = model.identify(pixel_embed, memory, coarse, levels, batch.queries.views, class_text_ids)
    presence = presence_logits.float().sigmoid().cpu().numpy()  # (I, C)
    ids = np.asarray([0, *category_ids])
    results: list[dict] = []
    for slot, image_id in enumerate(batch.image_ids):
        probs = F.interpolate(logits[slot : slot + 1].float(), size=sizes[slot], mode="bilinear", align_corners=False)
        probs = probs[0].softmax(dim=0)
        best_prob, best = probs.max(dim=0)
        best, best_prob = best.cpu().numpy(), best_prob.cpu().numpy()
        if tree_labelling:
            from angioexp.postprocess.tree_labels import label_tree

            probs = probs.cpu().numpy()
            best = label_tree(probs, category_ids)
            best_prob = np.take_along_axis(probs, best[None], axis=0)[0]
        if label_maps_out is not None:
            label_maps_out[int(image_id)] = ids[best]
        min_pixels = max(1, int(MIN_COMPONENT_FRACTION * best.size))
        for k, category_id in enumerate(category_ids, start=1):
            mask = best == k
            if not mask.any():
                continue
            score = float(presence[slot, k - 1])
            if semantic_out is not None:
                semantic_out.append({"image_id": int(image_id), "category_id": int(category_id),
                                     "segmentation": _encode(mask), "score": score})
            pieces, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
            if not n:
                continue
            sizes_px = np.bincount(pieces.ravel(), minlength=n + 1)
            mean_prob = np.bincount(pieces.ravel(), weights=best_prob.ravel(), minlength=n + 1) / np.maximum(sizes_px, 1)
            for piece, window in enumerate(ndimage.find_objects(pieces), start=1):
                piece_score = score * float(mean_prob[piece])
                if sizes_px[piece] >= min_pixels and piece_score >= min_score:
                    piece_mask = np.zeros_like(mask)
                    piece_mask[window] = pieces[window] == piece
                    results.append({"image_id": int(image_id), "category_id": int(category_id),
                                    "segmentation": _encode(piece_mask), "score": piece_score})
    return results


def predict_split(checkpoint_or_model, coco_dir: str | Path, split: str, *, device: str = "cpu", cfg=None,
                  image_ids: list[int] | None = None, categories: list[dict] | None = None,
                  semantic_out: list | None = None, label_maps_out: dict | None = None) -> list[dict]:
    """COCO segmentation results for every image of ``coco_dir/split`` (RLE masks, SAM3 scores);
    the semantic head's results go to ``semantic_out`` when given (see :func:`predict_batch`), and
    with the identity head each image's label map to ``label_maps_out`` (see
    :func:`predict_identity_batch`)."""
    from angioexp.model.build import resolved_num_views
    from angioexp.train.data import EvalSet

    device = torch.device(device)
    model, cfg = _load_model(checkpoint_or_model, cfg, device)
    was_training = model.training
    model.eval()
    data = EvalSet(coco_dir, cfg, split, num_views=resolved_num_views(cfg), image_ids=image_ids, categories=categories)
    results: list[dict] = []
    autocast = device.type == "cuda" and cfg.optim.amp.enabled
    dtype = amp_dtype(cfg.optim.amp.amp_dtype)
    # Stage 2 with the identity head: no per-prompt decoding, every prompt scored in one softmax.
    identity = cfg.stage == 2 and getattr(model, "has_identity", False)
    class_text_ids = data.tokenizer.batch([data.prompts[c] for c in data.category_ids]).to(device) if identity else None
    try:
        for batch, sizes in data.batches(cfg.scratch.val_batch_size, with_queries=not identity):
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                if identity:
                    results.extend(predict_identity_batch(model, batch.to(device), sizes, class_text_ids, data.category_ids,
                                                          semantic_out=semantic_out, label_maps_out=label_maps_out,
                                                          tree_labelling=cfg.eval.tree_labelling))
                else:
                    results.extend(predict_batch(model, batch.to(device), sizes, mask_threshold=cfg.eval.mask_threshold,
                                                 semantic_out=semantic_out))
    finally:
        model.train(was_training)
    source = prediction_source(coco_dir, split)  # evaluate refuses them against another split
    for entry in [*results, *(semantic_out or [])]:
        entry.update(source)
    return results


def ground_truth_path(coco_dir: str | Path, split: str, cfg) -> Path:
    """Clean labels (annotations_gt.json) when the data has them and ``data.use_clean_val_labels``."""
    split_dir = Path(coco_dir) / split
    clean = split_dir / "annotations_gt.json"
    if cfg.data.use_clean_val_labels and clean.is_file():
        return clean
    return split_dir / "annotations.json"


def _subset(gt_path: Path, max_images: int | None) -> tuple[dict | Path, list[int] | None]:
    """The first ``max_images`` images of a ground truth (ids in file order), as a dict."""
    if max_images is None:
        return gt_path, None
    import json

    data = json.loads(gt_path.read_text(encoding="utf-8"))
    images = data["images"][:max_images]
    ids = {im["id"] for im in images}
    subset = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    return subset, [im["id"] for im in images]


def evaluate_split(checkpoint_or_model, coco_dir: str | Path, split: str, *, cfg=None, out_dir: str | Path | None = None,
                   device: str = "cpu", gt=None, max_images: int | None = None):
    """Predict and score a split with :func:`angioexp.evaluate.evaluate_predictions`.

    Returns (metrics with a "val/" prefix, EvalArtifacts). With ``out_dir``: predictions.json,
    metrics.json, per_image.csv, per_category.csv and overlays/ are written there. ``gt``: an
    already-loaded :class:`angioexp.evaluate.GroundTruth` to reuse (skeletons are cached in it).
    """
    from angioexp.evaluate import evaluate_predictions, load_ground_truth
    from angioexp.train.callbacks import EvalArtifacts

    model, cfg = _load_model(checkpoint_or_model, cfg, torch.device(device))
    gt_path = ground_truth_path(coco_dir, split, cfg)
    source, image_ids = _subset(gt_path, max_images)
    if gt is None:
        gt = load_ground_truth(source)
    t0 = time.perf_counter()
    categories = [gt.categories[c] for c in sorted(gt.categories)]
    semantic: list[dict] = []  # the semantic head's results, scored beside the instance masks
    label_maps: dict[int, np.ndarray] = {}  # identity head only: predicted label map per image
    preds = predict_split(model, coco_dir, split, device=device, cfg=cfg, image_ids=image_ids or list(gt.images),
                          categories=categories, semantic_out=semantic, label_maps_out=label_maps)
    predict_s = time.perf_counter() - t0
    out_dir = Path(out_dir) if out_dir is not None else None
    overlays = out_dir / "overlays" if out_dir is not None and cfg.eval.overlays > 0 else None
    result = evaluate_predictions(
        gt, preds, tolerance_px=cfg.eval.tolerance_px, score_threshold=cfg.eval.score_threshold,
        overlays_dir=overlays, images_dir=Path(coco_dir) / split / "images", max_overlays=cfg.eval.overlays,
    )
    metrics = {f"val/{k}": float(v) for k, v in result.metrics.items()}
    # Which pixels are the prompted concept (the whole tree in Stage 1, a segment in Stage 2),
    # from the semantic head: no instance scores involved — an instance mask counts only when its
    # IoU-aware score passes the threshold.
    sem = evaluate_predictions(gt, semantic, tolerance_px=cfg.eval.tolerance_px, score_threshold=cfg.eval.score_threshold)
    metrics.update({f"val/semantic/{k}": float(v) for k, v in sem.metrics.items()
                    if k == "dice_mean_segments" or k.split("/")[0] in ("dice", "cldice")})
    segments = None
    if gt.multi_category:
        from angioexp.evaluate.segments import segment_report

        segments = segment_report(gt, sem.per_pair, working_resolution=cfg.scratch.resolution,
                                  predicted_label_maps=label_maps or None, seed=cfg.seed)
        metrics.update({f"val/segments/{k}": float(v) for k, v in segments.metrics.items()})
        from angioexp.evaluate.arcade import arcade_mean_f1

        # ARCADE's challenge metric (per-image mean F1, a false-alarm category zeroes its image)
        metrics["val/segments/arcade_mean_f1"] = arcade_mean_f1(gt, semantic, cfg.eval.score_threshold)
    metrics["val/predict_seconds"] = predict_s
    metrics["val/images_per_s"] = len(gt.images) / predict_s if predict_s > 0 else float("nan")
    artifacts = EvalArtifacts()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.write(out_dir)
        write_json_atomic(out_dir / "predictions.json", preds, indent=None)
        (out_dir / "semantic").mkdir(exist_ok=True)  # the semantic head's tables beside the instance ones
        sem.write(out_dir / "semantic")
        write_json_atomic(out_dir / "semantic" / "predictions.json", semantic, indent=None)
        if segments is not None:
            segments.write(out_dir / "segments")
        artifacts = EvalArtifacts(
            metrics_json=out_dir / "metrics.json", per_image_csv=out_dir / "per_image.csv",
            overlays_dir=overlays, predictions_json=out_dir / "predictions.json",
            segments_dir=out_dir / "segments" if segments is not None else None,
        )
    return metrics, artifacts, gt
