"""angioexp.backends.sam3.model: each silent SAM3 behaviour fails on SAM3's code and is fixed by ours.

Small SAM3 modules (a 2-block ViT, a 1-layer text encoder, SAM3's real geometry encoder) keep
these tests fast; the full 840M-parameter model is exercised by tests/test_sam3_e2e.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)
import torch  # noqa: E402
from sam3.model.data_misc import BatchedDatapoint, FindStage  # noqa: E402
from sam3.model.sam3_image import Sam3Image  # noqa: E402

from angioexp.backends.sam3.model import (  # noqa: E402
    Sam3ImageWithPoints,
    assemble_model,
    check_resolution,
    init_text_encoder,
    resize_vit_rope,
)
from angioexp.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.sam3


# --- point prompts ------------------------------------------------------------------------------


def _batch(points: torch.Tensor | None) -> BatchedDatapoint:
    """One find stage of B=2 queries; points (B, N, 3) or None."""
    b = 2
    if points is None:
        points, mask = torch.zeros(b, 0, 3), torch.zeros(b, 0, dtype=torch.bool)
    else:
        mask = torch.zeros(points.shape[:2], dtype=torch.bool)
        mask[1, -1] = True  # the second query has one point fewer (padding)
    stage = FindStage(
        img_ids=torch.tensor([0, 1]), text_ids=torch.tensor([0, 0]),
        input_boxes=torch.zeros(0, b, 4), input_boxes_mask=torch.ones(b, 0, dtype=torch.bool),
        input_boxes_label=torch.zeros(0, b, dtype=torch.long),
        input_points=points, input_points_mask=mask,
    )
    return BatchedDatapoint(img_batch=torch.zeros(b, 3, 8, 8), find_text_batch=["coronary artery"],
                            find_inputs=[stage], find_targets=[None], find_metadatas=[None])


def _model_capturing_prompts(cls):
    """A ``cls`` instance whose backbone and grounding are stubs; records the geometric prompt."""
    model = object.__new__(cls)
    torch.nn.Module.__init__(model)
    model._device = torch.device("cpu")
    model.num_interactive_steps_val = 0
    model.backbone = SimpleNamespace(forward_image=lambda img: {}, forward_text=lambda text, device=None: {})
    captured = []
    model.forward_grounding = lambda backbone_out, find_input, find_target, geometric_prompt: captured.append(geometric_prompt) or {}
    return model, captured


POINTS = torch.tensor([[[0.2, 0.3, 1.0], [0.5, 0.5, 1.0], [0.9, 0.1, 0.0]],
                       [[0.4, 0.6, 1.0], [0.7, 0.2, 1.0], [0.0, 0.0, 0.0]]])


def test_sam3_forward_drops_points(capsys):
    model, captured = _model_capturing_prompts(Sam3Image)
    model.forward(_batch(POINTS))
    assert "Point prompts are ignored" in capsys.readouterr().out
    prompt = captured[0]
    assert prompt.point_embeddings is None or prompt.point_embeddings.numel() == 0


def test_points_reach_the_geometry_encoder(capsys):
    model, captured = _model_capturing_prompts(Sam3ImageWithPoints)
    model.forward(_batch(POINTS))
    assert "ignored" not in capsys.readouterr().out
    prompt = captured[0]
    assert prompt.point_embeddings.shape == (3, 2, 2)  # (N, B, xy), sequence first
    assert torch.equal(prompt.point_embeddings[:, 0], POINTS[0, :, :2])
    assert prompt.point_labels[:, 0].tolist() == [1, 1, 0]  # positive, positive, negative
    assert prompt.point_mask.tolist() == [[False, False, False], [False, False, True]]


def test_geometry_encoder_encodes_the_points():
    """SAM3's real geometry encoder: each valid point becomes one prompt token (plus CLS)."""
    from sam3 import model_builder as mb
    from sam3.model.geometry_encoders import Prompt

    torch.manual_seed(0)
    geo = mb._create_geometry_encoder().eval()
    h = w = 6
    feats, pos = torch.randn(h * w, 2, 256), torch.randn(h * w, 2, 256)
    batch = _batch(POINTS)
    base = dict(box_embeddings=batch.find_inputs[0].input_boxes, box_mask=batch.find_inputs[0].input_boxes_mask,
                box_labels=batch.find_inputs[0].input_boxes_label)
    from angioexp.backends.sam3.cpu import cpu_shims

    with torch.no_grad(), cpu_shims():  # _encode_boxes pins memory even for zero boxes
        _, mask_without = geo(Prompt(**base), [feats], [(h, w)], [pos])
        embeds, mask_with = geo(Prompt(**base, **Sam3ImageWithPoints.point_prompt_kwargs(batch.find_inputs[0])),
                                [feats], [(h, w)], [pos])
    assert (~mask_without).sum(1).tolist() == [1, 1]  # CLS only: SAM3's forward gives it nothing else
    assert (~mask_with).sum(1).tolist() == [4, 3]  # 3 and 2 points + CLS
    assert torch.isfinite(embeds).all()


