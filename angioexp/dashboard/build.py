"""``build_dashboards(options)``: read the tracking store and Optuna storage, write the pages,
log them as artifacts of a ``dashboard`` run.

Every page is assembled in memory first and then written atomically, so a failure while
reading leaves the previous pages as they were; the sweep report folders are replaced
atomically by :mod:`angioexp.sweep.report`.

    result = build_dashboards(DashboardOptions(out=Path("dashboards")))
    result.pages["index.html"]  # → dashboards/index.html
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from angioexp.dashboard.data import DASHBOARD_EXPERIMENT, DEFAULT_EXPERIMENTS, DEFAULT_MODELS
from angioexp.dashboard.html import PLOTLY_FILE, PLOTLY_MODES
from angioexp.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class DashboardOptions:
    out: Path = Path("dashboards")
    models: tuple[str, ...] = DEFAULT_MODELS
    experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS
    run_ids: tuple[str, ...] = ()  # explicit runs for the Runs page (else the newest max_runs)
    max_runs: int = 20
    studies: tuple[str, ...] = ()  # filter; empty = every study found
    storages: tuple[str, ...] = ()  # Optuna storage URLs; empty = recorded on sweep runs + defaults
    plotly_js: str = "inline"
    max_versions: int = 5  # galleries per registered model (aliased versions always included)
    max_images: int = 50  # images per gallery, worst Dice first
    thumb_px: int = 192
    log_to_mlflow: bool = True
    tracking_uri: str | None = None

    def validate(self) -> None:
        if self.plotly_js not in PLOTLY_MODES:
            raise InputError(f"--plotly-js must be one of {', '.join(PLOTLY_MODES)}, got {self.plotly_js!r}", key="--plotly-js")
        for key, value, low in (("--max-runs", self.max_runs, 1), ("--max-versions", self.max_versions, 1),
                                ("--max-images", self.max_images, 1), ("--thumb-px", self.thumb_px, 32)):
            if not isinstance(value, int) or value < low:
                raise InputError(f"must be an integer >= {low}, got {value!r}", key=key)
        if self.thumb_px > 1024:
            raise InputError(f"must be <= 1024, got {self.thumb_px}", key="--thumb-px")
        if not self.models:
            raise InputError("name at least one registered model", key="--models")


@dataclass
class DashboardResult:
    out: Path
    pages: dict[str, Path] = field(default_factory=dict)  # page path relative to out → file
    sweep_reports: list[Path] = field(default_factory=list)  # report folders (out/sweeps/<study>)
    run_id: str | None = None  # the MLflow dashboard run holding the pages as artifacts
    notes: list[str] = field(default_factory=list)


def _start_run(client, options: DashboardOptions) -> tuple[str, bool]:
    """(run id, whether we own it): the run `mlflow run` created, else a new one."""
    from mlflow.entities import Param, RunTag

    from angioexp.tracking.session import git_sha
    from angioexp.tracking.uri import ensure_experiment

    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        run_id, owned = env_run, False
    else:
        experiment_id = ensure_experiment(DASHBOARD_EXPERIMENT, client)
        name = f"dashboard-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        run_id = client.create_run(experiment_id, run_name=name, tags={"mlflow.runName": name}).info.run_id
        owned = True
    sha, _ = git_sha()
    params = {"models": ",".join(options.models), "experiments": ",".join(options.experiments),
              "runs": ",".join(options.run_ids)[:5000], "studies": ",".join(options.studies),
              "max_runs": options.max_runs, "max_images": options.max_images, "plotly_js": options.plotly_js}
    existing = client.get_run(run_id).data.params
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if k not in existing],
                     tags=[RunTag("angioexp.role", "dashboard"), RunTag("git.sha", sha)])
    return run_id, owned


def build_dashboards(options: DashboardOptions) -> DashboardResult:
    """Build every page into ``options.out``; see the module doc."""
    from angioexp.dashboard import index, init_vs_scratch, predictions, registry, runs, sweeps
    from angioexp.dashboard.data import experiment_ids, find_studies, mlflow_client, select_runs
    from angioexp.dashboard.html import esc, write_plotly_file
    from angioexp.sweep.storage import redact
    from angioexp.tracking.uri import check_tracking_server

    options.validate()
    client = mlflow_client(options.tracking_uri)
    check_tracking_server(client.tracking_uri)
    out = Path(options.out)
    result = DashboardResult(out=out)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")

    run_id, owned = (_start_run(client, options) if options.log_to_mlflow else (None, False))
    result.run_id = run_id
    try:
        registry_page, loaded = registry.build(client, list(options.models))
        chosen_runs = select_runs(client, experiments=options.experiments, run_ids=options.run_ids,
                                  max_runs=options.max_runs)
        runs_page = runs.build(client, chosen_runs)
        if not options.run_ids:
            missing = [e for e in options.experiments if e not in experiment_ids(client, options.experiments)]
            if missing:
                note = f"experiment(s) not in this tracking store: {', '.join(missing)}"
                runs_page.add(f'<p class="note">{esc(note)}</p>')
                if tuple(options.experiments) != DEFAULT_EXPERIMENTS:  # asked for by name: worth a warning
                    result.notes.append(note)
        refs, notes = find_studies(client, storages=options.storages, names=options.studies)
        result.notes += [n for n in notes if any(w in n for w in ("not found", "cannot be opened", "no such file"))]
        sweeps_page, result.sweep_reports = sweeps.build(refs, notes, out, plotly_js=options.plotly_js)
        predictions_page, gallery_pages = predictions.build(
            client, loaded, max_versions=options.max_versions, max_images=options.max_images, thumb_px=options.thumb_px)
        index_page = index.build(
            tracking_uri=redact(client.tracking_uri), loaded=loaded, n_runs=len(chosen_runs), n_studies=len(refs),
            n_galleries=len(gallery_pages), dashboard_run_id=run_id, notes=result.notes,
            init_pairs=init_vs_scratch.find_pairs(init_vs_scratch.stage2_runs(client, options.experiments)))

        if options.plotly_js == "file":
            write_plotly_file(out)
        for page in (index_page, registry_page, runs_page, sweeps_page, predictions_page, *gallery_pages):
            result.pages[page.path] = page.write(out, plotly_js=options.plotly_js, generated=stamp)
        if run_id:
            _log_pages(client, run_id, out, result, plotly_file=options.plotly_js == "file")
    except BaseException:
        if run_id and owned:
            client.set_terminated(run_id, "FAILED")
        raise
    if run_id and owned:
        client.set_terminated(run_id, "FINISHED")
    return result


def _log_pages(client, run_id: str, out: Path, result: DashboardResult, *, plotly_file: bool) -> None:
    """Each page (and the study reports) as an artifact, under the same relative path."""
    for rel, path in result.pages.items():
        folder = str(Path(rel).parent)
        client.log_artifact(run_id, str(path), None if folder == "." else folder)
    for folder in result.sweep_reports:
        client.log_artifacts(run_id, str(folder), f"sweeps/{folder.name}")
    if plotly_file:
        client.log_artifact(run_id, str(out / PLOTLY_FILE))
