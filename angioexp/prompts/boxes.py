"""Box prompts and box targets from masks (SAM3's conventions).

Pixel boxes are xyxy with an exclusive far edge, as SAM3's ``masks_to_boxes`` (a one-pixel mask
at (x, y) has the box (x, y, x+1, y+1)), so a box never has zero width. Normalised boxes divide
by the image width/height. ``jitter_box`` reproduces SAM3's ``noise_box`` (the jitter of
``RandomGeometricInputsAPI`` / ``RandomizeInputBbox``): Gaussian noise with std
``noise_std × box side`` on each coordinate, clipped to ``noise_max`` pixels, the result clipped
to the image; a jittered box whose area falls to ``min_box_area`` or below is replaced by the
original box.
"""

from __future__ import annotations

import numpy as np


def box_from_mask(mask) -> np.ndarray | None:
    """(H, W) mask → (4,) float32 xyxy pixel box (x1, y1 exclusive), or None for an empty mask."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"box_from_mask needs a 2-D mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def normalise_xyxy(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """(…, 4) pixel xyxy → normalised xyxy in [0, 1]."""
    return (np.asarray(box, dtype=np.float32) / np.array([width, height, width, height], dtype=np.float32)).astype(np.float32)


def xyxy_to_cxcywh(box: np.ndarray) -> np.ndarray:
    """(…, 4) xyxy → (…, 4) cx, cy, w, h (same units)."""
    box = np.asarray(box, dtype=np.float32)
    x0, y0, x1, y1 = np.moveaxis(box, -1, 0)
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1).astype(np.float32)


def cxcywh_normalised_from_mask(mask) -> np.ndarray | None:
    """(H, W) mask → (4,) normalised cx, cy, w, h (the loss targets' format), None if empty."""
    box = box_from_mask(mask)
    if box is None:
        return None
    h, w = np.asarray(mask).shape
    return xyxy_to_cxcywh(normalise_xyxy(box, h, w))


def jitter_box(
    box: np.ndarray,
    image_size: tuple[int, int],
    rng: np.random.Generator,
    noise_std: float,
    noise_max: float | None = None,
    min_box_area: float = 0.0,
) -> np.ndarray:
    """SAM3's ``noise_box`` with a numpy Generator: (4,) pixel xyxy → (4,) jittered xyxy.

    image_size is (height, width). ``noise_std <= 0`` returns the box unchanged (no draw).
    """
    if noise_std < 0:
        raise ValueError(f"box noise std must be >= 0 (prompts.box_noise_std), got {noise_std}")
    if noise_max is not None and noise_max < 0:
        raise ValueError(f"box noise max must be >= 0 (prompts.box_noise_max), got {noise_max}")
    box = np.asarray(box, dtype=np.float32)
    if noise_std == 0:
        return box.copy()
    w, h = box[2] - box[0], box[3] - box[1]
    noise = noise_std * rng.standard_normal(4) * np.array([w, h, w, h])
    if noise_max is not None:
        noise = np.clip(noise, -noise_max, noise_max)
    height, width = image_size
    jittered = np.clip(box + noise, 0, np.array([width, height, width, height])).astype(np.float32)
    if (jittered[2] - jittered[0]) * (jittered[3] - jittered[1]) <= min_box_area:
        return box.copy()  # collapsed or inverted: keep the original, as SAM3
    return jittered


def sample_box_prompt(
    mask,
    rng: np.random.Generator,
    *,
    box_chance: float,
    noise_std: float = 0.0,
    noise_max: float | None = None,
    min_box_area: float = 0.0,
) -> np.ndarray | None:
    """With probability ``box_chance``, a (jittered) pixel xyxy box around the mask; else None.

    Always draws one uniform number when box_chance > 0, so the draw count does not depend on
    the mask (reproducible streams). An empty mask gives None.
    """
    if not 0 <= box_chance <= 1:
        raise ValueError(f"prompts.box_chance must be in [0, 1], got {box_chance}")
    if box_chance == 0 or rng.random() >= box_chance:
        return None
    box = box_from_mask(mask)
    if box is None:
        return None
    return jitter_box(box, np.asarray(mask).shape, rng, noise_std, noise_max, min_box_area)
