"""Dense segment identity: one per-pixel softmax over {background, every prompt of an image}.

The per-prompt semantic head answers "is this pixel the prompted segment?" for one prompt at a
time, so nothing makes "mid LAD" and "distal LAD" compete for a pixel. Here every prompt's text
embedding becomes a classifier, and all of them (plus a learned background class) are scored on
every pixel in one pass:

    logit_c(p) = f_c · [pixel_embed(p), xy(p)]  +  up(r_c · norm(memory + view)  ⊕_s  g_c,s · level_s)(p)  +  b_c
                 fine: thin vessel shape            coarse → finer: where in the tree segment c lies

where f_c and r_c are MLPs of prompt c's pooled text embedding (background: a learned
embedding in the same space), ``memory`` the image's global-context tokens (stride 16),
``view`` the C-arm view embedding (so LAO / RAO, cranial / caudal reach the per-pixel decision)
and ``xy`` sine features of the pixel's image coordinates. ``level_s`` are the pixel decoder's
top-down maps at strides 8, 4, … (``model.identity_levels`` of them), each scored by a
class-specific projection g_c,s and added coarse to fine (⊕: upsample, add), so that two
segments closer together than a stride-16 cell (a diagonal beside its parent, a proximal → mid
boundary) can get different names before the 16-channel pixel embedding has to tell them
apart. Their projections start at zero. The prompt interface stays SAM3's:
any subset of prompts can be asked; the softmax runs over the ones asked.

Presence: logit per (image, prompt) from the pooled image memory and the prompt embedding —
the probability that the segment is in the frame at all, the score of its mask. With
``presence_evidence`` it also reads what the softmax above says of that segment in this frame:
log(1 + 1000 × its expected area fraction) and its peak probability, read on every other pixel
in each direction. A mean-pooled memory hardly tells whether a small branch is there; the
pixels named after it do. The evidence is detached, so the presence loss calibrates the maps'
verdict without pulling the maps toward it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from angioexp.model.heads import MLP
from angioexp.model.prompt_encoder import grid_positions, sine_embed

COORD_DIM = 8  # sine features of (x, y) appended to the per-pixel embedding


class SegmentIdentityHead(nn.Module):
    """pixel_embed (I, M, H, W), memory (I, L, D) at (h, w), views (I,), prompts (C, D),
    levels [(I, level_channels[s], h_s, w_s)] coarsest first
    → logits (I, 1 + C, H, W) with class 0 = background, presence_logits (I, C)."""

    EVIDENCE = 2  # per (image, prompt): log(1 + 1000 × expected area fraction), peak probability
    EVIDENCE_STRIDE = 2  # read on every other pixel in each direction

    def __init__(self, d_model: int, mask_dim: int, num_views: int, level_channels: tuple[int, ...] = (),
                 presence_evidence: bool = False):
        super().__init__()
        self.levels = nn.ModuleList(MLP(d_model, d_model, c, 2) for c in level_channels)
        for level in self.levels:  # the levels' terms start at zero and grow from the first step
            nn.init.zeros_(level.layers[-1].weight)
            nn.init.zeros_(level.layers[-1].bias)
        self.background = nn.Parameter(torch.zeros(d_model))
        self.fine = MLP(d_model, d_model, mask_dim + COORD_DIM + 1, 2)  # last entry: the class bias
        self.region = MLP(d_model, d_model, d_model, 2)
        self.view_embed = nn.Embedding(num_views + 1, d_model)  # last row: unknown view
        self.memory_norm = nn.LayerNorm(d_model)
        self.presence_evidence = presence_evidence
        self.presence = MLP(2 * d_model + (self.EVIDENCE if presence_evidence else 0), d_model, 1, 2)
        nn.init.normal_(self.background, std=0.02)
        nn.init.zeros_(self.view_embed.weight)

    def forward(self, pixel_embed: torch.Tensor, memory: torch.Tensor, memory_hw: tuple[int, int], views: torch.Tensor,
                prompts: torch.Tensor, levels: list[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        if len(levels) != len(self.levels):
            raise ValueError(f"the head was built for {len(self.levels)} decoder levels, got {len(levels)}")
        i, _, h, w = pixel_embed.shape
        classes = torch.cat([self.background[None], prompts], dim=0)  # (1 + C, D)
        fine = self.fine(classes)  # (1 + C, M + COORD_DIM + 1)
        coords = sine_embed(grid_positions(h, w, device=pixel_embed.device), COORD_DIM)  # (H*W, COORD_DIM)
        coords = coords.t().reshape(1, COORD_DIM, h, w).expand(i, -1, -1, -1).to(pixel_embed.dtype)
        features = torch.cat([pixel_embed, coords], dim=1)  # (I, M + COORD_DIM, H, W)
        logits = torch.einsum("kf,ifhw->ikhw", fine[:, :-1], features) + fine[:, -1].view(1, -1, 1, 1)
        context = self.memory_norm(memory + self.view_embed(views)[:, None])  # (I, L, D)
        coarse = torch.einsum("kd,ild->ikl", self.region(classes), context).reshape(i, -1, *memory_hw)
        # Coarse to fine, each map upsampled onto the next: one full-resolution upsampling in all,
        # whose backward pass is the costly part on a CPU.
        for project, level in zip(self.levels, levels):
            coarse = F.interpolate(coarse, size=level.shape[-2:], mode="bilinear", align_corners=False)
            coarse = coarse + torch.einsum("kc,ichw->ikhw", project(classes), level)
        logits = logits + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        pooled = context.mean(dim=1)  # (I, D)
        presence_inputs = [pooled[:, None].expand(-1, prompts.shape[0], -1), prompts[None].expand(i, -1, -1)]
        if self.presence_evidence:
            presence_inputs.append(self.evidence(logits).to(pooled.dtype))
        return logits, self.presence(torch.cat(presence_inputs, dim=-1))[..., 0]

    @classmethod
    @torch.no_grad()
    def evidence(cls, logits: torch.Tensor) -> torch.Tensor:
        """(I, 1 + C, H, W) identity logits → (I, C, EVIDENCE): what each prompt's pixels say."""
        # Every other pixel in each direction: the same statistics at a quarter of the softmax's cost
        probs = logits[..., :: cls.EVIDENCE_STRIDE, :: cls.EVIDENCE_STRIDE].float().softmax(dim=1)
        area = torch.log1p(1000.0 * probs.mean(dim=(2, 3))[:, 1:])
        return torch.stack([area, probs.amax(dim=(2, 3))[:, 1:]], dim=-1)
