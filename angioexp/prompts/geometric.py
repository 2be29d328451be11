"""Points + optional box for one find query, as SAM3's ``RandomGeometricInputsAPI``.

Per query: draw n ∈ [lo, hi] (``prompts.num_points``); with probability ``prompts.box_chance``
the query also gets a box, which stands in for one of the n points (SAM3's rule); the points
come from the configured sampler (``prompts.point_sample_mode``, centreline by default) plus
``prompts.num_negative_points`` negatives; the box is the mask's box
(``resample_box_from_mask``; else the given ``bbox``), jittered by ``box_noise_std/max``.

    prompt = sample_geometric_prompt(mask, cfg.prompts, rng)
    prompt.points (P, 2) pixels, prompt.labels (P,), prompt.box (4,) pixel xyxy or None
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from angioexp.errors import ConfigError
from angioexp.prompts.boxes import box_from_mask, jitter_box
from angioexp.prompts.points import POINT_SAMPLE_MODES, PointPrompt, _points_prompt, draw_num_points


@dataclass(frozen=True)
class GeometricPrompt:
    points: np.ndarray  # (P, 2) float32 (x, y) pixels
    labels: np.ndarray  # (P,) int64: 1 positive, 0 negative
    box: np.ndarray | None  # (4,) float32 xyxy pixels, or None
    fallback: str | None = None  # see PointPrompt.fallback


def sample_geometric_prompt(mask, prompts_cfg, rng: np.random.Generator, bbox: np.ndarray | None = None) -> GeometricPrompt:
    """mask (H, W) bool, ``prompts_cfg`` (angioexp.config.PromptConfig) → GeometricPrompt.

    ``bbox`` (pixel xyxy) is used when ``prompts_cfg.resample_box_from_mask`` is false.
    """
    mode = prompts_cfg.point_sample_mode
    if mode not in POINT_SAMPLE_MODES:
        raise ConfigError(f"must be one of {list(POINT_SAMPLE_MODES)}, got {mode!r}", key="prompts.point_sample_mode")
    n = draw_num_points(prompts_cfg.num_points, rng)
    use_box = prompts_cfg.box_chance > 0 and rng.random() < prompts_cfg.box_chance
    n = max(n - int(use_box), 0)
    mask = np.asarray(mask).astype(bool)
    points: PointPrompt = _points_prompt(
        mask, n, rng, mode=mode, num_negative=prompts_cfg.num_negative_points, negative_margin=8.0
    )
    box = None
    if use_box:
        source = box_from_mask(mask) if prompts_cfg.resample_box_from_mask or bbox is None else np.asarray(bbox, np.float32)
        if source is not None:
            box = jitter_box(source, mask.shape, rng, prompts_cfg.box_noise_std, prompts_cfg.box_noise_max)
    return GeometricPrompt(points=points.points, labels=points.labels, box=box, fallback=points.fallback)
