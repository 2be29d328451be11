"""Dashboards on stores with little or nothing in them, bad input, and the page-shell helpers.

Real MLflow (a migrated temporary SQLite store per test) and real Optuna storage; no training,
so these run in seconds.
"""

from __future__ import annotations

import html as html_lib
import re
from pathlib import Path

import pytest

from tests.helpers.browser_check import chromium_path, render

from angioexp.dashboard import DashboardOptions, build_dashboards
from angioexp.dashboard.cli import _names
from angioexp.dashboard.data import metric_history, nan_events
from angioexp.dashboard.html import Page, fmt, table
from angioexp.errors import InputError

PAGES = ("index.html", "registry.html", "runs.html", "sweeps.html", "predictions.html")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)  # no optuna.db / optuna-journal.log of the project is picked up


def _read(out: Path, name: str) -> str:
    """A page's text with HTML entities decoded (the pages escape quotes)."""
    return html_lib.unescape((out / name).read_text(encoding="utf-8"))


def test_empty_store_gives_pages_that_say_so(store_uri, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "dash"
    result = build_dashboards(DashboardOptions(out=out))
    assert set(PAGES) <= set(result.pages)
    assert "No champion model yet" in _read(out, "index.html")
    registry = _read(out, "registry.html")
    assert "Registered model 'angio-stage1' does not exist" in registry
    assert "Registered model 'angio-stage2' does not exist" in registry
    assert "No champion to compare" in registry
    assert "No runs to show" in _read(out, "runs.html")
    assert "No Optuna study found" in _read(out, "sweeps.html")
    assert "No registered model version yet" in _read(out, "predictions.html")
    for name in PAGES:  # nothing to draw: no figure and so no 4.8 MB of plotly.js either
        text = _read(out, name)
        assert "Plotly.newPlot" not in text and len(text) < 50_000
    # still logged, FINISHED, in its own experiment (not among the runs it reports on)
    run = MlflowClient(store_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["angioexp.role"] == "dashboard"


def test_model_without_versions_run_without_metrics_and_studies_without_completed_trials(store_uri, tmp_path):
    import optuna
    from mlflow import MlflowClient

    from angioexp.tracking.uri import ensure_experiment

    client = MlflowClient(store_uri)
    client.create_registered_model("angio-stage1")
    client.create_run(ensure_experiment("angioexp-stage1", client), run_name="just-started")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="nothing_yet", storage=storage)
    pruned = optuna.create_study(study_name="all_pruned", storage=storage, direction="maximize")
    trial = pruned.ask({"scratch.lr_scale": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)})
    trial.report(0.1, step=1)
    pruned.tell(trial, state=optuna.trial.TrialState.PRUNED)
    failed = pruned.ask()
    pruned.tell(failed, state=optuna.trial.TrialState.FAIL)

    out = tmp_path / "dash"
    result = build_dashboards(DashboardOptions(out=out, storages=(storage,), log_to_mlflow=False))
    assert "Registered model 'angio-stage1' has no versions" in _read(out, "registry.html")
    runs = _read(out, "runs.html")
    assert "just-started" in runs and "have logged no train/* or val/* metrics yet" in runs
    assert "Only one run chosen" in runs
    sweeps = _read(out, "sweeps.html")
    assert "No completed trial yet in: all_pruned, nothing_yet" in sweeps
    for study in ("all_pruned", "nothing_yet"):
        report = out / "sweeps" / study / "index.html"
        assert report.is_file() and f'href="sweeps/{study}/index.html"' in sweeps
        assert "no completed trial yet" in report.read_text(encoding="utf-8")
    assert sorted(p.name for p in result.sweep_reports) == ["all_pruned", "nothing_yet"]


@pytest.mark.browser
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium, or set ANGIOEXP_CHROMIUM)")
def test_empty_pages_render_without_script_errors(store_uri, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="nothing_yet", storage=storage)
    out = tmp_path / "dash"
    result = build_dashboards(DashboardOptions(out=out, storages=(storage,), log_to_mlflow=False, plotly_js="file"))
    for name in ("index.html", "registry.html", "sweeps.html"):
        assert render(result.pages[name], tmp_path / f"{name}.png") == [], name
    assert render(result.sweep_reports[0] / "index.html", tmp_path / "report.png") == []


