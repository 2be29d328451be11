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
    "matcher_nan_crash",
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
    assert "9 pitfall(s) found" in text and "Point prompts are ignored in PCS" in text


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


# --- what SAM3 users hit (facebookresearch/sam3 issues) ---------------------------------------------

TRAIN_DATA = {
    "train": {"_target_": "sam3.train.data.torch_dataset.TorchDataset",
              "dataset": {"_target_": "sam3.train.data.sam3_image_dataset.Sam3ImageDataset", "limit_ids": 100},
              "batch_size": "${scratch.train_batch_size}", "drop_last": True, "collate_fn": "${scratch.collate_fn}"},
    "val": {"_target_": "sam3.train.data.torch_dataset.TorchDataset",
            "collate_fn": {"_target_": "sam3.train.data.collator.collate_fn_api", "dict_key": "angio"}},
}
DUMPER = {"_target_": "sam3.eval.coco_writer.PredictionDumper", "iou_type": "segm",
          "postprocessor": {"_target_": "sam3.eval.postprocessors.PostProcessImage", "iou_type": "segm",
                            "use_original_sizes_mask": True}}


def _with_data(d):
    d["trainer"]["data"] = json.loads(json.dumps(TRAIN_DATA))
    d["trainer"]["meters"] = {"val": {"angio": {"segm": dict(DUMPER, postprocessor=dict(DUMPER["postprocessor"]))}}}
    return d


def _edit(path, value):
    def apply(d):
        node = _with_data(d)
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return apply


NEW_CHECKS = [
    ("scratch.collate_fn.dict_key", "angio_train", "train_on_dummy_loss", "#367"),
    ("trainer.data.val.collate_fn.dict_key", "all", "val_key_names_a_loss", "#448"),
    ("trainer.meters.val.angio.segm.postprocessor.iou_type", "bbox", "segm_eval_without_masks", "#485"),
    ("scratch.enable_segmentation", False, "segm_eval_without_masks", "#330"),
    ("trainer.data.train.dataset.limit_ids", 1, "empty_train_loader", "#251"),
    ("scratch.train_batch_size", 2, "oom_at_1008", "#343"),
    ("trainer.model.checkpoint_path", None, "downloads_weights", "Hugging Face"),
]


def test_wired_data_config_has_no_new_finding():
    findings, _ = diagnose(_with_data(yaml.safe_load(RESEARCHER_YAML)))
    assert {f.code for f in findings} == EXPECTED


@pytest.mark.parametrize("path, value, code, cited", NEW_CHECKS)
def test_pitfalls_sam3_users_hit(path, value, code, cited):
    data = yaml.safe_load(RESEARCHER_YAML)
    _edit(path, value)(data)
    if path == "trainer.data.train.dataset.limit_ids":
        data["launcher"] = {"gpus_per_node": 2, "num_nodes": 1}
    findings = {f.code: f for f in diagnose(data)[0]}
    assert code in findings and cited in findings[code].what
    assert findings[code].fix and findings[code].angioexp


def test_no_checkpoint_and_no_download_means_random_weights():
    data = yaml.safe_load(RESEARCHER_YAML)
    data["trainer"]["model"].pop("checkpoint_path")
    data["trainer"]["model"]["load_from_HF"] = False
    finding = next(f for f in diagnose(data)[0] if f.code == "random_weights")
    assert finding.severity == "error" and "every weight is random" in finding.what
    assert "sam3.checkpoint" in finding.angioexp


@pytest.fixture()
def flawed_coco(tmp_path):
    """A COCO folder with one of each data problem SAM3 trips on."""
    from angioexp.backends.sam3.gpu_check import make_tiny_coco

    coco = make_tiny_coco(tmp_path / "coco", n_train=3, n_val=1, size=64)
    ann = coco / "train" / "annotations.json"
    data = json.loads(ann.read_text())
    first, second = data["annotations"][0], data["annotations"][1]
    first["bbox"][2] = 0.0  # a straight vertical vessel: zero width
    second["segmentation"]["size"] = [32, 32]  # RLE of another size than its 64×64 image
    data["annotations"].append(dict(first, id=99, bbox=[1.0, 1.0, 3.0, 3.0]))  # a second piece: 2 targets
    data["images"].append(dict(data["images"][0], id=50, file_name="extra.png"))  # no annotation
    data["categories"].append({"id": 7, "name": "lad_distal", "supercategory": "vessel"})  # never used
    ann.write_text(json.dumps(data))
    return coco


