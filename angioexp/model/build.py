"""``build_model(cfg) -> CoreModel`` from ``cfg.model`` (and the fixed prompt vocabulary)."""

from __future__ import annotations

import torch

from angioexp.model.core import CoreModel
from angioexp.model.prompt_encoder import PromptTokenizer
from angioexp.model.view import num_view_classes


def resolved_num_views(cfg) -> int:
    return cfg.model.num_views or num_view_classes()


def build_model(cfg) -> CoreModel:
    """A freshly initialised core model (deterministic for a given ``cfg.seed``), channels-last."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = CoreModel(
            vocab_size=len(PromptTokenizer()),
            num_views=resolved_num_views(cfg),
            encoder_channels=tuple(m.encoder_channels),
            stem_channels=m.stem_channels,
            d_model=m.d_model,
            num_heads=m.num_heads,
            decoder_layers=m.decoder_layers,
            num_queries=m.num_queries,
            mask_dim=m.mask_dim,
            use_view_conditioning=m.use_view_conditioning,
            mask_guided_boxes=m.mask_guided_boxes,
            semantic_mask_base=m.semantic_mask_base,
            context_layers=m.context_layers,
            region_masks=m.region_masks,
            identity_head=m.identity_head,
            identity_levels=m.identity_levels,
            presence_evidence=m.presence_evidence,
        )
    # channels-last lets oneDNN run the small convolutions ~2× faster on CPU (measured).
    return model.to(memory_format=torch.channels_last)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per SAM3 LR group and in total."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        group = name.split(".", 1)[0]
        counts[group] = counts.get(group, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts
