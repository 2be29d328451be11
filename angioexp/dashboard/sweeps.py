"""Sweeps page: every Optuna study found, its outcome counts, and links into its report.

The per-study figures (optimisation history, parallel coordinates, importances, intermediate
values, NaN map, Pareto front) are the sweep report of :mod:`angioexp.sweep.report`, generated
here through its own ``build_report`` into ``<out>/sweeps/<study>/index.html`` (where
``angioexp sweep-report`` writes it too) and linked by section anchor — not drawn twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from angioexp.dashboard.data import StudyRef
from angioexp.dashboard.html import PLOTLY_FILE, Cell, Page, cdn_url, esc, table

log = logging.getLogger(__name__)

SWEEP_DIR = "sweeps"


def _report_section_links(study, href: str) -> str:
    from angioexp.sweep.report import SECTIONS

    multi = len(study.directions) > 1
    links = [f'<a href="{href}#{key}">{esc(title.split(":")[0])}</a>' for key, title in SECTIONS if key != "pareto" or multi]
    links.append(f'<a href="{href}#trials">trials</a>')
    return " · ".join(links)


def write_study_report(study, out_dir: Path, plotly_js: str) -> Path:
    """H7's report for ``study`` under ``out_dir/sweeps/<study>/``; plotly.js as the dashboards load it.

    The report module knows 'inline' and 'cdn'; for 'file' and 'cdn' its CDN tag is swapped for
    ours (the relative ``../../plotly.min.js``, or a CDN URL with plotly.js's own version).
    """
    from angioexp.fileio import atomic_file
    from angioexp.sweep import report

    page = report.build_report(study, out_root=Path(out_dir) / SWEEP_DIR,
                               plotly_js="inline" if plotly_js == "inline" else "cdn")
    if plotly_js != "inline":
        their_tag = report._plotly_script("cdn")
        ours = (f'<script src="../../{PLOTLY_FILE}" charset="utf-8"></script>' if plotly_js == "file"
                else f'<script src="{cdn_url()}" charset="utf-8"></script>')
        text = page.read_text(encoding="utf-8")
        if their_tag in text:
            with atomic_file(page, "w", encoding="utf-8") as handle:
                handle.write(text.replace(their_tag, ours, 1))
        else:
            log.warning("sweep report %s: plotly.js tag not recognised; left as the report wrote it", page)
    return page


def outcomes_figure(refs: list[StudyRef]):
    """Stacked bars: trials per outcome (complete, pruned, nan, crash, oom, …) per study."""
    import plotly.graph_objects as go

    from angioexp.sweep.report import OUTCOME_COLOURS, outcome_of

    counts: dict[str, dict[str, int]] = {}
    for ref in refs:
        for trial in ref.study.get_trials(deepcopy=False):
            outcome = outcome_of(trial)
            counts.setdefault(outcome, {}).setdefault(ref.name, 0)
            counts[outcome][ref.name] += 1
    fig = go.Figure()
    names = [r.name for r in refs]
    order = [o for o in OUTCOME_COLOURS if o in counts] + sorted(set(counts) - set(OUTCOME_COLOURS))
    for outcome in order:
        fig.add_trace(go.Bar(name=outcome, x=names, y=[counts[outcome].get(n, 0) for n in names],
                             marker_color=OUTCOME_COLOURS.get(outcome, "#333333"),
                             hovertemplate="%{x}: %{y} " + outcome + "<extra></extra>"))
    fig.update_layout(barmode="stack", height=360, margin=dict(l=50, r=20, t=50, b=60),
                      title="Trials by outcome (nan = diverged, pruned by the NaN guard)", yaxis_title="trials")
    return fig


def _best(study) -> tuple[str, str]:
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return "", "no completed trial yet"
    if len(study.directions) > 1:
        return "", f"{len(study.best_trials)} trial(s) on the Pareto front"
    best = study.best_trial
    return best.value, f"trial {best.number}"


def build(refs: list[StudyRef], notes: list[str], out_dir: Path, *, plotly_js: str) -> tuple[Page, list[Path]]:
    """The sweeps page and the study report pages it links (written under ``out_dir``)."""
    from angioexp.sweep.report import outcome_of

    page = Page("sweeps.html", "Sweeps", "Optuna studies: outcomes, best trials, report pages")
    written: list[Path] = []
    loaded = [r for r in refs if r.study is not None]
    if not refs:
        page.empty("No Optuna study found. Run a sweep (python -m angioexp.sweep --space sweeps/stage1_nan.yaml) "
                   "or pass --storage URL / --study NAME.")
    if loaded:
        page.section("outcomes", "Outcomes")
        page.figure(outcomes_figure(loaded), "fig-outcomes")
    if refs:
        page.section("studies", "Studies")
        rows = []
        for ref in refs:
            parent = ref.parent_run
            parent_cell = Cell(f"<code>{esc(parent.info.run_id)}</code>" if parent is not None else "")
            if ref.study is None:
                counts = {k[len("sweep/"):]: int(v) for k, v in (parent.data.metrics.items() if parent else [])
                          if k.startswith("sweep/") and not k.startswith("sweep/best")}
                rows.append([ref.name, Cell(f"<code>{esc(ref.storage)}</code>"), "", "",
                             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), "", "",
                             Cell(f'<span class="warn">{esc(ref.error)}</span>'), parent_cell])
                continue
            study = ref.study
            try:
                path = write_study_report(study, out_dir, plotly_js)
                written.append(path.parent)
                href = f"{SWEEP_DIR}/{path.parent.name}/index.html"
                links = Cell(f'<a href="{href}"><b>report</b></a>: {_report_section_links(study, href)}')
            except Exception as exc:  # noqa: BLE001 - one study must not sink the page
                log.warning("sweep report for %s failed: %s", ref.name, exc)
                links = Cell(f'<span class="warn">report failed: {esc(type(exc).__name__)}: {esc(str(exc))[:300]}</span>')
            trials = study.get_trials(deepcopy=False)
            outcomes: dict[str, int] = {}
            for t in trials:
                outcomes[outcome_of(t)] = outcomes.get(outcome_of(t), 0) + 1
            objective = study.user_attrs.get("angioexp.objective") or []
            directions = [d.name.lower() for d in study.directions]
            best_value, best_text = _best(study)
            rows.append([
                ref.name, Cell(f"<code>{esc(ref.storage)}</code>"),
                ", ".join(f"{m} ({d})" for m, d in zip(objective, directions)) if objective else ", ".join(directions),
                len(trials), ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "no trials yet",
                best_value, best_text, links, parent_cell,
            ])
        page.add(table(["study", "storage", "objective", "trials", "outcomes", "best value", "best", "report",
                        "MLflow parent run"], rows, table_id="studies"))
        empty = [r.name for r in loaded if not any(t.state.name == "COMPLETE" for t in r.study.get_trials(deepcopy=False))]
        if empty:
            page.empty(f"No completed trial yet in: {', '.join(empty)} — their reports say which figures need one.")
    if notes:
        page.add('<p class="note">Looked in: ' + "; ".join(esc(n) for n in notes) + "</p>")
    return page, written