DATA_CODES = {"zero_size_boxes", "rle_size_mismatch", "several_targets_per_query",
              "images_without_annotations", "unused_categories"}


def test_doctor_data_names_every_problem(flawed_coco, capsys):
    assert main(["doctor", "--data", str(flawed_coco), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    findings = {f["code"]: f for f in report["findings"]}
    assert set(findings) == DATA_CODES and report["angioexp_config"] is None
    assert all(f["where"].startswith(str(flawed_coco / "train" / "annotations.json")) for f in findings.values())
    assert "annotations 1" in findings["zero_size_boxes"]["where"] and "without an epsilon" in findings["zero_size_boxes"]["what"]
    assert "32, 32" in findings["rle_size_mismatch"]["where"]
    assert "lad_distal" in findings["unused_categories"]["where"]
    assert "images 50" in findings["images_without_annotations"]["where"]
    assert "single target" in findings["several_targets_per_query"]["what"]


def test_doctor_config_and_data_together(researcher, flawed_coco, capsys):
    assert main(["doctor", str(researcher), "--data", str(flawed_coco)]) == 1
    text = capsys.readouterr().out
    assert f"{len(EXPECTED) + len(DATA_CODES)} pitfall(s) found" in text
    for code in EXPECTED | DATA_CODES:
        assert f" {code} — " in text


def test_doctor_data_clean_and_bad_input(tmp_path, capsys):
    from angioexp.backends.sam3.gpu_check import make_tiny_coco

    clean = make_tiny_coco(tmp_path / "clean", n_train=2, n_val=1, size=64)
    assert main(["doctor", "--data", str(clean)]) == 0
    assert "no known pitfall" in capsys.readouterr().out
    assert main(["doctor", "--data", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["doctor", "--data", str(tmp_path / "empty")]) == 2
    assert main(["doctor"]) == 2


def test_identity_term_on_data_without_two_segments_per_image(tmp_path, capsys):
    """The sam3 backend's identity loss needs frames with several segment categories."""
    from angioexp.backends.sam3.gpu_check import make_tiny_coco

    data = yaml.safe_load(RESEARCHER_YAML)
    data["angio_train"]["loss"]["loss_fns_find"].append({
        "_target_": "angioexp.backends.sam3.identity_loss.PromptIdentityLoss",
        "weight_dict": {"loss_identity_ce": 20.0, "loss_identity_dice": 10.0}, "class_weight_power": 0.25})
    config = tmp_path / "with_identity.yaml"
    config.write_text(yaml.safe_dump(data))
    coco = make_tiny_coco(tmp_path / "coco", n_train=2, n_val=1, size=64)  # Stage 1: one category

    assert main(["doctor", str(config), "--data", str(coco), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    found = [f for f in report["findings"] if f["code"] == "identity_without_segments"]
    assert len(found) == 1 and "1 category, at most 1 per image" in found[0]["where"]
    assert "sigmoid" in found[0]["what"]
    identity = report["angioexp_config"]["loss"]["identity"]
    assert identity == {"loss_identity_ce": 20.0, "loss_identity_dice": 10.0, "class_weight_power": 0.25}

    # a frame with two segments: nothing to say
    ann = coco / "train" / "annotations.json"
    coco_data = json.loads(ann.read_text())
    coco_data["annotations"].append(dict(coco_data["annotations"][0], id=99, category_id=2))
    coco_data["categories"].append({"id": 2, "name": "lad_distal", "supercategory": "vessel"})
    ann.write_text(json.dumps(coco_data))
    assert main(["doctor", str(config), "--data", str(coco), "--json"]) == 1
    assert "identity_without_segments" not in {f["code"] for f in json.loads(capsys.readouterr().out)["findings"]}
