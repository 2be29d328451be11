"""Cine timing: contrast bolus (wash-in along the tree, wash-out) and cardiac + respiratory motion.

The vessel layer is rendered once, in the geometry of the annotated frame; every other frame is
that layer times the bolus curve, moved by the motion *relative to* the annotated frame (its
few % of lit pixels are splatted forward) — so the labels match the annotated frame exactly and
the motion there is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FPS = 15.0  # cine frame rate (15 fps is the usual coronary cine rate)


def gamma_variate(t: np.ndarray, t_peak: float, rise: float, alpha: float) -> np.ndarray:
    """Indicator-dilution (bolus) curve with value 1 at ``t_peak``, zero before
    ``t_peak − rise``: x^α·exp(α(1 − x)), x = (t − t_peak + rise) / rise."""
    x = np.maximum((np.asarray(t, np.float32) - (t_peak - rise)) / rise, 0.0)
    return (x**alpha * np.exp(alpha * (1.0 - x))).astype(np.float32)


@dataclass(frozen=True)
class Bolus:
    """Contrast timing of one injection, in frames. Each pixel's curve is delayed by the
    path length from the ostium to its vessel point (the contrast front travels down the tree)."""

    frames: int
    t_peak: float  # peak of the curve at the ostium (frames)
    rise: float  # frames from arrival to peak
    alpha: float  # curve shape
    frames_per_mm: float  # arrival delay per mm of path from the ostium

    def opacification(self, t: int, delay: np.ndarray) -> np.ndarray:
        if self.frames == 1:
            return np.ones_like(delay, dtype=np.float32)
        return gamma_variate(t - delay, self.t_peak, self.rise, self.alpha)

    def peak_frame(self, weights: np.ndarray, delay: np.ndarray) -> int:
        """The frame with the most iodine in view: argmax_t Σ weights·curve(t − delay)."""
        totals = [float(np.dot(weights, self.opacification(t, delay))) for t in range(self.frames)]
        return int(np.argmax(totals))


def plan_bolus(frames: int, rng: np.random.Generator, weights: np.ndarray, path_mm: np.ndarray) -> tuple[Bolus, int]:
    """Draw an injection whose total opacification peaks in the middle third of the cine.

    The timing is relative to the cine length (the acquisition is timed to the injection), so
    short test cines still show wash-in, a full peak and the start of wash-out.
    Returns the bolus and the peak (annotated) frame index.
    """
    if frames == 1:
        return Bolus(1, 0.0, 1.0, 3.0, 0.0), 0
    frames_per_mm = rng.uniform(0.10, 0.22) * frames / 16.0 / 10.0  # whole tree fills in ~1–3.5 frames of 16
    delay = path_mm * frames_per_mm
    mean_delay = float(np.average(delay, weights=weights)) if weights.sum() > 0 else 0.0
    # Peak on a whole frame, so that the annotated frame clearly beats its neighbours.
    target = float(np.rint(rng.uniform(0.38, 0.62) * (frames - 1)))
    rise = max(1.2, rng.uniform(0.35, 0.5) * frames)
    bolus = Bolus(frames, target - mean_delay, rise, float(rng.uniform(2.5, 4.0)), frames_per_mm)
    return bolus, bolus.peak_frame(weights, delay)


@dataclass(frozen=True)
class Motion:
    """Per-frame affine motion of the vessel layer: scale about the heart centre + shift.

    Cardiac: the epicardial vessels move toward the heart's centre in systole by 5–10% (a few
    mm), slightly anisotropically, with a small swing; respiration: a slow drift of a few mm
    (cines are taken in breath-hold, which is never perfect).
    """

    centre: tuple[float, float]  # (col, row) px
    scale: np.ndarray  # (T, 2) x, y scale of frame t relative to the annotated frame
    shift: np.ndarray  # (T, 2) x, y shift (px) relative to the annotated frame
    heart_rate_bpm: float

    def forward(self, t: int, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where annotated-frame points (cols, rows) are in frame t."""
        cx, cy = self.centre
        sx, sy = self.scale[t]
        dx, dy = self.shift[t]
        return cx + sx * (cols - cx) + dx, cy + sy * (rows - cy) + dy


def plan_motion(frames: int, frame_index: int, rng: np.random.Generator, px_per_mm: float, centre) -> Motion:
    t = np.arange(frames, dtype=np.float64)
    hr = rng.uniform(55.0, 95.0)
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * hr / 60.0 * t / FPS
    systole = 0.5 * (1.0 - np.cos(phase))  # 0 in diastole, 1 at end-systole
    amp = rng.uniform(0.04, 0.09)
    aniso = rng.uniform(0.7, 1.2, size=2)
    scale = 1.0 - amp * aniso[None, :] * systole[:, None]
    swing = rng.normal(0.0, 1.5, size=2) * px_per_mm  # mm of whole-heart swing per beat
    breath = rng.uniform(0.0, 3.0) * px_per_mm * np.sin(2 * np.pi * t / (FPS * rng.uniform(3.0, 5.0)) + rng.uniform(0, 6.3))
    shift = swing[None, :] * systole[:, None] + np.stack([0.2 * breath, breath], axis=1)
    # Relative to the annotated frame: identity there.
    rel_scale = scale / scale[frame_index]
    rel_shift = shift - shift[frame_index]
    return Motion((float(centre[0]), float(centre[1])), rel_scale, rel_shift, float(hr))


def splat(values: np.ndarray, cols: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """Forward-warp sparse pixels: bilinear splatting of ``values`` at fractional (cols, rows)
    into a flat (size²,) image. Conserves the total (iodine mass) and, for the ≤ 10% scale
    changes of cardiac motion, leaves no holes. Much cheaper than resampling the full image
    when only the vessel pixels (a few %) carry signal."""
    c0 = np.floor(cols).astype(np.int64)
    r0 = np.floor(rows).astype(np.int64)
    fc = (cols - c0).astype(np.float32)
    fr = (rows - r0).astype(np.float32)
    idx, wts = [], []
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            idx.append((rr * size + cc)[ok])
            wts.append((values * wr * wc)[ok])
    return np.bincount(np.concatenate(idx), weights=np.concatenate(wts), minlength=size * size).astype(np.float32)
