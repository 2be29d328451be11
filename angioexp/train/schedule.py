"""SAM3's ``InverseSquareRootParamScheduler`` (sam3/train/optim/schedulers.py), same arithmetic.

    lr(step) = base_lr
             · min(1, step / warmup)                                   linear warm-up from 0
             · 1 / sqrt((step + timescale − warmup) / timescale)       after warm-up: 1 at step = warmup
             · min(1, (total − step) / cooldown)                       linear cool-down to 0

SAM3 calls it with ``where = step / total`` (progress through training); we pass ``total``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class InverseSquareRoot:
    warmup_steps: int
    timescale: int
    cooldown_steps: int
    total_steps: int

    def factor(self, step: int) -> float:
        """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
        f = 1.0
        if step > self.warmup_steps:
            f /= math.sqrt((step + self.timescale - self.warmup_steps) / self.timescale)
        if self.warmup_steps:
            f *= min(1.0, step / self.warmup_steps)
        if self.cooldown_steps:
            f *= max(0.0, min(1.0, (self.total_steps - step) / self.cooldown_steps))
        return f

    def fitted(self, steps_done: int, seconds_per_step: float, seconds_left: float, max_steps: int) -> "InverseSquareRoot":
        """The same schedule ending where a time budget will stop the run, so that its cool-down
        happens: total = the steps that fit at the measured pace, at most ``max_steps``."""
        fit = steps_done + int(max(seconds_left, 0.0) / max(seconds_per_step, 1e-9))
        return replace(self, total_steps=max(steps_done + 1, min(max_steps, fit)))

    @classmethod
    def from_config(cls, scratch, total_steps: int) -> "InverseSquareRoot":
        return cls(scratch.scheduler_warmup, scratch.scheduler_timescale, scratch.scheduler_cooldown, total_steps)