# --- matcher --------------------------------------------------------------------------------------


def _stub_components():
    transformer = torch.nn.Module()
    transformer.d_model = 256
    transformer.decoder = SimpleNamespace(num_queries=4, num_o2m_queries=4, dac=True)
    return {"backbone": torch.nn.Module(), "transformer": transformer, "input_geometry_encoder": torch.nn.Identity(),
            "segmentation_head": None, "dot_prod_scoring": torch.nn.Identity()}


CONFIGURED = {"focal": True, "cost_class": 1.0, "cost_bbox": 3.0, "cost_giou": 4.0, "alpha": 0.3, "gamma": 1.5}


def test_sam3_builder_ignores_the_configured_matcher():
    from sam3 import model_builder as mb

    c = _stub_components()
    model = mb._create_sam3_model(c["backbone"], c["transformer"], c["input_geometry_encoder"], None,
                                  c["dot_prod_scoring"], None, False)
    m = model.matcher  # whatever scratch.matcher says, the one-to-one matcher is SAM3's 2/5/2
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (2.0, 5.0, 2.0)
    assert (m.cost_class, m.cost_bbox, m.cost_giou) != (CONFIGURED["cost_class"], CONFIGURED["cost_bbox"], CONFIGURED["cost_giou"])


def test_configured_matcher_drives_one_to_one_matching():
    model = assemble_model(_stub_components(), matcher=CONFIGURED)
    assert isinstance(model, Sam3ImageWithPoints)
    m = model.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.alpha, m.gamma) == (1.0, 3.0, 4.0, 0.3, 1.5)
    # and it is the matcher the model uses for the loss's indices
    out = {"pred_logits": torch.randn(1, 4, 1), "pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.25}
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    out["pred_boxes_xyxy"] = box_cxcywh_to_xyxy(out["pred_boxes"])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    targets = {"boxes": boxes, "boxes_xyxy": box_cxcywh_to_xyxy(boxes), "num_boxes": torch.tensor([1]),
               "boxes_padded": boxes[None], "is_exhaustive": torch.tensor([True])}
    with mock.patch.object(type(m), "forward", wraps=m.forward) as called:
        model._compute_matching(out, targets)
    assert called.called and "indices" in out


def test_nan_predictions_in_the_models_matching_are_a_named_error():
    """SAM3's own _compute_matching (inside model.forward) with NaN logits or boxes: the model's
    matcher raises NonFiniteMatchCost, which GuardedTrainer counts as a bad step, not scipy's
    ValueError, which would end the run."""
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    from angioexp.backends.sam3.matcher import NonFiniteMatchCost

    model = assemble_model(_stub_components(), matcher=CONFIGURED)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    targets = {"boxes": boxes, "boxes_xyxy": box_cxcywh_to_xyxy(boxes), "num_boxes": torch.tensor([1]),
               "boxes_padded": boxes[None], "is_exhaustive": torch.tensor([True])}
    for poison in ("pred_logits", "pred_boxes"):
        out = {"pred_logits": torch.randn(1, 4, 1), "pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.25}
        out[poison][0, 2] = math.nan
        out["pred_boxes_xyxy"] = box_cxcywh_to_xyxy(out["pred_boxes"])
        with pytest.raises(NonFiniteMatchCost, match=poison):
            model._compute_matching(out, targets)


# --- resolution -----------------------------------------------------------------------------------


def _tiny_vit(img_size: int):
    from sam3.model.vitdet import ViT

    torch.manual_seed(0)
    return ViT(img_size=img_size, pretrain_img_size=336, patch_size=14, embed_dim=32, depth=2, num_heads=2,
               mlp_ratio=2.0, global_att_blocks=(1,), rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
               window_size=24, pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True,
               bias_patch_embed=False, use_act_checkpoint=False).eval()


def test_sam3_vit_fails_off_its_build_resolution():
    vit = _tiny_vit(1008)
    with pytest.raises(AssertionError), torch.no_grad():
        vit(torch.zeros(1, 3, 336, 336))


def test_rope_rebuilt_for_336():
    vit = _tiny_vit(1008)
    assert resize_vit_rope(vit, 336) == 1  # only the global-attention block depends on the size
    with torch.no_grad():
        (features,) = vit(torch.zeros(1, 3, 336, 336))
    assert features.shape == (1, 32, 24, 24)
    # the same tables a ViT built for 336 computes
    assert torch.allclose(vit.blocks[1].attn.freqs_cis, _tiny_vit(336).blocks[1].attn.freqs_cis)


def test_1008_weights_load_into_a_336_model():
    from angioexp.backends.sam3.weights import load_sam3_weights

    native, small = _tiny_vit(1008), _tiny_vit(1008)
    resize_vit_rope(small, 336)
    with pytest.raises(RuntimeError):  # plain loading: freqs_cis shapes differ
        small.load_state_dict(native.state_dict())
    report = load_sam3_weights(small, "tiny-1008", state=native.state_dict(), min_loaded_fraction=0.9)
    assert report.shape_mismatched == [] and len(report.skipped_by_rule) == 2  # both blocks' freqs_cis
    assert all(torch.equal(small.state_dict()[k], native.state_dict()[k]) for k in report.loaded)


@pytest.mark.parametrize("resolution", [336, 672, 1008])
def test_multiples_of_336_accepted(resolution):
    check_resolution(resolution)


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_other_resolutions_rejected(resolution):
    with pytest.raises(ConfigError, match="scratch.resolution.*multiple of 336"):
        check_resolution(resolution)


# --- text encoder ------------------------------------------------------------------------------


def _nan_empty(*size, **kwargs):
    """torch.empty whose 'uninitialised memory' happens to hold NaN."""
    shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    return torch.full(tuple(shape), math.nan, dtype=kwargs.get("dtype"), device=kwargs.get("device"))


def _tiny_text_encoder():
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer

    from angioexp.backends.sam3.weights import find_bpe_vocab

    torch.manual_seed(0)
    with mock.patch.object(torch, "empty", _nan_empty):
        return VETextEncoder(d_model=16, tokenizer=SimpleTokenizer(bpe_path=str(find_bpe_vocab())),
                             width=32, heads=2, layers=1, context_length=8).eval()


def test_sam3_text_encoder_is_uninitialised():
    encoder = _tiny_text_encoder()
    with torch.no_grad():
        _, memory, _ = encoder(["coronary artery"], device=torch.device("cpu"))
    assert not torch.isfinite(memory).all()  # torch.empty garbage flows into the text features


def test_text_encoder_initialised():
    encoder = _tiny_text_encoder()
    init_text_encoder(encoder)
    pos, proj = encoder.encoder.positional_embedding, encoder.encoder.text_projection
    assert torch.isfinite(pos).all() and abs(pos.std().item() - 0.01) < 0.003
    assert torch.isfinite(proj).all() and abs(proj.std().item() - 32**-0.5) < 0.05
    with torch.no_grad():
        _, memory, _ = encoder(["coronary artery"], device=torch.device("cpu"))
    assert torch.isfinite(memory).all()
