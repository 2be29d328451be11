"""Predictions of a trained core model: COCO results with RLE masks and SAM3's scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pycocotools import mask as mask_utils

from angioexp.config import load_config
from angioexp.train.inference import evaluate_split, predict_split
from angioexp.train.loop import train
from tests.helpers.vessel_coco import STAGE2_LABELS, make_vessel_coco


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inf")
    coco = make_vessel_coco(root / "coco", stage=2, size=64, n_train=4, n_val=3, seed=5)
    # the per-prompt (SAM3) outputs; the identity head's are tested in test_stage2_identity.py
    cfg = load_config(None, ["init_from=none", "scratch.resolution=64", "scratch.train_batch_size=2", "train.max_steps=3",
                             "train.eval_every=100", f"train.out_dir={root / 'run'}", "eval.overlays=2",
                             "model.identity_head=false", "loss.per_prompt=true"], stage=2)
    result = train(cfg, coco_dir=coco)
    return coco, result, cfg


def test_predict_split_from_a_checkpoint_gives_valid_coco_results(trained):
    coco, result, cfg = trained
    preds = predict_split(result.checkpoint, coco, "val")  # the config comes from the checkpoint
    assert preds, "an untrained model still scores every query"
    assert {p["category_id"] for p in preds} <= set(STAGE2_LABELS)
    assert {p["image_id"] for p in preds} <= {1, 2, 3}
    for p in preds:
        assert 0.0 <= p["score"] <= 1.0
        mask = mask_utils.decode(p["segmentation"])
        assert mask.shape == (64, 64) and mask.any()


def _first_val_batch_outputs(trained):
    """The trained model (eval mode), the first val batch (one image) and its raw outputs."""
    coco, result, cfg = trained
    from angioexp.checkpoints import read_checkpoint
    from angioexp.model.build import build_model, resolved_num_views
    from angioexp.train.data import EvalSet

    model = build_model(cfg)
    model.load_state_dict(read_checkpoint(result.checkpoint)["model"])
    model.eval()
    batch, _ = next(EvalSet(coco, cfg, "val", num_views=resolved_num_views(cfg)).batches(1))
    with torch.no_grad():
        out = model(batch.images, batch.queries)
    return model, batch, out


def test_scores_are_class_times_presence_as_in_sam3(trained):
    coco, result, cfg = trained
    model, batch, out = _first_val_batch_outputs(trained)
    expected = (out["pred_logits"][..., 0].sigmoid() * out["presence_logit_dec"].sigmoid()).flatten().tolist()
    got = [p["score"] for p in predict_split(model, coco, "val", cfg=cfg, image_ids=[batch.image_ids[0]])]
    for score in got:
        assert min(abs(score - e) for e in expected) < 1e-5


def test_predictions_are_resized_to_the_original_frame(tmp_path):
    coco = make_vessel_coco(tmp_path / "coco", stage=1, size=96, n_train=2, n_val=2)
    cfg = load_config(None, ["init_from=none", "scratch.resolution=64"], stage=1)
    from angioexp.model.build import build_model

    preds = predict_split(build_model(cfg), coco, "val", cfg=cfg)
    assert preds and all(tuple(p["segmentation"]["size"]) == (96, 96) for p in preds)


def test_evaluate_split_writes_metrics_tables_and_overlays(trained, tmp_path):
    coco, result, cfg = trained
    metrics, artifacts, gt = evaluate_split(result.checkpoint, coco, "val", out_dir=tmp_path / "ev")
    assert {"val/AP", "val/AP75", "val/AP75_tol", "val/dice", "val/cldice", "val/dice_mean_segments"} <= set(metrics)
    assert all(k.startswith("val/") for k in metrics) and not any(math.isnan(metrics[k]) for k in ("val/AP", "val/AP50"))
    assert artifacts.metrics_json.is_file() and artifacts.per_image_csv.is_file() and artifacts.predictions_json.is_file()
    assert artifacts.overlays_dir.is_dir() and any(artifacts.overlays_dir.iterdir())
    again, _, _ = evaluate_split(result.checkpoint, coco, "val", gt=gt, max_images=2)  # cached truth, subset
    assert again["val/images_per_s"] > 0


def test_training_on_the_pipelines_synthetic_coco(coco_stage1, tmp_path):
    """The real generator + converter output (conftest), scored against its clean labels."""
    cfg = load_config(None, ["init_from=none", "scratch.resolution=128", "scratch.crop_size=64", "scratch.train_batch_size=2",
                             "train.max_steps=2", f"train.out_dir={tmp_path / 'run'}", "eval.overlays=0"], stage=1)
    result = train(cfg, coco_dir=coco_stage1)
    assert result.steps == 2 and "val/dice" in result.final_metrics
    assert (coco_stage1 / "val" / "annotations_gt.json").is_file()  # scored against the clean truth
    # the semantic head's whole-tree mask is scored beside the instance masks, with its own tables
    assert 0.0 <= result.final_metrics["val/semantic/dice"] <= 1.0 and "val/semantic/cldice" in result.final_metrics
    written = json.loads((result.out_dir / "eval" / "step_2" / "semantic" / "metrics.json").read_text())["metrics"]
    assert written["dice"] == pytest.approx(result.final_metrics["val/semantic/dice"])


def test_stage2_semantic_head_is_scored_per_segment(trained, tmp_path):
    """Stage 2 also scores the semantic head: one mask per (image, segment prompt) = its semantic
    logits > 0 (mask threshold 0.5), score = the presence probability."""
    coco, result, cfg = trained
    model, batch, out = _first_val_batch_outputs(trained)
    semantic: list[dict] = []
    predict_split(model, coco, "val", cfg=cfg, image_ids=[batch.image_ids[0]], semantic_out=semantic)
    expected = {}
    for b, category_id in enumerate(batch.category_ids):
        mask = (out["semantic_seg"][b, 0] > 0).numpy()
        if mask.any():
            expected[category_id] = (float(out["presence_logit_dec"][b, 0].sigmoid()), mask)
    assert semantic and sorted(p["category_id"] for p in semantic) == sorted(expected)  # one per non-empty prompt
    for p in semantic:
        score, mask = expected[p["category_id"]]
        assert p["score"] == pytest.approx(score, abs=1e-5)
        assert (mask_utils.decode(p["segmentation"]).astype(bool) == mask).all()

    metrics, _, _ = evaluate_split(result.checkpoint, coco, "val", out_dir=tmp_path / "ev")
    written = json.loads((tmp_path / "ev" / "semantic" / "metrics.json").read_text())["metrics"]
    assert written["dice_mean_segments"] == pytest.approx(metrics["val/semantic/dice_mean_segments"], nan_ok=True)
    assert (tmp_path / "ev" / "semantic" / "per_category.csv").is_file()
    assert "val/semantic/dice_mean_segments" in metrics and 0.0 <= metrics["val/semantic/dice_mean_segments"] <= 1.0
    assert any(k.startswith("val/semantic/dice/") for k in metrics)
