"""Pixel decoder: a U-Net-style top-down path that keeps thin structures.

SAM3 predicts masks at 1/4 of its input, which blurs 2–8 px vessels. Here the top-down path
runs back to full input resolution, fusing every encoder skip, and ends in a per-pixel
embedding that the query heads dot with (MaskFormer). Channels shrink as resolution grows so
the full-resolution layers stay cheap on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from angioexp.model.encoder import Conv1x1, ConvNormAct


class FuseUp(nn.Module):
    """Upsample the coarser map ×2, concatenate the skip, mix with a 3×3 conv.

    (N, C_coarse, h, w), (N, C_skip, 2h, 2w) → (N, C_out, 2h, 2w)
    """

    def __init__(self, c_coarse: int, c_skip: int, c_out: int):
        super().__init__()
        self.reduce = Conv1x1(c_coarse, c_out)
        self.mix = ConvNormAct(c_out + c_skip, c_out)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(coarse), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.mix(torch.cat([up, skip], dim=1))


class PixelDecoder(nn.Module):
    """Multi-scale encoder features → per-pixel mask embeddings at full resolution.

    Input:  feats, finest first: [(I, C_stem, H, W), (I, C0, H/2, W/2), …, (I, C_S-1, H/2^S, W/2^S)]
    Output: pixel_embed (I, mask_dim, H, W), and the first ``levels`` maps of the top-down path,
            coarsest first: [(I, level_channels[0], H/2^(S-1), W/2^(S-1)), …]
    """

    def __init__(self, encoder_channels: tuple[int, ...], stem_channels: int, mask_dim: int = 16):
        super().__init__()
        skips = (stem_channels, *encoder_channels[:-1])  # finest … second coarsest
        # The output width at each level: the skip's width, but never below mask_dim.
        outs = [max(c, mask_dim) for c in skips]
        ups = []
        c_coarse = encoder_channels[-1]
        for c_skip, c_out in zip(reversed(skips), reversed(outs)):
            ups.append(FuseUp(c_coarse, c_skip, c_out))
            c_coarse = c_out
        self.ups = nn.ModuleList(ups)  # coarsest first
        self.level_channels = tuple(reversed(outs))  # the width of each top-down map, coarsest first
        self.embed = Conv1x1(c_coarse, mask_dim)
        self.mask_dim = mask_dim

    def forward(self, feats: list[torch.Tensor], levels: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = feats[-1]
        path = []
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = up(x, skip)
            path.append(x)
        return self.embed(x), path[:levels]
