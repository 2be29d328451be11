"""A learning-curve PNG drawn from the metric history a run has logged so far.

PNG (matplotlib, already an MLflow dependency) rather than plotly HTML: a few tens of kB per
update instead of ~4 MB of inline plotly.js, and MLflow's artifact viewer shows it inline.
The interactive curves live in MLflow's own charts and in the dashboards.
"""

from __future__ import annotations

import math
from pathlib import Path

# Headline validation metrics, in the order they are drawn.
VAL_HEADLINE = ("val/AP75_tol", "val/AP75", "val/AP", "val/AP50", "val/dice", "val/cldice", "val/biou",
                "val/segments/dice_common")

History = dict[str, list[tuple[int, float]]]  # metric name → [(step, value), ...]


def _finite(points):
    return [(s, v) for s, v in points if v is not None and math.isfinite(v)]


def learning_curve_png(history: History, path: str | Path, title: str = "", nan_steps=()) -> Path:
    """Write a 2×2 panel PNG: train losses (log y), val metrics, lr, grad norm + NaN events.

    ``nan_steps``: steps of non-finite events (from ``on_nan_event``), drawn as red lines.
    """
    # The object API, not pyplot: no global state, so drawing on a worker thread is safe.
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    loss_ax, val_ax, lr_ax, grad_ax = axes.ravel()

    loss_keys = ["train/loss"] + sorted(
        k for k in history
        if k.startswith("train/") and k not in ("train/loss", "train/lr", "train/grad_norm", "train/nan_events", "train/images_per_s")
    )
    for key in loss_keys:
        pts = [(s, v) for s, v in _finite(history.get(key, [])) if v > 0]
        if pts:
            loss_ax.plot(*zip(*pts), label=key.removeprefix("train/"), linewidth=2.0 if key == "train/loss" else 0.9)
    loss_ax.set_yscale("log")
    loss_ax.set_title("training losses")

    for key in [k for k in VAL_HEADLINE if k in history]:
        pts = _finite(history[key])
        if pts:
            val_ax.plot(*zip(*pts), marker="o", markersize=3, label=key.removeprefix("val/"))
    val_ax.set_ylim(0, 1)
    val_ax.set_title("validation")

    lr = _finite(history.get("train/lr", []))
    if lr:
        lr_ax.plot(*zip(*lr), color="tab:purple")
    lr_ax.set_title("learning rate (transformer group)")

    grad = [(s, v) for s, v in _finite(history.get("train/grad_norm", [])) if v > 0]
    if grad:
        grad_ax.plot(*zip(*grad), color="tab:gray", label="grad_norm")
        grad_ax.set_yscale("log")
    for step in sorted(set(nan_steps)):
        grad_ax.axvline(step, color="tab:red", alpha=0.5, linewidth=0.8)
    grad_ax.set_title("gradient norm (red: non-finite steps)")

    for ax in axes.ravel():
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
