"""``angioexp doctor``: every pitfall the researcher's SAM3 config triggers, with its fix and the
angioexp equivalent config. Reads YAML only, so it runs without the sam3 package too."""

from __future__ import annotations

import json

import pytest
import yaml

from angioexp.backends.sam3.doctor import diagnose, equivalent_config
from angioexp.cli import main
from angioexp.config import load_config

# configs/angiography/vessel_segmentation.yaml with the researcher's values (issue 6).
RESEARCHER_YAML = """\
# @package _global_
# configs/angiography/vessel_segmentation.yaml (the researcher's values)
defaults:
  - _self_
paths:
  angio_root: /data/angio_coco
  experiment_log_dir: /experiments/vessel_seg
  bpe_path: /opt/sam3/assets/bpe_simple_vocab_16e6.txt.gz
  checkpoint_path: /weights/sam3.pt
scratch:
  enable_segmentation: true
  d_model: 256
  resolution: 1008
  max_ann_per_img: 200
  matcher:
    _target_: sam3.train.matcher.BinaryHungarianMatcherV2
    focal: true
    cost_class: 2.0
    cost_bbox: 5.0
    cost_giou: 2.0
    alpha: 0.25
    gamma: 2
    stable: false
  lr_scale: 0.02
  lr_transformer: ${times:8e-4,${scratch.lr_scale}}
  lr_vision_backbone: ${times:2.5e-4,${scratch.lr_scale}}
  lr_language_backbone: ${times:5e-5,${scratch.lr_scale}}
  lrd_vision_backbone: 0.9
  wd: 0.1
  scheduler_timescale: 20
  scheduler_warmup: 20
  scheduler_cooldown: 20
  train_batch_size: 1
  val_batch_size: 1
  collate_fn:
    _target_: sam3.train.data.collator.collate_fn_api
    _partial_: true
    repeats: 1
    dict_key: all
    with_seg_masks: ${scratch.enable_segmentation}
angio_train:
  train_transforms:
    - _target_: sam3.train.transforms.basic_for_api.ComposeAPI
      transforms:
        - _target_: sam3.train.transforms.segmentation.DecodeRle
        - _target_: sam3.train.transforms.point_sampling.RandomGeometricInputsAPI
          num_points: [5, 15]
          box_chance: 0.2
          point_sample_mode: centered
          geometric_query_str: visual
          resample_box_from_mask: true
        - _target_: sam3.train.transforms.basic_for_api.RandomResizeAPI
          sizes: ${scratch.resolution}
          square: true
          consistent_transform: false
        - _target_: sam3.train.transforms.basic_for_api.ToTensorAPI
        - _target_: sam3.train.transforms.basic_for_api.NormalizeAPI
          mean: [0.5, 0.5, 0.5]
          std: [0.5, 0.5, 0.5]
  loss:
    _target_: sam3.train.loss.sam3_loss.Sam3LossWrapper
    matcher: ${scratch.matcher}
    o2m_weight: 2.0
    o2m_matcher:
      _target_: sam3.train.matcher.BinaryOneToManyMatcher
      alpha: 0.3
      threshold: 0.4
      topk: 4
    use_o2m_matcher_on_o2m_aux: false
    loss_fns_find:
      - _target_: sam3.train.loss.loss_fns.Boxes
        weight_dict:
          loss_bbox: 5.0
          loss_giou: 2.0
      - _target_: sam3.train.loss.loss_fns.IABCEMdetr
        weak_loss: false
        weight_dict:
          loss_ce: 20.0
          presence_loss: 20.0
        pos_weight: 5.0
        alpha: 0.25
        gamma: 2
        use_presence: true
        pos_focal: false
        pad_n_queries: 200
        pad_scale_pos: 1.0
      - _target_: sam3.train.loss.loss_fns.Masks
        focal_alpha: 0.25
        focal_gamma: 2.0
        weight_dict:
          loss_mask: 5.0
          loss_dice: 5.0
        compute_aux: false
    loss_fn_semantic_seg:
      _target_: sam3.train.loss.loss_fns.SemanticSegCriterion
      presence_loss: true
      focal: true
      focal_alpha: 0.6
      focal_gamma: 1.6
      downsample: false
      weight_dict:
        loss_semantic_seg: 5.0
    scale_by_find_batch_size: true
trainer:
  _target_: sam3.train.trainer.Trainer
  max_epochs: 20
  accelerator: cuda
  mode: train
  loss:
    all: ${angio_train.loss}
    default:
      _target_: sam3.train.loss.sam3_loss.DummyLoss
  model:
    _target_: sam3.model_builder.build_sam3_image_model
    bpe_path: ${paths.bpe_path}
    checkpoint_path: ${paths.checkpoint_path}
    device: cpus
    eval_mode: false
    enable_segmentation: ${scratch.enable_segmentation}
  optim:
    amp:
      enabled: true
      amp_dtype: bfloat16
    optimizer:
      _target_: torch.optim.AdamW
    gradient_clip:
      _target_: sam3.train.optim.optimizer.GradientClipper
      max_norm: 0.1
      norm_type: 2
"""

