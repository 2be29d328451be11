"""Activation checkpointing in SAM3's image model: one fix and one switch.

**The fix: the text encoder's recompute uses the attention kernels of its forward.**
``SAM3VLBackbone._forward_text_no_ack_ckpt`` runs the text encoder inside
``sdpa_kernel([MATH, EFFICIENT_ATTENTION, FLASH_ATTENTION])``, and the text ``Transformer``
checkpoints each ``ResidualAttentionBlock`` (non-reentrant ``torch.utils.checkpoint``). The
recompute runs in the backward pass, outside that ``with`` block, where every SDPA backend is
allowed again. ``torch.utils.checkpoint`` restores autocast and RNG state for the recompute, not
the SDPA backend flags, so the recompute can pick a different attention kernel, whose saved
tensors differ, and the first backward fails with ``CheckpointError``. Seen on an H100 (torch
2.11, bf16 autocast, text batch 1 × 16 heads × 32 tokens), the saved tensors show which: the
forward ran memory-efficient attention (bias expanded to [1,16,32,32], log-sum-exp [1,16,32],
philox seed/offset on the CPU), the recompute cuDNN attention, which SAM3's list leaves out
(bias [1,1,32,32], log-sum-exp [1,16,32,1], seed/offset on the GPU). CPUs have only the math
and flash kernels and SAM3's list allows both, so the bug stays hidden there. :func:`pin_text_attention_kernels` makes every text block enter SAM3's
backend list itself, so forward and recompute choose from the same kernels.

**The switch: ``sam3.activation_checkpointing``.** SAM3 builds every component with activation
checkpointing on (memory for compute). :func:`set_activation_checkpointing` turns it off or on
for the whole model: the ViT blocks, text blocks, geometry encoder and segmentation head through
SAM3's own flags; the fusion encoder and decoder assert that their flag is on whenever they
train, so their layers are opted out through SAM3's ``activation_ckpt_wrapper`` instead
(:func:`_install_opt_out`).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# The backends SAM3VLBackbone._forward_text_no_ack_ckpt allows around the text encoder (sam3 0.1.4).
TEXT_ENCODER_SDPA_BACKENDS = (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION)

# A module carrying this attribute (True) runs without activation checkpointing when SAM3's
# encoder or decoder wraps it with activation_ckpt_wrapper.
OPT_OUT_ATTR = "angioexp_no_act_ckpt"


def _residual_attention_block_class():
    from sam3.model.text_encoder_ve import ResidualAttentionBlock

    return ResidualAttentionBlock


class PinnedKernelAttentionBlock(_residual_attention_block_class()):  # type: ignore[misc]
    """SAM3's text ``ResidualAttentionBlock`` that always runs under SAM3's SDPA backend list.

    Same parameters, same state-dict keys, same maths; only the backend choice no longer depends
    on the caller's context, so a checkpoint recompute in the backward pass matches the forward.
    Input/output as SAM3's block: q_x (B, L, width) → (B, L, width); attn_mask (L, L) additive.
    """

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        with sdpa_kernel(list(TEXT_ENCODER_SDPA_BACKENDS)):
            return super().forward(q_x, k_x, v_x, attn_mask)


def pin_text_attention_kernels(text_encoder: torch.nn.Module) -> int:
    """Turn every text ``ResidualAttentionBlock`` under ``text_encoder`` into a
    :class:`PinnedKernelAttentionBlock` (in place). Returns the number of blocks changed."""
    block_class = _residual_attention_block_class()
    changed = 0
    for module in text_encoder.modules():
        if type(module) is block_class:
            module.__class__ = PinnedKernelAttentionBlock
            changed += 1
    return changed


# --- the switch -----------------------------------------------------------------------------------


def _honouring_opt_out(sam3_wrapper):
    """SAM3's ``activation_ckpt_wrapper`` that skips the checkpoint for opted-out modules."""

    @functools.wraps(sam3_wrapper)
    def activation_ckpt_wrapper(module):
        wrapped = sam3_wrapper(module)
        owner = getattr(module, "__self__", module)  # bound methods are wrapped too
        if not getattr(owner, OPT_OUT_ATTR, False):
            return wrapped

        @functools.wraps(wrapped)
        def without_checkpoint(*args, act_ckpt_enable: bool = True, **kwargs):
            return wrapped(*args, act_ckpt_enable=False, **kwargs)

        return without_checkpoint

    activation_ckpt_wrapper.angioexp_opt_out = True  # type: ignore[attr-defined]
    return activation_ckpt_wrapper


def _install_opt_out() -> None:
    """Make the encoder's and decoder's ``activation_ckpt_wrapper`` honour :data:`OPT_OUT_ATTR`.

    Process-wide and idempotent; behaviour is unchanged for every module without the attribute.
    """
    from sam3.model import decoder, encoder

    for sam3_module in (encoder, decoder):
        current = sam3_module.activation_ckpt_wrapper
        if not getattr(current, "angioexp_opt_out", False):
            sam3_module.activation_ckpt_wrapper = _honouring_opt_out(current)


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> list[str]:
    """Switch activation checkpointing of a SAM3 image model on or off (in place).

    Returns the names of the modules whose switch was set (a model with none raises: SAM3's
    layout changed and the setting would silently do nothing).
    """
    from sam3.model.decoder import TransformerDecoder
    from sam3.model.encoder import TransformerEncoder
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import SegmentationHead
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import Transformer as TextTransformerLayers
    from sam3.model.vitdet import ViT

    switched = []
    for name, module in model.named_modules():
        if isinstance(module, ViT):
            module.use_act_checkpoint = enabled
        elif isinstance(module, TextTransformerLayers):
            module.grad_checkpointing = enabled
        elif isinstance(module, SequenceGeometryEncoder):
            module.use_act_ckpt = enabled
        elif isinstance(module, SegmentationHead):
            module.act_ckpt = enabled  # the pixel decoder
        elif isinstance(module, Sam3Image):
            module.use_act_checkpoint_seg_head = enabled  # the whole segmentation head
        elif isinstance(module, (TransformerEncoder, TransformerDecoder)):
            # Their flag must stay on in training (SAM3 asserts it); opt their layers out instead.
            if not enabled:
                _install_opt_out()
            for child in module.modules():
                setattr(child, OPT_OUT_ATTR, not enabled)
        else:
            continue
        switched.append(name or type(module).__name__)
    if not switched:
        raise ValueError(f"no SAM3 activation-checkpointing switch found in {type(model).__name__}")
    log.info("SAM3 activation checkpointing %s: %s", "on" if enabled else "off", ", ".join(switched))
    return switched
