"""Stage 2 segment identity: the dense head's shapes, its loss on hand-computed cases, the data
it trains on, and the segment metrics read against their reference points."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from angioexp.config import load_config
from angioexp.errors import InputError
from angioexp.evaluate.evaluator import evaluate_predictions, load_ground_truth
from angioexp.evaluate.rle import encode
from angioexp.evaluate.segments import segment_report
from angioexp.losses.identity import SegmentIdentityLoss
from angioexp.model.identity import SegmentIdentityHead
from angioexp.train.data import segment_label_map


def test_identity_head_shapes_and_prompt_subsets():
    torch.manual_seed(0)
    head = SegmentIdentityHead(d_model=32, mask_dim=8, num_views=5)
    pixel_embed = torch.randn(2, 8, 32, 48)
    memory = torch.randn(2, 2 * 3, 32)
    views = torch.tensor([0, 5])  # a known view and the "unknown" row
    logits, presence = head(pixel_embed, memory, (2, 3), views, torch.randn(4, 32))
    assert logits.shape == (2, 5, 32, 48) and presence.shape == (2, 4)
    # Any subset of prompts can be asked: the softmax runs over the ones asked (+ background).
    logits, presence = head(pixel_embed, memory, (2, 3), views, torch.randn(1, 32))
    assert logits.shape == (2, 2, 32, 48) and presence.shape == (2, 1)
    logits.sum().backward()
    assert head.background.grad is not None and head.fine.layers[0].weight.grad is not None


def test_identity_levels_start_at_zero_then_name_pixels_finer_than_a_region_cell():
    """Two decoder levels (strides 8, 4 of a 32×48 image: 4×6 and 8×12 maps): their projections
    start at zero, so at first the maps change nothing; every level gets a gradient."""
    torch.manual_seed(0)
    head = SegmentIdentityHead(d_model=32, mask_dim=8, num_views=5, level_channels=(24, 12))
    pixel_embed, memory, views, prompts = torch.randn(2, 8, 32, 48), torch.randn(2, 2 * 3, 32), torch.tensor([0, 5]), torch.randn(4, 32)
    levels = [torch.randn(2, 24, 4, 6), torch.randn(2, 12, 8, 12)]
    logits, presence = head(pixel_embed, memory, (2, 3), views, prompts, levels)
    assert logits.shape == (2, 5, 32, 48) and presence.shape == (2, 4)
    assert torch.equal(logits, head(pixel_embed, memory, (2, 3), views, prompts, [torch.zeros_like(m) for m in levels])[0])
    logits.square().sum().backward()
    assert all(level.layers[-1].weight.grad.abs().sum() > 0 for level in head.levels)
    with pytest.raises(ValueError, match="built for 2 decoder levels, got 1"):
        head(pixel_embed, memory, (2, 3), views, prompts, levels[:1])
    # one level per pixel-decoder map at most, refused at load time naming both keys
    with pytest.raises(InputError, match="model.identity_levels.*model.encoder_channels"):
        load_config(None, ["model.identity_levels=5"], stage=2)


def test_presence_evidence_reads_each_prompts_pixels_without_pulling_the_maps():
    """Evidence per (image, prompt) = (log(1 + 1000 × expected area fraction), peak probability),
    from the softmax over background + prompts; the presence loss does not reach the maps."""
    logits = torch.full((1, 3, 10, 10), -30.0)
    logits[0, 0] = 0.0  # background everywhere ...
    logits[0, 1, :2, :6] = 30.0  # ... except 12 pixels of prompt 1 (probability ~1 there)
    evidence = SegmentIdentityHead.evidence(logits)  # read on every other pixel: 3 of 25
    assert evidence.shape == (1, 2, SegmentIdentityHead.EVIDENCE)
    assert torch.allclose(evidence[0, 0], torch.tensor([math.log1p(1000 * 12 / 100), 1.0]), atol=1e-4)
    assert torch.allclose(evidence[0, 1], torch.zeros(2), atol=1e-4)  # prompt 2 has no pixel

    torch.manual_seed(0)
    head = SegmentIdentityHead(d_model=32, mask_dim=8, num_views=5, presence_evidence=True)
    pixel_embed, memory, views, prompts = torch.randn(2, 8, 32, 48), torch.randn(2, 6, 32), torch.tensor([0, 5]), torch.randn(4, 32)
    logits, presence = head(pixel_embed, memory, (2, 3), views, prompts)
    presence.sum().backward()
    assert head.fine.layers[0].weight.grad is None  # detached: the maps learn only from their own loss
    assert head.presence.layers[0].weight.grad[:, -SegmentIdentityHead.EVIDENCE:].abs().sum() > 0
    # off by default: the presence head reads pooled memory and prompt only
    assert SegmentIdentityHead(32, 8, 5).presence.layers[0].in_features == 64


def test_core_model_gives_identity_outputs_for_the_category_prompts():
    cfg = load_config(None, ["train.device=cpu"], stage=2)
    assert cfg.model.identity_head  # the core Stage 2 default
    from angioexp.model.build import build_model
    from angioexp.model.core import FindQueries
    from angioexp.model.prompt_encoder import PromptTokenizer

    model = build_model(cfg)
    tok = PromptTokenizer()
    classes = tok.batch(["proximal right coronary artery", "mid right coronary artery", "catheter"])
    queries = FindQueries(img_idx=torch.tensor([0]), text_ids=tok.batch(["first diagonal"]),
                          point_coords=torch.zeros(1, 0, 2), point_labels=torch.zeros(1, 0, dtype=torch.long),
                          boxes=torch.zeros(1, 0, 4), box_valid=torch.zeros(1, 0, dtype=torch.bool),
                          views=torch.tensor([0]), class_text_ids=classes)
    out = model(torch.zeros(1, 1, 64, 64, dtype=torch.uint8), queries)
    assert out["identity_logits"].shape == (1, 4, 64, 64)
    assert out["identity_presence"].shape == (1, 3)
    # Without class prompts the model behaves as before (no identity outputs).
    queries.class_text_ids = None
    assert "identity_logits" not in model(torch.zeros(1, 1, 64, 64, dtype=torch.uint8), queries)


def _loss(power=0.0):
    return SegmentIdentityLoss({"loss_identity_ce": 1, "loss_identity_dice": 1, "loss_identity_presence": 1},
                               class_weight_power=power)


def test_identity_loss_on_a_hand_computed_case():
    # 1 image, 2×2 pixels, background + 2 prompts, uniform logits: CE = ln 3; each present
    # segment's soft Dice = (2·1/3 + 1) / (4/3 + 1 + 1) = 0.5; presence logits 0 vs [1, 0]: ln 2.
    outputs = {"identity_logits": torch.zeros(1, 3, 2, 2), "identity_presence": torch.zeros(1, 2)}
    targets = {"segment_labels": torch.tensor([[[0, 1], [2, 0]]]), "segment_present": torch.tensor([[1.0, 0.0]])}
    values = _loss()(outputs, targets)
    assert values["loss_identity_ce"].item() == pytest.approx(math.log(3))
    assert values["loss_identity_dice"].item() == pytest.approx(0.5)
    assert values["loss_identity_presence"].item() == pytest.approx(math.log(2))
    # A confident, correct prediction: CE and Dice loss near 0.
    confident = torch.full((1, 3, 2, 2), -20.0)
    for k, (y, x) in ((0, (0, 0)), (1, (0, 1)), (2, (1, 0)), (0, (1, 1))):
        confident[0, k, y, x] = 20.0
    values = _loss()({"identity_logits": confident, "identity_presence": torch.tensor([[20.0, -20.0]])}, targets)
    assert values["loss_identity_ce"].item() < 1e-6
    assert values["loss_identity_dice"].item() == pytest.approx(1 - 3 / 3, abs=1e-4)  # (2·1 + 1) / (1 + 1 + 1)
    assert values["loss_identity_presence"].item() < 1e-6
    # Ignored pixels (-1) count nowhere.
    targets["segment_labels"] = torch.tensor([[[-1, 1], [2, -1]]])
    values = _loss()({"identity_logits": torch.zeros(1, 3, 2, 2), "identity_presence": torch.zeros(1, 2)}, targets)
    assert values["loss_identity_ce"].item() == pytest.approx(math.log(3))
    assert values["loss_identity_dice"].item() == pytest.approx(1 - (2 / 3 + 1) / (2 / 3 + 1 + 1))


def test_class_weights_balance_frequencies():
    labels = torch.tensor([[[0, 1], [2, 0]]])  # frequencies 1/2, 1/4, 1/4
    weights = _loss(power=1.0).class_weights(labels, 3)
    assert weights.tolist() == pytest.approx([2 / 3, 4 / 3, 4 / 3], rel=1e-5)  # ∝ 1/frequency, pixel mean 1
    assert _loss(power=0.0).class_weights(labels, 3).tolist() == pytest.approx([1, 1, 1])


def test_identity_loss_refuses_a_label_outside_the_prompts():
    outputs = {"identity_logits": torch.zeros(1, 3, 2, 2), "identity_presence": torch.zeros(1, 2)}
    targets = {"segment_labels": torch.tensor([[[0, 3], [0, 0]]]), "segment_present": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="segment label 3 out of range"):
        _loss()(outputs, targets)


def test_segment_label_map_names_an_unknown_label():
    a = np.zeros((4, 4), dtype=bool)
    a[0] = True
    b = np.zeros((4, 4), dtype=bool)
    b[:, 0] = True
    label = segment_label_map([(7, a), (9, b)], [7, 9], (4, 4))
    assert label[0, 1] == 1 and label[2, 0] == 2 and label[0, 0] == 2  # overlap: the later wins
    with pytest.raises(InputError, match="segment label 5 is not among the categories"):
        segment_label_map([(5, a)], [7, 9], (4, 4))


# -- segment metrics ---------------------------------------------------------------------------

def _frames():
    """Two 16×16 frames; segment 1 (a row), segment 2 (a column), catheter 26 in frame 0."""
    images, annotations, truth = [], [], {}
    cats = [{"id": 1, "name": "rca_proximal"}, {"id": 2, "name": "rca_mid"}, {"id": 26, "name": "catheter"}]
    for image_id in (1, 2):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 16, "width": 16})
        masks = {}
        row = np.zeros((16, 16), dtype=bool)
        row[4, 2:14] = True
        col = np.zeros((16, 16), dtype=bool)
        col[6:14, 8] = True
        masks[1], masks[2] = row, col
        if image_id == 1:
            cath = np.zeros((16, 16), dtype=bool)
            cath[0, :] = True
            masks[26] = cath
        for category_id, mask in masks.items():
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "segmentation": encode(mask), "area": int(mask.sum()),
                                "bbox": [0, 0, 16, 16], "iscrowd": 0})
        truth[image_id] = masks
    return {"images": images, "annotations": annotations, "categories": cats}, truth


def _as_results(truth, assign):
    return [{"image_id": i, "category_id": c, "segmentation": encode(m), "score": 0.9}
            for i, masks in truth.items() for c, m in assign(masks).items()]


def test_segment_report_perfect_output_floor_and_ceiling():
    coco, truth = _frames()
    gt = load_ground_truth(coco)
    perfect = evaluate_predictions(gt, _as_results(truth, lambda m: m), per_category=True)
    report = segment_report(gt, perfect.per_pair, working_resolution=16, n_bootstrap=50)
    m = report.metrics
    assert m["dice_common"] == pytest.approx(1.0) and m["ceiling_common"] == pytest.approx(1.0)
    assert m["n_common"] == 2  # the catheter is no segment
    # Floor: 2|T| / (|T| + |tree|) with |row| = 12, |col| = 8, tree 20 (catheter excluded).
    assert m["floor_common"] == pytest.approx((2 * 12 / 32 + 2 * 8 / 28) / 2)
    assert m["dice_common_ci_low"] == pytest.approx(1.0) and m["dice_common_ci_high"] == pytest.approx(1.0)

    # The no-identity predictor (whole tree for every segment present, catheter exact) scores
    # exactly the floor through the evaluator.
    def no_identity(masks):
        tree = masks[1] | masks[2]
        return {c: (m if c == 26 else tree) for c, m in masks.items()}

    blind = evaluate_predictions(gt, _as_results(truth, no_identity), per_category=True)
    assert segment_report(gt, blind.per_pair, n_bootstrap=10).metrics["dice_common"] == pytest.approx(m["floor_common"])


def test_segment_report_confusion_counts_vessel_pixels(tmp_path):
    coco, truth = _frames()
    gt = load_ground_truth(coco)
    swapped = {i: np.where(m[1], 2, np.where(m[2], 1, 0)) for i, m in truth.items()}  # names exchanged
    result = evaluate_predictions(gt, _as_results(truth, lambda m: {1: m[2], 2: m[1]}), per_category=True)
    report = segment_report(gt, result.per_pair, predicted_label_maps=swapped, n_bootstrap=10)
    conf = report.confusion
    assert conf.loc["rca_proximal", "rca_mid"] == 2 * 12  # every truth pixel, two frames
    assert conf.loc["rca_mid", "rca_proximal"] == 2 * 8
    assert conf.loc["rca_proximal", "rca_proximal"] == 0
    assert conf.loc["catheter", "background"] == 16
    assert report.metrics["dice_common"] < 0.2
    report.write(tmp_path / "segments")
    assert (tmp_path / "segments" / "confusion.png").stat().st_size > 1000
    table = pd.read_csv(tmp_path / "segments" / "per_segment.csv")
    assert set(table["slug"]) == {"rca_proximal", "rca_mid", "catheter"}


def test_segment_report_ungated_figure_ignores_presence_scores():
    coco, truth = _frames()
    gt = load_ground_truth(coco)
    # Every pixel named right, but segment 2's presence score is under the threshold: the gated
    # headline loses it, the threshold-free figure from the label maps does not.
    results = [dict(r, score=0.1 if r["category_id"] == 2 else 0.9) for r in _as_results(truth, lambda m: m)]
    gated = evaluate_predictions(gt, results, per_category=True, score_threshold=0.5)
    labels = {i: np.where(m[1], 1, np.where(m[2], 2, 0)) for i, m in truth.items()}
    report = segment_report(gt, gated.per_pair, predicted_label_maps=labels, n_bootstrap=10)
    assert report.metrics["dice_common"] == pytest.approx(0.5)
    assert report.metrics["dice_common_ungated"] == pytest.approx(1.0)
    assert report.per_segment.set_index("slug").loc["rca_mid", "dice_ungated"] == pytest.approx(1.0)
    swapped = {i: np.where(m[1], 2, np.where(m[2], 1, 0)) for i, m in truth.items()}
    assert segment_report(gt, gated.per_pair, predicted_label_maps=swapped,
                          n_bootstrap=10).metrics["dice_common_ungated"] == pytest.approx(0.0)
    assert "dice_common_ungated" not in segment_report(gt, gated.per_pair, n_bootstrap=10).metrics


def test_rare_segment_sampler_draws_frames_with_rare_segments_more_often(coco_stage2):
    from angioexp.model.build import resolved_num_views
    from angioexp.train.data import TrainingSet

    cfg = load_config(None, ["data.rare_segment_power=1"], stage=2)
    data = TrainingSet(coco_stage2, cfg, num_views=resolved_num_views(cfg))
    cats = [s.categories() for s in data.samples]
    counts = pd.Series([c for cs in cats for c in cs]).value_counts()
    rarest = counts.index[-1]
    with_rare = np.array([rarest in cs for cs in cats])
    assert 0 < with_rare.sum() < len(cats)
    draws = np.concatenate([data.image_order(epoch) for epoch in range(200)])
    share = with_rare[draws].mean()
    assert share > 1.5 * with_rare.mean()  # drawn well above their share of the split
    assert np.array_equal(data.image_order(3), TrainingSet(coco_stage2, cfg, num_views=resolved_num_views(cfg)).image_order(3))
    plain = TrainingSet(coco_stage2, load_config(None, [], stage=2), num_views=resolved_num_views(cfg))
    assert sorted(plain.image_order(0)) == list(range(len(plain)))  # default: a permutation per epoch


def test_evaluate_cli_reports_stage2_segment_figures(coco_stage2, tmp_path, capsys):
    import json

    from angioexp.cli import main
    from angioexp.evaluate.evaluator import annotations_as_predictions

    truth = coco_stage2 / "val" / "annotations.json"
    preds = tmp_path / "truth_as_predictions.json"
    preds.write_text(json.dumps(annotations_as_predictions(truth)))
    assert main(["evaluate", "--coco", str(coco_stage2), "--predictions", str(preds), "--out", str(tmp_path / "ev"),
                 "--max-overlays", "0"]) == 0
    assert "dice_common 1.0000" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert metrics["segments/dice_common"] == pytest.approx(1.0)
    assert metrics["segments/arcade_mean_f1"] == pytest.approx(1.0)
    assert 0.05 < metrics["segments/floor_common"] < 0.5
    assert (tmp_path / "ev" / "segments" / "per_segment.csv").is_file()


@pytest.mark.parametrize("tree_labelling", [False, True])
def test_identity_outputs_semantic_masks_and_their_pieces(tree_labelling):
    """Semantic results partition the vessel pixels of the label map; instances are pieces of them."""
    from types import SimpleNamespace

    from angioexp.evaluate.rle import decode
    from angioexp.model.build import build_model
    from angioexp.model.prompt_encoder import PromptTokenizer
    from angioexp.train.inference import predict_identity_batch

    cfg = load_config(None, ["model.encoder_channels=[8,8,16,16]", "model.d_model=32", "seed=3"], stage=2)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a strong, position-dependent output from a random model
        model.transformer.identity.fine.layers[-1].weight.mul_(40)
    category_ids = [1, 2, 3, 26]
    texts = PromptTokenizer().batch(["proximal right coronary artery", "mid right coronary artery",
                                     "distal right coronary artery", "catheter"])
    images = torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8)
    batch = SimpleNamespace(images=images, queries=SimpleNamespace(views=torch.tensor([0, 1])), image_ids=[11, 12])
    semantic, maps = [], {}
    instances = predict_identity_batch(model, batch, [(96, 96), (64, 64)], texts, category_ids, min_score=0.0,
                                       semantic_out=semantic, label_maps_out=maps, tree_labelling=tree_labelling)
    assert set(maps) == {11, 12} and maps[11].shape == (96, 96)  # at each frame's own size
    assert semantic, "a random model still labels some pixels"
    for result in semantic:
        mask = decode(result["segmentation"])
        assert np.array_equal(mask, maps[result["image_id"]] == result["category_id"])
        pieces = [decode(r["segmentation"]) for r in instances
                  if (r["image_id"], r["category_id"]) == (result["image_id"], result["category_id"])]
        for piece in pieces:
            assert not (piece & ~mask).any()
        assert all(r["score"] <= result["score"] + 1e-9 for r in instances
                   if (r["image_id"], r["category_id"]) == (result["image_id"], result["category_id"]))


def test_paired_interval_of_paired_seeds():
    from angioexp.evaluate.paired import paired_interval

    mean, low, high = paired_interval([0.1, 0.2, 0.3])  # sd 0.1, t(0.975, 2) = 4.3027
    assert mean == pytest.approx(0.2)
    assert high - mean == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4) and mean - low == pytest.approx(high - mean)
    assert math.isnan(paired_interval([0.05])[1])  # one pair is an anecdote: no interval