EXPECTED = {
    "points_dropped", "geometric_query_never_matches", "centered_points_cluster", "matcher_not_used",
    "checkpoint_loads_silently", "nan_kills_run", "mask_loss_weights_low", "semantic_presence_loss",
}


@pytest.fixture()
def researcher(tmp_path):
    path = tmp_path / "vessel_segmentation.yaml"
    path.write_text(RESEARCHER_YAML)
    return path


def test_lists_every_pitfall_with_fix_and_equivalent():
    findings, _ = diagnose(yaml.safe_load(RESEARCHER_YAML))
    assert {f.code for f in findings} == EXPECTED
    for f in findings:
        assert f.what and f.fix and f.angioexp and f.severity in ("error", "warning")
    by_code = {f.code: f for f in findings}
    assert "40× lower" in by_code["mask_loss_weights_low"].what
    assert by_code["points_dropped"].where.endswith("num_points")
    assert "ZERO tensors" in by_code["checkpoint_loads_silently"].what


def test_equivalent_config_is_valid_and_faithful(tmp_path):
    _, eq = diagnose(yaml.safe_load(RESEARCHER_YAML))
    path = tmp_path / "angioexp.yaml"
    path.write_text(yaml.safe_dump(equivalent_config(eq)))
    cfg = load_config(path)
    assert cfg.backend == "sam3" and cfg.scratch.resolution == 1008 and cfg.scratch.enable_segmentation
    assert cfg.scratch.lr_scale == 0.02 and cfg.scratch.lr_transformer == pytest.approx(1.6e-5)
    assert cfg.prompts.num_points == (5, 15) and cfg.prompts.box_chance == 0.2
    assert cfg.prompts.point_sample_mode == "centreline" and cfg.prompts.resample_box_from_mask
    assert (cfg.loss.boxes.loss_bbox, cfg.loss.boxes.loss_giou) == (5.0, 2.0)
    assert (cfg.loss.iabce.loss_ce, cfg.loss.iabce.presence_loss, cfg.loss.iabce.pos_weight) == (20.0, 20.0, 5.0)
    assert (cfg.loss.masks.loss_mask, cfg.loss.masks.loss_dice) == (5.0, 5.0)
    assert (cfg.loss.semantic.loss_semantic_seg, cfg.loss.semantic.focal_alpha, cfg.loss.semantic.focal_gamma) == (5.0, 0.6, 1.6)
    assert cfg.loss.semantic.presence_loss is False
    assert (cfg.matcher.cost_class, cfg.matcher.cost_bbox, cfg.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert cfg.o2m.enabled and cfg.o2m.o2m_weight == 2.0
    assert cfg.sam3.checkpoint == "/weights/sam3.pt"


def test_cli(researcher, tmp_path, capsys):
    out = tmp_path / "equivalent.yaml"
    assert main(["doctor", str(researcher), "--json", "--write-config", str(out)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {f["code"] for f in report["findings"]} == EXPECTED
    assert load_config(out).prompts.num_points == (5, 15)
    assert main(["doctor", str(researcher)]) == 1
    text = capsys.readouterr().out
    assert "8 pitfall(s) found" in text and "Point prompts are ignored in PCS" in text


@pytest.mark.parametrize("edit, code", [
    (lambda d: d["scratch"].__setitem__("resolution", 672), "resolution"),
    (lambda d: d["scratch"]["collate_fn"].__setitem__("with_seg_masks", False), "masks_not_collated"),
    (lambda d: d["angio_train"]["loss"]["loss_fn_semantic_seg"].__setitem__(
        "_target_", "sam3.losses.loss_fns.SemanticSegCriterion"), "semantic_target_missing"),
    (lambda d: d["trainer"]["model"].pop("checkpoint_path"), "downloads_weights"),
    (lambda d: d["scratch"]["matcher"].__setitem__("cost_bbox", 3.0), "matcher_not_used"),
])
def test_other_pitfalls(edit, code):
    data = yaml.safe_load(RESEARCHER_YAML)
    edit(data)
    findings, _ = diagnose(data)
    assert code in {f.code for f in findings}
    if code == "matcher_not_used":
        assert next(f for f in findings if f.code == code).severity == "error"  # configured ≠ hard-coded


def test_clean_config_and_bad_input(tmp_path, capsys):
    clean = tmp_path / "clean.yaml"
    clean.write_text("scratch:\n  resolution: 1008\n")
    assert main(["doctor", str(clean)]) == 0
    assert "no known pitfall" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    assert main(["doctor", str(bad)]) == 2
    assert main(["doctor", str(tmp_path / "missing.yaml")]) == 2