def test_bad_input_is_one_clear_line_and_writes_nothing(store_uri, tmp_path, capsys):
    from angioexp.cli import main

    out = tmp_path / "dash"
    assert main(["dashboard", "--out", str(out), "--runs", "0123456789abcdef0123456789abcdef"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--runs" in err and "0123456789abcdef0123456789abcdef" in err
    assert not (out / "index.html").exists()
    assert main(["dashboard", "--out", str(out), "--max-images", "0"]) == 2
    assert "--max-images" in capsys.readouterr().err
    assert main(["dashboard", "--out", str(out), "--thumb-px", "4096", "--no-log"]) == 2
    assert not (out / "index.html").exists()
    with pytest.raises(InputError, match="--plotly-js"):
        build_dashboards(DashboardOptions(out=out, plotly_js="svg"))


def test_missing_or_unopenable_storage_is_reported_not_raised(store_uri, tmp_path, capsys):
    from angioexp.cli import main

    out = tmp_path / "dash"
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    assert main(["dashboard", "--out", str(out), "--no-log", "--storage", missing, "--study", "ghost"]) == 0
    printed = capsys.readouterr().out
    assert "no such file" in printed and "study 'ghost' was not found" in printed
    sweeps = _read(out, "sweeps.html")
    assert "nope.db: no such file" in sweeps and "No Optuna study found" in sweeps
    assert not (tmp_path / "nope.db").exists()  # looking never creates an empty database


def test_metric_history_is_thinned_and_nan_events_fall_back_to_the_counter(store_uri):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from angioexp.tracking.uri import ensure_experiment

    client = MlflowClient(store_uri)
    run_id = client.create_run(ensure_experiment("angioexp-stage1", client)).info.run_id
    client.log_batch(run_id, metrics=[Metric("train/loss", 1.0 / s, 0, s) for s in range(1, 1001)])
    client.log_batch(run_id, metrics=[Metric("train/loss", float("nan"), 0, 1001)])
    series = metric_history(client, run_id, "train/loss", max_points=100)
    assert len(series) == 100 and series[0] == (1, 1.0) and series[-1][0] == 1000  # NaN dropped, ends kept
    assert [s for s, _ in series] == sorted(s for s, _ in series)

    counts = [(10, 0.0), (20, 0.0), (30, 1.0), (40, 1.0), (50, 3.0)]
    client.log_batch(run_id, metrics=[Metric("train/nan_events", v, 0, s) for s, v in counts])
    events = nan_events(client, client.get_run(run_id))  # no nan_events.json: from the counter
    assert [e["step"] for e in events] == [30, 50]
    assert "2 event(s)" in events[1]["action"]


def test_page_shell_tables_and_formatting(tmp_path):
    html = table(["name", "value"], [["<b>x</b>", 0.05], ["y", float("nan")], ["z", 0.5]], table_id="t")
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html  # escaped
    assert 'data-v="0.05"' in html and 'class="sortable"' in html and 'id="t"' in html
    assert fmt(float("nan")) == "" and fmt(None) == "" and fmt(0.123456) == "0.1235" and fmt(True) == "True"

    page = Page("predictions/x.html", "A <gallery>")
    text = page.render()
    assert 'href="../index.html"' in text and "A &lt;gallery&gt;" in text
    assert "<script type=\"text/javascript\">" not in text  # no figure: no plotly.js
    path = page.write(tmp_path)
    assert path == tmp_path / "predictions" / "x.html" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    import plotly.graph_objects as go

    figured = Page("runs.html", "Runs").figure(go.Figure(go.Scatter(x=[1], y=[2])), "fig-a")
    assert re.search(r'<script src="plotly\.min\.js"', figured.render(plotly_js="file"))
    assert "cdn.plot.ly/plotly-" in figured.render(plotly_js="cdn")
    assert len(figured.render(plotly_js="inline")) > 1_000_000


def test_option_lists_accept_repeats_and_commas():
    assert _names(["a,b", " c ", "a", ""]) == ("a", "b", "c")
    assert _names(None) == ()


def test_stage2_starting_point_is_shown_when_stage1_champion_moved_on():
    from angioexp.dashboard.data import VersionInfo
    from angioexp.dashboard.registry import champion_pairs

    def version(name, number, aliases, **tags):
        return VersionInfo(name=name, version=str(number), aliases=aliases, created_ms=None, run_id=None, run=None,
                           model_id=None, tags=tags, metrics={"val/dice": 0.1 * number})

    s1 = [version("angio-stage1", 3, ["champion"]), version("angio-stage1", 2, []), version("angio-stage1", 1, [])]
    s2 = [version("angio-stage2", 1, ["champion"], **{"init_from.version": "angio-stage1/2"})]
    labels = [label for label, _ in champion_pairs({"angio-stage1": s1, "angio-stage2": s2})]
    assert labels == ["angio-stage1@champion (v3)", "angio-stage2@champion (v1)",
                      "angio-stage1 v2 (Stage 2's starting point)"]
    s2[0].tags["init_from.version"] = "angio-stage1/3"  # started from the current champion: no third bar
    assert len(champion_pairs({"angio-stage1": s1, "angio-stage2": s2})) == 2
    assert [label for label, _ in champion_pairs({"angio-stage1": s1, "angio-stage2": None})] == ["angio-stage1@champion (v3)"]


def test_unknown_experiment_is_noted(store_uri, tmp_path, capsys):
    from angioexp.cli import main

    assert main(["dashboard", "--out", str(tmp_path / "d"), "--no-log", "--experiment", "angioexp-stage9"]) == 0
    assert "experiment(s) not in this tracking store: angioexp-stage9" in capsys.readouterr().out
    assert "angioexp-stage9" in _read(tmp_path / "d", "runs.html")
