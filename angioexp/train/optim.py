"""SAM3's optimizer set-up for the core model: three LR groups, layer-wise decay, no weight
decay on biases and norms, AdamW.

    transformer.*        scratch.lr_transformer
    vision_backbone.*    scratch.lr_vision_backbone × lrd^(L − layer)   (SAM3's layer_decay_param_modifier:
                         the deepest stage gets lrd¹, the stem lrd^L; parameters outside the stages
                         get 1)
    language_backbone.*  scratch.lr_language_backbone

Weight decay ``scratch.wd`` except for biases, norm weights and embeddings' position tables
(SAM3: ``*bias*`` and ``torch.nn.LayerNorm``; we add GroupNorm, which our CNN uses instead).
Every param group carries ``base_lr``; the loop sets ``lr = base_lr · schedule · guard factor``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

GROUPS = ("transformer", "vision_backbone", "language_backbone")
_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, _NO_DECAY_MODULES) or param_name.endswith("bias"):
                names.add(full)
    return names


def param_groups(model: nn.Module, scratch) -> list[dict]:
    """Parameter groups with ``base_lr``, ``weight_decay`` and a ``name`` (for logging)."""
    base = {
        "transformer": scratch.lr_transformer,
        "vision_backbone": scratch.lr_vision_backbone,
        "language_backbone": scratch.lr_language_backbone,
    }
    encoder = model.vision_backbone
    num_layers = encoder.num_layers()
    no_decay = _no_decay_names(model)
    buckets: dict[tuple[str, float, float], list] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = name.split(".", 1)[0]
        if group not in base:
            raise ValueError(f"parameter {name!r} is outside SAM3's three groups {GROUPS}")
        scale = 1.0
        if group == "vision_backbone":
            layer = encoder.layer_id(name.split(".", 1)[1])
            if layer is not None:
                scale = scratch.lrd_vision_backbone ** (num_layers - layer)
        wd = 0.0 if name in no_decay else scratch.wd
        buckets[(group, scale, wd)].append(param)
    groups = []
    for (group, scale, wd), params in sorted(buckets.items(), key=lambda kv: (GROUPS.index(kv[0][0]), -kv[0][1], kv[0][2])):
        lr = base[group] * scale
        groups.append({"params": params, "name": group, "base_lr": lr, "lr": lr, "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.scratch), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
