"""``angioexp evaluate``: score predictions, a checkpoint, or (``--ceiling``) the labels themselves.

Writes ``metrics.json``, ``per_image.csv``, ``per_category.csv`` and ``overlays/`` to ``--out``
(atomically: the folder appears complete or not at all); with ``--checkpoint`` also the
``predictions.json`` it scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from angioexp.data.coco import check_prediction_source
from angioexp.errors import AngioexpError, InputError
from angioexp.fileio import atomic_dir, refuse_output_over_inputs, write_json_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coco", required=True, type=Path, help="COCO folder written by `angioexp convert`")
    parser.add_argument("--split", default="val", help="split to score (default: val)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help="COCO results JSON: [{image_id, category_id, segmentation, score}]")
    source.add_argument("--checkpoint", type=Path, help="model checkpoint: predict the split first (core backend)")
    source.add_argument("--ceiling", action="store_true", help="score the training labels against the clean truth")
    parser.add_argument("--out", type=Path, help="output folder (default: eval/<split>-<predictions|checkpoint|ceiling>)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--tolerance", type=int, default=1, help="boundary tolerance in px for AP_tol and Boundary IoU (default 1)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="predictions kept for Dice/clDice/BIoU (default 0.5)")
    parser.add_argument("--gt", choices=("clean", "train"), help="truth: clean (annotations_gt.json) or train "
                        "(annotations.json); default clean when present")
    parser.add_argument("--max-overlays", type=int, default=8, help="overlay PNGs, worst Dice first (default 8; 0: none)")
    parser.add_argument("--device", default="cpu", help="device for --checkpoint inference (default cpu)")


def choose_ground_truth(split_dir: Path, gt: str | None) -> Path:
    """annotations_gt.json (clean) when asked for or present, else annotations.json."""
    clean, train = split_dir / "annotations_gt.json", split_dir / "annotations.json"
    if gt == "clean" or (gt is None and clean.is_file()):
        if not clean.is_file():
            raise InputError("--gt clean: this split has no clean labels", file=clean)
        return clean
    if not train.is_file():
        raise InputError("file not found (is --coco a folder written by `angioexp convert`?)", file=train)
    return train


def _predict(args: argparse.Namespace) -> list[dict]:
    try:
        from angioexp.train.inference import predict_split
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("angioexp.train"):
            raise AngioexpError(
                "--checkpoint needs angioexp.train.inference.predict_split (the core training backend), "
                "which this installation lacks; score a predictions file with --predictions instead"
            ) from None
        raise
    if not args.checkpoint.is_file():
        raise InputError("checkpoint not found", file=args.checkpoint)
    predictions = predict_split(args.checkpoint, args.coco, args.split, device=args.device)
    for pred in predictions:  # pycocotools encodes counts as bytes; JSON needs text
        counts = pred.get("segmentation", {}).get("counts") if isinstance(pred.get("segmentation"), dict) else None
        if isinstance(counts, bytes):
            pred["segmentation"] = {**pred["segmentation"], "counts": counts.decode("ascii")}
    return predictions


def run(args: argparse.Namespace) -> int:
    from angioexp.evaluate.evaluator import evaluate_predictions, label_noise_ceiling

    split_dir = args.coco / args.split
    if not split_dir.is_dir():
        raise InputError(f"no split '{args.split}' here", file=split_dir)
    mode = "ceiling" if args.ceiling else ("checkpoint" if args.checkpoint else "predictions")
    out = args.out or Path("eval") / f"{args.split}-{mode}"
    refuse_output_over_inputs(out, [args.coco, args.predictions, args.checkpoint])
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output already exists (pass --overwrite to replace it)", file=out)
    options = dict(tolerance_px=args.tolerance, score_threshold=args.score_threshold, max_overlays=args.max_overlays)

    predictions = None
    if args.ceiling:
        if args.gt == "train":
            raise InputError("--ceiling scores the training labels against the clean truth; --gt train makes no sense")
        print(f"ground truth: {split_dir / 'annotations_gt.json'} (clean); predictions: {split_dir / 'annotations.json'}")
    else:
        gt_file = choose_ground_truth(split_dir, args.gt)
        kind = "clean" if gt_file.name == "annotations_gt.json" else "training labels"
        print(f"ground truth: {gt_file} ({kind})")
        if args.predictions is not None:
            if not args.predictions.is_file():
                raise InputError("file not found", file=args.predictions)
            try:
                predictions = json.loads(args.predictions.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"not valid JSON: {exc.msg} (line {exc.lineno})", file=args.predictions) from None
            check_prediction_source(predictions, args.coco, args.split, file=args.predictions)
        else:
            predictions = _predict(args)

    with atomic_dir(out, overwrite=True) as tmp:
        if args.ceiling:
            result = label_noise_ceiling(args.coco, args.split, overlays_dir=tmp / "overlays", **options)
        else:
            result = evaluate_predictions(
                gt_file, predictions, overlays_dir=tmp / "overlays", images_dir=split_dir / "images",
                predictions_file=args.predictions, **options,
            )
            result.settings["mode"] = mode
            result.settings["predictions"] = str(args.predictions or args.checkpoint)
            if result.settings["stage"] == 2:
                add_segment_figures(result, gt_file, predictions, args.score_threshold, tmp / "segments")
        if args.checkpoint is not None:
            write_json_atomic(tmp / "predictions.json", predictions, indent=None)
        result.write(tmp)
    _print_summary(result, out)
    return 0


def add_segment_figures(result, gt_file: Path, predictions: list[dict], score_threshold: float, out_dir: Path) -> None:
    """Stage 2: dice_common (+ CI), the no-identity floor and ARCADE's mean F1 into
    ``result.metrics`` under ``segments/``; per-segment table into ``out_dir``."""
    from angioexp.evaluate.arcade import arcade_mean_f1
    from angioexp.evaluate.evaluator import load_ground_truth
    from angioexp.evaluate.segments import segment_report

    gt = load_ground_truth(gt_file)
    report = segment_report(gt, result.per_pair)
    report.write(out_dir)
    result.metrics.update({f"segments/{k}": v for k, v in report.metrics.items()})
    result.metrics["segments/arcade_mean_f1"] = arcade_mean_f1(gt, predictions, score_threshold)


def _print_summary(result, out: Path) -> None:
    m = result.metrics
    line = "  ".join(f"{k} {m[k]:.4f}" for k in ("AP", "AP50", "AP75", "AP_tol", "AP75_tol", "dice", "cldice", "biou"))
    print(line)
    if "dice_mean_segments" in m:
        print(f"dice_mean_segments {m['dice_mean_segments']:.4f} over {len([k for k in m if k.startswith('dice/')])} segments")
    if "segments/dice_common" in m:
        print(f"dice_common {m['segments/dice_common']:.4f} (95% CI {m['segments/dice_common_ci_low']:.4f}-"
              f"{m['segments/dice_common_ci_high']:.4f}) over {m['segments/n_common']:.0f} common segments; "
              f"no-identity floor {m['segments/floor_common']:.4f}; ARCADE mean F1 {m['segments/arcade_mean_f1']:.4f}")
    print(f"wrote {out}/ (metrics.json, per_image.csv, per_category.csv, {len(result.overlays)} overlays)", file=sys.stdout)
