"""``angioexp synth``: write a synthetic study (index.csv, cines, labels, manifest)."""

from __future__ import annotations

import argparse
import json

from angioexp.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--cases", type=int, required=True, help="number of cases (acquisitions), ≥ 3")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed → identical bytes")
    parser.add_argument("--size", type=int, default=512, help="frame size in px, multiple of 16 in 128–1024 (default 512)")
    parser.add_argument("--frames", type=int, default=16, help="frames per cine (default 16)")
    parser.add_argument("--preview", action="store_true", help="also write preview.png (contact sheet)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores; never changes the output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dicom", action="store_true",
                        help="also write each cine as a DICOM XA multi-frame file, dicom/<case_id>.dcm (needs pydicom)")
    parser.add_argument("--pseudo-dice", type=float, default=0.83, help="mean Dice of pseudo-labels vs clean (default 0.83)")
    parser.add_argument(
        "--set", dest="knobs", action="append", default=[], metavar="KNOB=VALUE",
        help="override a generator knob, e.g. --set gap_rate=4 --set fov_mm=200,240 (see manifest.json 'knobs')",
    )


def _parse_knobs(items: list[str]) -> dict[str, str]:
    knobs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"expected KNOB=VALUE, got {item!r}", key="--set")
        knobs[name.strip().replace("-", "_")] = value.strip()
    return knobs


def run(args: argparse.Namespace) -> int:
    from angioexp.data.synthetic import generate

    out = generate(
        args.out,
        cases=args.cases,
        seed=args.seed,
        size=args.size,
        frames=args.frames,
        preview=args.preview,
        workers=args.workers,
        overwrite=args.overwrite,
        pseudo_dice=args.pseudo_dice,
        progress=True,
        **_parse_knobs(args.knobs),
    )
    if args.dicom:
        from angioexp.data.synthetic.dicom import write_dicom_study

        write_dicom_study(out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    dice = manifest["pseudo_label_dice"]
    splits = ", ".join(f"{k} {v['cases']}" for k, v in manifest["splits"].items())
    print(
        f"wrote {args.cases} cases of {manifest['patients']} patients to {out} ({splits}); "
        f"pseudo-label Dice {dice['mean']:.3f} ± {dice['std']:.3f}"
    )
    return 0
