"""Shared bits of the sweep tests: a tiny core-model space (a few seconds per trial on CPU)."""

from __future__ import annotations

import textwrap
from pathlib import Path

# A model and run small enough for seconds per trial on 2 CPU cores (64 px, 4-8 steps).
TINY_FIXED = """
fixed:
  scratch.resolution: 64
  scratch.train_batch_size: 2
  scratch.scheduler_warmup: 0
  scratch.scheduler_timescale: 4
  scratch.scheduler_cooldown: 1
  model.encoder_channels: [8, 8, 16, 16]
  model.d_model: 16
  model.num_queries: 2
  model.decoder_layers: 1
  model.num_heads: 2
  train.max_steps: {steps}
  train.eval_every: {eval_every}
  train.log_every: 2
  train.checkpoint_every: {steps}
  data.max_val_images: 3
  eval.overlays: 0
{extra}"""


def write_space(path: Path, body: str, *, steps: int = 4, eval_every: int = 2, extra_fixed: str = "") -> Path:
    """``body`` (study/objective/sampler/pruner/params YAML) + the tiny fixed block → ``path``."""
    extra = textwrap.indent(textwrap.dedent(extra_fixed).strip(), "  ") + "\n" if extra_fixed.strip() else ""
    text = textwrap.dedent(body).strip() + "\n" + TINY_FIXED.format(steps=steps, eval_every=eval_every, extra=extra)
    path.write_text(text, encoding="utf-8")
    return path
