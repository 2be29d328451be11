"""angioexp.backends.sam3.act_ckpt: SAM3's activation-checkpoint recompute of the text encoder
matches its forward, and ``sam3.activation_checkpointing`` switches checkpointing off model-wide.

On an H100 the text encoder's forward (inside SAM3's ``sdpa_kernel`` list) and its backward
recompute (outside it, where cuDNN attention comes first) chose different attention kernels and
the first backward raised ``CheckpointError``. A CPU has no cuDNN kernel, so these tests create
the same situation with the kernels a CPU has: the forward runs inside SAM3's own list (CPU
flash attention), the backward under the math kernel only.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)
import torch  # noqa: E402
import torch.utils.checkpoint as torch_checkpoint  # noqa: E402
from sam3.model import text_encoder_ve  # noqa: E402
from sam3.model.vl_combiner import SAM3VLBackbone  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from angioexp.backends.sam3 import gpu_check  # noqa: E402
from angioexp.backends.sam3.act_ckpt import (  # noqa: E402
    TEXT_ENCODER_SDPA_BACKENDS,
    PinnedKernelAttentionBlock,
    pin_text_attention_kernels,
    set_activation_checkpointing,
)
from angioexp.backends.sam3.cpu import cpu_shims  # noqa: E402
from angioexp.backends.sam3.model import DEFAULT_MATCHER, assemble_model, init_text_encoder, resize_vit_rope  # noqa: E402
from angioexp.backends.sam3.weights import find_bpe_vocab  # noqa: E402

pytestmark = pytest.mark.sam3

CAPTIONS = ["coronary artery", "left main coronary artery"]


def _tiny_text_encoder(d_model: int = 16, checkpointing: bool = True):
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer

    torch.manual_seed(0)
    encoder = VETextEncoder(d_model=d_model, tokenizer=SimpleTokenizer(bpe_path=str(find_bpe_vocab())),
                            width=32, heads=2, layers=2, context_length=8, use_act_checkpoint=checkpointing)
    init_text_encoder(encoder)
    return encoder


def _text_backbone(pinned: bool, checkpointing: bool = True) -> SAM3VLBackbone:
    text = _tiny_text_encoder(checkpointing=checkpointing)
    if pinned:
        assert pin_text_attention_kernels(text) == 2
    return SAM3VLBackbone(visual=torch.nn.Identity(), text=text).train()


def _forward_then_backward_elsewhere(backbone: SAM3VLBackbone) -> dict[str, torch.Tensor]:
    """SAM3's forward_text (inside its own sdpa_kernel list); the backward — where checkpointed
    blocks are recomputed — under the math kernel only. Returns the parameter gradients."""
    out = backbone.forward_text(CAPTIONS, device=torch.device("cpu"))
    with sdpa_kernel([SDPBackend.MATH]):
        out["language_features"].square().sum().backward()
    return {name: p.grad.clone() for name, p in backbone.named_parameters() if p.grad is not None}


@pytest.fixture
def fused_cpu_attention():
    """The mismatch needs SAM3's list to pick a kernel other than math (CPU flash attention)."""
    q = torch.randn(2, 2, 8, 16, requires_grad=True)
    mask = torch.zeros(8, 8)
    with sdpa_kernel(list(TEXT_ENCODER_SDPA_BACKENDS)):
        choice = torch._fused_sdp_choice(q, q, q, mask)
    if choice == int(SDPBackend.MATH):
        pytest.skip("this CPU runs SAM3's text attention with the math kernel: nothing to mismatch")


@pytest.mark.usefixtures("fused_cpu_attention")
def test_sam3_text_encoder_recompute_picks_another_kernel():
    """SAM3 as shipped: the recompute leaves SAM3's sdpa_kernel block and its saved tensors differ."""
    with pytest.raises(torch_checkpoint.CheckpointError, match="(?i)recomput"):  # count or metadata differ
        _forward_then_backward_elsewhere(_text_backbone(pinned=False))


@pytest.mark.usefixtures("fused_cpu_attention")
def test_pinned_blocks_recompute_with_the_forward_kernels():
    grads = _forward_then_backward_elsewhere(_text_backbone(pinned=True))
    # the same gradients as SAM3's text encoder without checkpointing (nothing recomputed)
    reference = _forward_then_backward_elsewhere(_text_backbone(pinned=False, checkpointing=False))
    assert grads.keys() == reference.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], atol=1e-6), name


