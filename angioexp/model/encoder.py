"""The image encoder (SAM3's ``vision_backbone``): a small residual CNN trained from scratch.

No pretrained weights exist for X-ray angiograms on this machine, so the encoder is a plain
multi-scale CNN whose cost fits 2 CPU cores: one stage per stride 2, 4, 8, 16, each a strided
3×3 conv followed by a residual block. A separate stride-1 ``stem`` keeps full-resolution
edges for the pixel decoder — vessels are 2–8 px wide, so the finest skip matters most.

Stages are numbered (``stages.0`` … ``stages.{S-1}``) so that SAM3's layer-wise LR decay
(``scratch.lrd_vision_backbone``) can be applied per stage: see :meth:`layer_id`.
"""

from __future__ import annotations

import torch
from torch import nn


def norm2d(channels: int) -> nn.Module:
    """BatchNorm: measured 1.3–2× faster per training step than GroupNorm on 2 CPU cores (its
    backward dominated the step). A batch of 8 crops of 256² still has ~0.5 M pixels per
    channel, so batch statistics are stable; the loop keeps running statistics clean on
    skipped (non-finite) steps and identical across DDP ranks."""
    return nn.BatchNorm2d(channels)


class Conv1x1(nn.Module):
    """1×1 convolution as a matmul over the channels-last layout: (N, C_in, H, W) → (N, C_out, H, W).

    oneDNN does not take 1×1 convolutions with bias on this path (they fell back to the slow
    reference kernel: 6 % of a training step); a Linear on the NHWC view is the same maths.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.permute(0, 2, 3, 1))  # NHWC view of a channels-last tensor: no copy
        return y.permute(0, 3, 1, 2)


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            norm2d(c_out),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """x + conv(conv(x)); (N, C, H, W) → (N, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm2d(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class EncoderStage(nn.Module):
    """Halve the resolution, then refine: (N, C_in, H, W) → (N, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int, blocks: int = 1):
        super().__init__()
        self.down = ConvNormAct(c_in, c_out, stride=2)
        self.blocks = nn.Sequential(*[ResidualBlock(c_out) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x))


class ImageEncoder(nn.Module):
    """Grayscale image → multi-scale features.

    Input:  images (I, 1, H, W) float, normalised (zero mean / unit variance per dataset);
            H and W divisible by 16.
    Output: list of S+1 feature maps, finest first:
            [stem (I, C_stem, H, W), stage0 (I, C0, H/2, W/2), …, stage{S-1} (I, C_{S-1}, H/2^S, W/2^S)]
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 96), stem_channels: int = 8, blocks_per_stage: int = 1):
        super().__init__()
        self.channels = tuple(channels)
        self.stem_channels = stem_channels
        self.stem = ConvNormAct(1, stem_channels)
        stages = []
        c_prev = stem_channels
        for c in channels:
            stages.append(EncoderStage(c_prev, c, blocks_per_stage))
            c_prev = c
        self.stages = nn.ModuleList(stages)

    @property
    def stride(self) -> int:
        return 2 ** len(self.stages)

    def num_layers(self) -> int:
        """Layers for layer-wise LR decay: the stem is layer 0, stage k is layer k + 1."""
        return len(self.stages) + 1

    @staticmethod
    def layer_id(name: str) -> int | None:
        """Parameter name (relative to the encoder) → its layer for LR decay; None = no decay."""
        if name.startswith("stem."):
            return 0
        if name.startswith("stages."):
            return int(name.split(".")[1]) + 1
        return None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(images)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats
