"""Stage 2 segment metrics, read against two reference points computed from the truth.

``dice_common`` (the Stage 2 headline): presence-gated per-segment Dice of the semantic output —
per (frame, segment), the Dice of the masks scored ≥ the threshold against the truth, where a
pair counts when either side is non-empty (a missed segment and a false alarm both score 0) —
averaged per segment over the frames, then macro-averaged over the *common* segments: those
present in ≥ ``common_fraction`` of the split's frames, the catheter excluded (it is no coronary
segment). A bootstrap over frames gives its 95 % interval. ``dice_all`` is the same macro over
every segment with truth in the split. ``dice_common_ungated`` (given the predicted label maps):
the same macro over the label maps themselves, every named pixel counted whatever its presence
score — the threshold-free figure that sets score calibration aside.

Reference points, on the same frames and segments:
    floor    no identity: the whole true vessel tree submitted for every segment present
             (Dice 2|T_c| / (|T_c| + |tree|)) — vessels perfect, names absent.
    ceiling  the true label map at the model's working resolution and back (nearest both
             ways) — what a perfect model at that resolution could reach.
Confusion: truth × predicted segment over the truth's vessel pixels (needs predicted label maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from angioexp.evaluate.evaluator import GroundTruth
from angioexp.fileio import atomic_file, write_json_atomic

EXCLUDED_SLUGS = ("catheter",)


@dataclass
class SegmentReport:
    metrics: dict[str, float]  # dice_common (+ _ci_low/_ci_high, _ungated), dice_all, floor_*, ceiling_*, n_common
    per_segment: pd.DataFrame  # slug, frames_with_truth, fraction, common, dice, dice_ungated, floor, ceiling
    confusion: pd.DataFrame | None  # truth slug × predicted slug (+ "background"), pixel counts

    def write(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "segment_metrics.json", self.metrics)
        with atomic_file(out_dir / "per_segment.csv", "w", encoding="utf-8", newline="") as handle:
            self.per_segment.to_csv(handle, index=False)
        if self.confusion is not None:
            with atomic_file(out_dir / "confusion.csv", "w", encoding="utf-8", newline="") as handle:
                self.confusion.to_csv(handle)
            plot_confusion(self.confusion, out_dir / "confusion.png")


def truth_label_map(gt: GroundTruth, image_id: int) -> np.ndarray:
    """int (H, W) label map of category ids (0 = background); overlaps: the higher id wins."""
    image = gt.images[image_id]
    label = np.zeros((image["height"], image["width"]), dtype=np.int32)
    for category_id in sorted(gt.categories):
        if (image_id, category_id) in gt.unions:
            label[gt.union_mask(image_id, category_id)] = category_id
    return label


def _resample_nearest(label: np.ndarray, size: int) -> np.ndarray:
    down = Image.fromarray(label.astype(np.int32), mode="I").resize((size, size), Image.NEAREST)
    return np.asarray(down.resize(label.shape[::-1], Image.NEAREST), dtype=np.int32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else float("nan")


def segment_report(gt: GroundTruth, per_pair: pd.DataFrame, *, working_resolution: int | None = None,
                   predicted_label_maps: dict[int, np.ndarray] | None = None, common_fraction: float = 0.10,
                   n_bootstrap: int = 1000, seed: int = 0) -> SegmentReport:
    """Stage 2 figures from an evaluation's ``per_pair`` table (``EvalResult.per_pair``)."""
    excluded = {c for c, slug in gt.slugs.items() if slug in EXCLUDED_SLUGS}
    image_ids = sorted(gt.images)
    row_of = {image_id: i for i, image_id in enumerate(image_ids)}
    categories = sorted(gt.categories)
    col_of = {c: j for j, c in enumerate(categories)}
    # (frames × segments) matrices: Dice of the output, floor, ceiling; NaN = pair not scored
    dice = np.full((len(image_ids), len(categories)), np.nan)
    floor = np.full_like(dice, np.nan)
    ceiling = np.full_like(dice, np.nan)
    ungated = np.full_like(dice, np.nan)
    has_truth = np.zeros_like(dice, dtype=bool)
    for row in per_pair.itertuples(index=False):
        dice[row_of[row.image_id], col_of[row.category_id]] = row.dice
    confusion = np.zeros((len(categories) + 1, len(categories) + 1), dtype=np.int64)  # 0 = background
    index_of = np.zeros(max(categories) + 1, dtype=np.int64)
    index_of[categories] = np.arange(1, len(categories) + 1)
    for image_id in image_ids:
        truth = truth_label_map(gt, image_id)
        i = row_of[image_id]
        tree = (truth > 0) & ~np.isin(truth, list(excluded))
        tree_px = int(tree.sum())
        resampled = _resample_nearest(truth, working_resolution) if working_resolution else None
        for category_id in np.unique(truth[truth > 0]):
            j = col_of[int(category_id)]
            mask = truth == category_id
            has_truth[i, j] = True
            px = int(mask.sum())
            floor[i, j] = 1.0 if category_id in excluded else 2.0 * px / (px + tree_px)
            if resampled is not None:
                ceiling[i, j] = _dice(mask, resampled == category_id)
        if predicted_label_maps is not None and image_id in predicted_label_maps:
            predicted = predicted_label_maps[image_id]
            vessel = truth > 0
            np.add.at(confusion, (index_of[truth[vessel]], index_of[predicted[vessel]]), 1)
            named = np.union1d(truth[vessel], predicted[predicted > 0])
            for category_id in named[np.isin(named, categories)]:
                ungated[i, col_of[int(category_id)]] = _dice(truth == category_id, predicted == category_id)

    n = len(image_ids)
    fraction = has_truth.sum(0) / max(n, 1)
    slugs = [gt.slugs[c] for c in categories]
    kept = np.array([c not in excluded for c in categories])
    common = kept & (fraction >= common_fraction)
    with_truth = kept & has_truth.any(0)

    def macro(values: np.ndarray, columns: np.ndarray) -> float:
        per_segment = np.nanmean(values[:, columns], axis=0) if columns.any() else np.array([])
        per_segment = per_segment[~np.isnan(per_segment)]
        return float(per_segment.mean()) if per_segment.size else float("nan")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns in a resample
        metrics = {
            "dice_common": macro(dice, common), "dice_all": macro(dice, with_truth),
            "floor_common": macro(floor, common), "floor_all": macro(floor, with_truth),
            "n_common": float(common.sum()), "n_frames": float(n),
        }
        if predicted_label_maps is not None:
            metrics["dice_common_ungated"] = macro(ungated, common)
        if working_resolution:
            metrics["ceiling_common"] = macro(ceiling, common)
            metrics["ceiling_all"] = macro(ceiling, with_truth)
        rng = np.random.default_rng(seed)
        boot = [macro(dice[rng.integers(0, n, n)], common) for _ in range(n_bootstrap)] if n and common.any() else []
        boot = np.asarray([b for b in boot if not np.isnan(b)])
        metrics["dice_common_ci_low"] = float(np.percentile(boot, 2.5)) if boot.size else float("nan")
        metrics["dice_common_ci_high"] = float(np.percentile(boot, 97.5)) if boot.size else float("nan")
        per_segment = pd.DataFrame({
            "slug": slugs, "frames_with_truth": has_truth.sum(0), "fraction": fraction, "common": common,
            "dice": np.nanmean(dice, axis=0),
            "dice_ungated": np.nanmean(ungated, axis=0) if predicted_label_maps is not None else np.nan,
            "floor": np.nanmean(floor, axis=0),
            "ceiling": np.nanmean(ceiling, axis=0) if working_resolution else np.nan,
        })
    table = None
    if predicted_label_maps is not None:
        names = ["background", *slugs]
        table = pd.DataFrame(confusion, index=pd.Index(names, name="truth"), columns=pd.Index(names, name="predicted"))
        table = table.iloc[1:]  # rows: truth vessel pixels only
    return SegmentReport(metrics, per_segment, table)


def plot_confusion(confusion: pd.DataFrame, path: Path) -> None:
    """Row-normalised heat map (each truth segment's pixels sum to 1), PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.to_numpy(dtype=float)
    rows = counts.sum(1, keepdims=True)
    shown = confusion.loc[rows[:, 0] > 0]
    norm = (counts / np.maximum(rows, 1))[rows[:, 0] > 0]
    fig, ax = plt.subplots(figsize=(0.32 * norm.shape[1] + 2.5, 0.32 * norm.shape[0] + 2))
    image = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(norm.shape[1]), confusion.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(norm.shape[0]), shown.index, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth (vessel pixels)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
