"""The sweep report: every section drawn (or explained when it can't be), offline HTML that
opens in headless Chromium without console errors, and the ``angioexp sweep-report`` command.

Studies are real Optuna studies in SQLite, filled with ``study.add_trial`` records shaped like
the ones the sweep writes (outcome / failure attrs, intermediate values)."""

from __future__ import annotations

import csv
import json
import re

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from tests.helpers.browser_check import chromium_path, plot_area_not_blank, render

from angioexp.cli import main as angioexp_main
from angioexp.sweep.report import RESCUED, build_report, report_figures

DISTS = {
    "scratch.lr_scale": FloatDistribution(1e-3, 1e3, log=True),
    "loss.masks.loss_mask": FloatDistribution(1.0, 1000.0, log=True),
    "optim.gradient_clip.max_norm": CategoricalDistribution([None, 0.1, 1.0]),
}


def _study(storage: str, name: str, *, directions=("maximize",), trials: bool = True) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, directions=list(directions))
    study.set_user_attr("angioexp.objective", ["val/AP75_tol", "val/cldice"][: len(directions)])
    if not trials:
        return study
    for i in range(10):
        lr = 10 ** (-2.5 + 0.5 * i)
        params = {"scratch.lr_scale": lr, "loss.masks.loss_mask": 5.0 * (1.7**i), "optim.gradient_clip.max_norm": [None, 0.1, 1.0][i % 3]}
        diverged = lr > 2.0
        attrs = {"cfg.scratch.lr_scale": lr, "cfg.loss.masks.loss_mask": params["loss.masks.loss_mask"]}
        if diverged:
            attrs.update(outcome="nan", failure="nan", step=7, lr=lr * 8e-4, events=5)
            study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=DISTS, user_attrs=attrs))
            continue
        score = 0.6 - abs(i - 3) * 0.08
        values = [score, 0.5 + 0.03 * i][: len(directions)]
        attrs.update(outcome="complete", metrics={"val/AP75_tol": score, "val/AP75": score / 5, "val/dice": 0.8},
                     nan_events=3 if i == 4 else 0)  # trial 4: the guard skipped steps, the run recovered
        intermediate = {20: score * 0.5, 40: score * 0.8, 60: score} if len(directions) == 1 else None
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=values, params=params, distributions=DISTS,
                                     user_attrs=attrs, intermediate_values=intermediate))
    study.add_trial(create_trial(state=TrialState.FAIL, params=params, distributions=DISTS,
                                 user_attrs={"outcome": "crash", "failure": "crash", "error": "RuntimeError: boom <script>"}))
    return study


def test_report_has_every_section_and_an_offline_plotly(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = _study(storage, "single")
    page = build_report(study, out_root=tmp_path / "dash")
    html = page.read_text(encoding="utf-8")
    for div in ("fig-history", "fig-parallel", "fig-importances", "fig-intermediate", "fig-nan-map"):
        assert f'id="{div}"' in html, div
    assert 'id="fig-pareto"' not in html  # single objective
    assert "<script src=" not in html and "Plotly" in html  # plotly.js inline: opens offline
    assert "&lt;script&gt;" in html and "boom <script>" not in html  # trial text is escaped
    nan_map = report_figures(study)["nan-map"]
    names = {trace.name.split(" ")[0] for trace in nan_map.data}
    assert {"complete", "nan"} <= names  # (the crashed trial has no lr_scale attr → not placed)
    rescued = [trace for trace in nan_map.data if trace.name.startswith(RESCUED)]
    assert len(rescued) == 1 and len(rescued[0].x) == 1 and "nan_events 3" in rescued[0].text[0]
    with open(page.parent / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11 and [r["outcome"] for r in rows].count("nan") == 4
    summary = json.loads((page.parent / "summary.json").read_text())
    assert summary["outcomes"] == {"complete": 6, "nan": 4, "crash": 1} and summary["best"]["number"] == 3


def test_empty_and_multi_objective_studies(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    empty = build_report(_study(storage, "empty", trials=False), out_root=tmp_path / "dash").read_text()
    assert "no completed trial yet" in empty and "no trials yet" in empty
    multi = build_report(_study(storage, "multi", directions=("maximize", "maximize")), out_root=tmp_path / "dash").read_text()
    assert 'id="fig-pareto"' in multi and "cannot prune them" in multi
    cdn = build_report(_study(storage, "cdn", trials=False), out_root=tmp_path / "dash2", plotly_js="cdn").read_text()
    assert re.search(r'<script src="https://cdn\.plot\.ly/plotly-[\d.]+\.min\.js"', cdn)


def test_sweep_report_command(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    _study(storage, "cli")
    assert angioexp_main(["sweep-report", "--study", "cli", "--storage", storage, "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "cli" / "index.html").is_file()
    assert angioexp_main(["sweep-report", "--study", "nope", "--storage", storage, "--out", str(tmp_path / "d")]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium, or set ANGIOEXP_CHROMIUM)")
def test_report_opens_in_headless_chromium_without_errors(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    page = build_report(_study(storage, "browser"), out_root=tmp_path / "dash")
    errors = render(page, tmp_path / "report.png")
    assert errors == []
    assert plot_area_not_blank(tmp_path / "report.png")
    multi = build_report(_study(storage, "multi", directions=("maximize", "maximize")), out_root=tmp_path / "dash")
    assert render(multi, tmp_path / "multi.png") == []
    # the helper does catch script errors (so the assertions above can fail)
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('x'); notDefined();</script></body></html>")
    problems = render(bad, tmp_path / "bad.png")
    assert any("notDefined" in p for p in problems) and any("console.error" in p for p in problems)
    assert not plot_area_not_blank(tmp_path / "bad.png")
