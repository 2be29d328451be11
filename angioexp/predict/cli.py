"""``angioexp predict --model URI_OR_CHECKPOINT --input PATH… --out DIR``: see :mod:`angioexp.predict`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/<path>, "
                        "or a checkpoint file/folder")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="PNG/JPEG/TIFF frames, .npy cines (T×H×W), DICOM XA files, or an index.csv / cines.csv")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite; never an input)")
    parser.add_argument("--prompts", nargs="+", default=None, help="Stage 2: segments to query (SYNTAX names or slugs; "
                        "default all); Stage 1: text prompts (default 'coronary artery')")
    parser.add_argument("--threshold", type=float, default=None, help="score threshold of kept masks (default: the "
                        "model's eval.score_threshold)")
    parser.add_argument("--frames", default=None, help="frames of each cine, e.g. 0,3,5-8 (default: all; a CSV row: its frame)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--arcade", default=None, metavar="FILE", help="Stage 2: write the ARCADE submission JSON here "
                        "(default <out>/arcade.json; an existing file is refused, never replaced)")


def run(args: argparse.Namespace) -> int:
    from angioexp.predict import predict

    summary = predict(args.model, args.input, args.out, prompts=args.prompts, threshold=args.threshold,
                      frames=args.frames, device=args.device, overwrite=args.overwrite, progress=True,
                      arcade=args.arcade)
    arcade = f"ARCADE submission {summary['arcade']}" if summary["arcade"] else summary["no_arcade"]
    print(f"predicted {summary['frames']} frame(s) of {summary['sources']} input(s) with {summary['model']['uri']} "
          f"→ {args.out}/ (labels, overlays, segments.csv, predictions.json); {arcade}")
    return 0
