"""Exponential moving average of the weights (Polyak averaging), evaluated instead of the raw ones.

Why: on pseudo-labels the raw weights wander from step to step — the default Stage 1 run scored
val Dice 0.846 at step 400 and 0.827 at step 600 — and the checkpoint a run keeps is whichever
evaluation happened to land on a good step. The average over the last few dozen steps is a
smoother, usually better model at no training cost (one extra copy of the weights).

Built on :class:`torch.optim.swa_utils.AveragedModel`; the decay ramps up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates so the random initial weights do not
linger in the average of a short run.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def _ramped_ema(decay: float):
    """``multi_avg_fn`` for AveragedModel: in-place EMA with the warm-up ramp above."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): follow the live model
            for a, c in zip(averaged, current):
                a.copy_(c)

    return update


class WeightAverage:
    """The averaged copy of ``model`` (parameters and BatchNorm statistics).

    ``module``: the averaged network, always in eval mode — evaluate and save this one.
    ``update(model)`` after every optimizer step that was taken (skipped NaN steps are not
    averaged in).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self._averaged = AveragedModel(model, multi_avg_fn=_ramped_ema(decay), use_buffers=True)
        self._averaged.eval().requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        return self._averaged.module

    @property
    def updates(self) -> int:
        return int(self._averaged.n_averaged)

    def update(self, model: torch.nn.Module) -> None:
        self._averaged.update_parameters(model)
        self._averaged.eval()

    def restore(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Resume: the averaged weights and how many updates they hold."""
        self.module.load_state_dict(weights)
        self._averaged.n_averaged.fill_(int(updates))
