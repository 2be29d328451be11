"""The overview page: the headline comparison and a link with a one-line summary per page."""

from __future__ import annotations

from angioexp.dashboard import init_vs_scratch
from angioexp.dashboard.data import by_alias
from angioexp.dashboard.html import Page, esc
from angioexp.dashboard.registry import CHAMPION, champion_figure, champion_pairs


def build(*, tracking_uri: str, loaded: dict, n_runs: int, n_studies: int, n_galleries: int,
          dashboard_run_id: str | None, notes: list[str], init_pairs: list | None = None) -> Page:
    page = Page("index.html", "Experiment dashboards", f"tracking store {tracking_uri}")
    page.section("stage1-vs-stage2", "Did Stage 2 beat Stage 1?")
    pairs = champion_pairs(loaded)
    if pairs:
        page.figure(champion_figure(pairs), "fig-overview")
        page.add('<p class="note">Details, every version and the per-segment bars: '
                 '<a href="registry.html#champions">Registry</a>.</p>')
    else:
        page.empty("No champion model yet: train Stage 1 (mlflow run . -e train -P stage=1), then Stage 2 "
                   "(-P stage=2); their champions are compared here.")

    init_vs_scratch.build_section(page, init_pairs or [])

    page.section("pages", "Pages")
    champions = ", ".join(
        f"{name} v{by_alias(versions, CHAMPION).version}" for name, versions in loaded.items()
        if by_alias(versions, CHAMPION) is not None) or "none yet"
    n_versions = sum(len(v or []) for v in loaded.values())
    items = [
        ("registry.html", "Registry", f"{n_versions} version(s) of {', '.join(loaded) or 'no model'}; champions: {champions}"),
        ("runs.html", "Runs", f"learning curves, NaN events and params of {n_runs} run(s)"),
        ("sweeps.html", "Sweeps", f"{n_studies} Optuna stud{'y' if n_studies == 1 else 'ies'}, linked to their reports"),
        ("predictions.html", "Predictions", f"{n_galleries} gallery page(s), worst images first"),
    ]
    page.add("<ul>" + "".join(f'<li><a href="{href}"><b>{esc(title)}</b></a> — {esc(text)}</li>'
                              for href, title, text in items) + "</ul>")
    if dashboard_run_id:
        page.add(f'<p class="note">These pages are also artifacts of MLflow run <code>{esc(dashboard_run_id)}</code> '
                 "(experiment angioexp-dashboards).</p>")
    for note in notes:
        page.add(f'<p class="warn">{esc(note)}</p>')
    return page
