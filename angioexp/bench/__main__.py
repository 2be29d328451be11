"""``python -m angioexp.bench``: run benchmark areas and update BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from pathlib import Path

from angioexp.bench import AREAS, render_section, update_markdown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=AREAS, help="areas to run (default: all available)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--output", default="BENCHMARKS.md", help="markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--track", action="store_true",
                        help="stage2: log its training runs to MLflow (the dashboards' overview pairs them)")


def run(args: argparse.Namespace) -> int:
    areas = args.only or list(AREAS)
    out = Path(args.output)
    for area in areas:
        try:
            module = importlib.import_module(f"angioexp.bench.{area}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("angioexp.bench"):
                print(f"[bench] {area}: no benchmark module yet, skipped", file=sys.stderr)
                continue
            raise
        if not getattr(module, "available", lambda: True)():
            print(f"[bench] {area}: {getattr(module, 'UNAVAILABLE', 'not available here')}, skipped", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        tracks = "track" in inspect.signature(module.run).parameters
        if args.track and not tracks:
            print(f"[bench] {area}: logs no runs, --track ignored", file=sys.stderr)
        figures = module.run(quick=args.quick, **({"track": True} if args.track and tracks else {}))
        command = f"python -m angioexp.bench --only {area}" + (" --quick" if args.quick else "")
        section = render_section(area, module.TITLE, figures, command)
        print(section)
        print(f"[bench] {area}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if not args.no_write and not args.quick:
            update_markdown(out, area, section)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m angioexp.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
