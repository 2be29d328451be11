"""``angioexp`` command line. Each sub-command lives in the module of its pipeline stage.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when that command runs, so ``angioexp synth`` never pays for importing torch or mlflow.
User errors (:class:`angioexp.errors.AngioexpError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from angioexp.errors import AngioexpError

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("angioexp.data.synthetic.cli", "generate synthetic angiography studies (index.csv layout)"),
    "convert": ("angioexp.data.convert", "index.csv → COCO (Stage 1 or 2)"),
    "import-arcade": ("angioexp.data.importers.arcade", "ARCADE COCO (syntax or stenosis task) → index.csv layout"),
    "import-masks": ("angioexp.data.importers.masks", "image/mask folder pairs (DCA1, XCAD, FS-CAD) → index.csv layout"),
    "import-dicom": ("angioexp.data.importers.dicom", "DICOM XA cines → index.csv layout (angles, spacing; de-identified)"),
    "register": ("angioexp.data.register", "log a COCO dataset's splits as MLflow datasets"),
    "prepare": ("angioexp.data.prepare", "synthetic data or an index.csv → COCO → registered datasets"),
    "train": ("angioexp.train.cli", "train a model (backend core or sam3)"),
    "evaluate": ("angioexp.evaluate.cli", "score a checkpoint or predictions; --ceiling scores the labels"),
    "export-arcade": ("angioexp.evaluate.export_arcade", "predictions on a Stage 2 split → ARCADE submission JSON"),
    "predict": ("angioexp.predict.cli", "apply a model to frames, cines, DICOM XA or an index.csv: label maps, overlays, tables"),
    "promote": ("angioexp.tracking.promote", "move registry aliases (champion/challenger) by hand"),
    "sweep": ("angioexp.sweep.cli", "run an Optuna study (same as python -m angioexp.sweep)"),
    "sweep-report": ("angioexp.sweep.report", "plotly HTML report of an Optuna study"),
    "dashboard": ("angioexp.dashboard.cli", "comparison dashboards (registry, runs, sweeps, predictions)"),
    "doctor": ("angioexp.backends.sam3.doctor", "list the pitfalls an existing SAM3 training config triggers"),
    "bench": ("angioexp.bench.__main__", "run the benchmarks and update BENCHMARKS.md"),
    "config": ("angioexp.config_view", "the resolved configuration with each value's source (show), or its reference (docs)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="angioexp", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module_name).add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the chosen command's module (fast start-up, no torch for `synth`).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except AngioexpError as exc:
        print(f"angioexp {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        # SIGTERM arrives as angioexp.train.signals.Terminated (a KeyboardInterrupt with signum 15)
        sigterm = getattr(exc, "signum", None) == 15
        detail = f": {exc}" if str(exc) else ""
        print(f"angioexp {args.command}: {'terminated (SIGTERM)' if sigterm else 'interrupted'}{detail}", file=sys.stderr)
        return 143 if sigterm else 130


if __name__ == "__main__":
    sys.exit(main())