def test_pinning_keeps_weights_and_state_dict():
    plain, pinned = _tiny_text_encoder(), _tiny_text_encoder()
    assert pin_text_attention_kernels(pinned) == 2
    assert pin_text_attention_kernels(pinned) == 0  # idempotent
    assert all(isinstance(b, PinnedKernelAttentionBlock) for b in pinned.encoder.transformer.resblocks)
    a, b = plain.state_dict(), pinned.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- the switch -------------------------------------------------------------------------------------


def _tiny_sam3_model():
    """SAM3's real image model from its own builders, with a 2-block ViT and a 2-layer text
    encoder (the fusion encoder, decoder, geometry encoder and segmentation head are full size)."""
    from sam3 import model_builder as mb
    from sam3.model.vitdet import ViT

    torch.manual_seed(0)
    with cpu_shims():  # the decoder and position encoding pre-compute caches with device="cuda"
        vit = ViT(img_size=1008, pretrain_img_size=336, patch_size=14, embed_dim=32, depth=2, num_heads=2,
                  mlp_ratio=2.0, global_att_blocks=(1,), rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
                  window_size=24, pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True,
                  bias_patch_embed=False)
        resize_vit_rope(vit, 336)
        vision = mb._create_vit_neck(mb._create_position_encoding(precompute_resolution=1008), vit)
        text = _tiny_text_encoder(d_model=256)
        pin_text_attention_kernels(text)
        components = {
            "backbone": mb._create_vl_backbone(vision, text), "transformer": mb._create_sam3_transformer(),
            "input_geometry_encoder": mb._create_geometry_encoder(),
            "segmentation_head": mb._create_segmentation_head(), "dot_prod_scoring": mb._create_dot_product_scoring(),
        }
    return assemble_model(components, DEFAULT_MATCHER).train()


def _batch():
    """One 336-px image, one text query with one positive point, one target vessel box + mask."""
    from sam3.model.data_misc import BatchedDatapoint, BatchedFindTarget, FindStage

    generator = torch.Generator().manual_seed(1)
    box = torch.tensor([[0.42, 0.48, 0.12, 0.48]])  # cx, cy, w, h
    mask = torch.zeros(1, 84, 84, dtype=torch.bool)
    mask[0, 20:60, 30:40] = True
    stage = FindStage(img_ids=torch.tensor([0]), text_ids=torch.tensor([0]),
                      input_boxes=torch.zeros(0, 1, 4), input_boxes_mask=torch.ones(1, 0, dtype=torch.bool),
                      input_boxes_label=torch.zeros(0, 1, dtype=torch.long),
                      input_points=torch.tensor([[[0.4, 0.5, 1.0]]]), input_points_mask=torch.zeros(1, 1, dtype=torch.bool))
    target = BatchedFindTarget(num_boxes=torch.tensor([1]), boxes=box, boxes_padded=box[None], repeated_boxes=box,
                               segments=mask, semantic_segments=None, is_valid_segment=torch.tensor([True]),
                               is_exhaustive=torch.tensor([True]), object_ids=torch.tensor([0]),
                               object_ids_padded=torch.tensor([[0]]))
    return BatchedDatapoint(img_batch=torch.randn(1, 3, 336, 336, generator=generator), find_text_batch=["coronary artery"],
                            find_inputs=[stage], find_targets=[target], find_metadatas=[None])


