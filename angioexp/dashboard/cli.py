"""``angioexp dashboard``: static comparison pages from the tracking store and Optuna storage.

    angioexp dashboard                                  # → dashboards/index.html (+ 4 pages)
    angioexp dashboard --runs RUN_A,RUN_B --study stage1_nan --plotly-js file

Reads any tracking URI (``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db``); the pages
are also logged as artifacts of a run in experiment ``angioexp-dashboards`` (``--no-log``
skips that).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from angioexp.dashboard.data import DEFAULT_EXPERIMENTS, DEFAULT_MODELS

log = logging.getLogger(__name__)


def _names(values: list[str] | None) -> tuple[str, ...]:
    """Repeatable, comma-separated option values → a tuple without blanks or duplicates."""
    out: list[str] = []
    for value in values or []:
        for name in value.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return tuple(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="dashboards", help="folder for the pages (default: dashboards/)")
    parser.add_argument("--models", action="append", metavar="NAME[,NAME]",
                        help=f"registered models, Stage 1 first (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--experiment", action="append", metavar="NAME[,NAME]",
                        help=f"experiments whose newest runs the Runs page shows (default: {','.join(DEFAULT_EXPERIMENTS)})")
    parser.add_argument("--runs", action="append", metavar="RUN_ID[,RUN_ID]", help="exactly these runs on the Runs page")
    parser.add_argument("--max-runs", type=int, default=20, help="newest runs shown when --runs is not given (default 20)")
    parser.add_argument("--study", action="append", metavar="NAME[,NAME]", help="only these Optuna studies (default: all found)")
    parser.add_argument("--storage", action="append", metavar="URL",
                        help="Optuna storage(s) to search (default: those recorded on sweep runs, optuna.db, optuna-journal.log)")
    parser.add_argument("--plotly-js", choices=["inline", "file", "cdn"], default="inline",
                        help="inline: each page opens offline on its own (~4.8 MB); file: one plotly.min.js beside "
                             "the pages; cdn: load it from cdn.plot.ly")
    parser.add_argument("--max-versions", type=int, default=5, help="prediction galleries per model (aliased versions always)")
    parser.add_argument("--max-images", type=int, default=50, help="images per gallery, worst Dice first (default 50)")
    parser.add_argument("--thumb-px", type=int, default=192, help="gallery thumbnail size in px (default 192)")
    parser.add_argument("--no-log", action="store_true", help="do not log the pages as an MLflow dashboard run")


def run(args: argparse.Namespace) -> int:
    from angioexp.dashboard.build import DashboardOptions, build_dashboards
    from angioexp.fileio import local_store_file, refuse_output_over_inputs
    from angioexp.tracking.uri import tracking_uri

    refuse_output_over_inputs(args.out, [local_store_file(u) for u in [tracking_uri(), *_names(args.storage)]])

    # one progress bar per downloaded artifact would drown the output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    options = DashboardOptions(
        out=Path(args.out),
        models=_names(args.models) or DEFAULT_MODELS,
        experiments=_names(args.experiment) or DEFAULT_EXPERIMENTS,
        run_ids=_names(args.runs),
        max_runs=args.max_runs,
        studies=_names(args.study),
        storages=_names(args.storage),
        plotly_js=args.plotly_js,
        max_versions=args.max_versions,
        max_images=args.max_images,
        thumb_px=args.thumb_px,
        log_to_mlflow=not args.no_log,
    )
    result = build_dashboards(options)
    for note in result.notes:
        print(f"angioexp dashboard: warning: {note}")
    print(f"dashboards → {result.pages['index.html']} ({len(result.pages)} pages, {len(result.sweep_reports)} sweep report(s))")
    if result.run_id:
        print(f"logged as artifacts of MLflow run {result.run_id}")
    return 0