def _train_step(model) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Forward + backward of one batch; returns what was checkpointed and the gradients."""
    checkpointed = []
    real = torch_checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        checkpointed.append(type(getattr(function, "__self__", function)).__name__)
        return real(function, *args, **kwargs)

    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks in both runs
    # every SAM3 checkpoint call goes through torch.utils.checkpoint.checkpoint, the text
    # encoder's through the name it imported
    with cpu_shims(), mock.patch.object(torch_checkpoint, "checkpoint", counting), \
            mock.patch.object(text_encoder_ve, "checkpoint", counting):
        out = model(_batch())[-1]
        loss = (out["pred_logits"].sum() + out["pred_boxes"].sum() + out["pred_masks"].float().mean()
                + out["presence_logit_dec"].sum() + out["semantic_seg"].float().mean())
        loss.backward()
    return checkpointed, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_switch():  # two training steps of the full-size fusion transformer: ~15 s
    model = _tiny_sam3_model()
    switched = set_activation_checkpointing(model, False)
    assert set(switched) == {"Sam3ImageWithPoints", "backbone.vision_backbone.trunk",
                             "backbone.language_backbone.encoder.transformer", "geometry_encoder",
                             "transformer.encoder", "transformer.decoder", "segmentation_head"}
    # SAM3's encoder and decoder assert their checkpointing flag while training: still one step
    checkpointed, grads_off = _train_step(model)
    assert checkpointed == []

    set_activation_checkpointing(model, True)
    checkpointed, grads_on = _train_step(model)
    assert {"Block", "PinnedKernelAttentionBlock", "TransformerEncoderLayer", "TransformerDecoderLayer",
            "MLP", "UniversalSegmentationHead", "PixelDecoder"} <= set(checkpointed)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 400
    for name, grad in grads_on.items():  # recomputing changes memory, not maths
        assert torch.allclose(grad, grads_off[name], atol=1e-6), name


def test_switch_rejects_a_model_without_sam3_modules():
    with pytest.raises(ValueError, match="no SAM3 activation-checkpointing switch"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), False)


# --- configuration and the GPU check ---------------------------------------------------------------


def test_config_key_reaches_the_model(tmp_path):
    from angioexp.backends.sam3 import config_gen
    from angioexp.config import load_config

    coco = gpu_check.make_tiny_coco(tmp_path / "coco", n_train=1, n_val=1, size=96)
    for value in (True, False):
        cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336",
                                     f"sam3.activation_checkpointing={str(value).lower()}"])
        path = config_gen.generate(cfg, coco_dir=coco, out_dir=tmp_path / f"run_{value}", device="cpu")
        assert config_gen.compose(path).trainer.model.activation_checkpointing is value


CHECKPOINT_ERROR = ("RuntimeError: SAM3 training failed (CheckpointError: torch.utils.checkpoint: Recomputed values "
                    "for the following tensors have different metadata than during the forward pass.")
BACKWARD_ERROR = ("RuntimeError: SAM3 training failed (RuntimeError: expected scalar type BFloat16)\n"
                  '  File "torch/autograd/__init__.py", line 381, in backward')


@pytest.mark.parametrize("error, steps_done, retry", [
    (CHECKPOINT_ERROR, 0, True),
    (CHECKPOINT_ERROR, 2, True),  # a later step's recompute (e.g. another resolution) fails too
    (BACKWARD_ERROR, 0, True),
    (BACKWARD_ERROR + " CUDA out of memory", 0, False),  # more memory without checkpointing
    (BACKWARD_ERROR, 1, False),  # a backward that once passed: not the checkpointing
    ("CheckpointLoadError: 12% of tensors loaded", 0, False),  # before any training
])
def test_which_failures_are_retried(error, steps_done, retry):
    assert gpu_check.worth_retrying(error, steps_done) is retry


def test_gpu_check_retries_a_failed_first_step_without_checkpointing(tmp_path, monkeypatch):
    """The fallback and its report (the SAM3 runs themselves: test_sam3_e2e.py and the GPU)."""
    modes = []

    def first_backward_fails(device, resolution, steps, out, *, activation_checkpointing, **kwargs):
        modes.append(activation_checkpointing)
        if activation_checkpointing:
            error = RuntimeError(CHECKPOINT_ERROR)
            error.steps_done = 0
            raise error
        return {"activation_checkpointing": False, "steps": steps, "s_per_step": 1.0}

    monkeypatch.setattr(gpu_check, "check", first_backward_fails)
    report = gpu_check.check_with_fallback("cpu", 336, 2, tmp_path, probe=False)
    assert modes == [True, False]
    assert report["ok"] and report["activation_checkpointing"] is False
    first, second = report["attempts"]
    assert not first["ok"] and "CheckpointError" in first["error"] and first["steps_done"] == 0
    assert second["ok"] and second["steps"] == 2
    json.dumps(report)

    def evaluation_fails(device, resolution, steps, out, *, activation_checkpointing, **kwargs):
        modes.append(activation_checkpointing)
        error = RuntimeError("SAM3 training failed (ValueError: bad prediction file)")
        error.steps_done = steps
        raise error

    modes.clear()
    monkeypatch.setattr(gpu_check, "check", evaluation_fails)
    report = gpu_check.check_with_fallback("cpu", 336, 2, tmp_path, probe=False)
    assert modes == [True] and not report["ok"] and report["activation_checkpointing"] is None
    assert gpu_check.main(["--device", "cpu", "--no-probe", "--out", str(tmp_path / "cli")]) == 1
