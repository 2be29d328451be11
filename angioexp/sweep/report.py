"""``angioexp sweep-report --study NAME``: a self-contained plotly HTML report of a study.

Writes ``dashboards/sweeps/<study>/index.html`` (one page; plotly.js inline by default so it
opens offline), ``trials.csv`` and ``summary.json``. Sections (``#id`` anchors the dashboards
link to): ``history`` (optimisation history), ``parallel`` (parallel coordinates),
``importances`` (fANOVA parameter importances), ``intermediate`` (the values the pruner saw),
``pareto`` (multi-objective only), ``nan-map`` (lr_scale × loss_mask coloured by outcome) and
``trials`` (every trial with its outcome and failure record). A section that cannot be drawn
yet (e.g. no completed trial) says why instead of failing.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import math
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from angioexp.errors import InputError
from angioexp.fileio import atomic_dir, local_store_file, refuse_output_over_inputs

log = logging.getLogger(__name__)

# NaN map only: a completed run in which the NaN guard skipped steps (and perhaps backed the LR off)
RESCUED = "complete, guard stepped in"
OUTCOME_COLOURS = {
    "complete": "#2ca02c", "pruned": "#1f77b4", "nan": "#d62728", "crash": "#7f7f7f",
    "oom": "#9467bd", "killed": "#ff7f0e", "running": "#bcbd22", "waiting": "#17becf",
    RESCUED: "#8c564b",
}
SECTIONS = (
    ("history", "Optimisation history"),
    ("parallel", "Parallel coordinates"),
    ("importances", "Parameter importances"),
    ("intermediate", "Intermediate values (what the pruner saw)"),
    ("pareto", "Pareto front"),
    ("nan-map", "NaN map: lr_scale × loss_mask by outcome"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///optuna.db, else ./optuna-journal.log)")
    parser.add_argument("--out", default="dashboards/sweeps", help="the report goes to OUT/<study>/index.html")
    parser.add_argument("--plotly-js", choices=["inline", "cdn"], default="inline",
                        help="inline (works offline, ~4 MB) or a CDN <script> tag")


def run(args: argparse.Namespace) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    refuse_output_over_inputs(args.out, [local_store_file(args.storage)])
    study = load_study_for_report(args.study, args.storage)
    out = build_report(study, out_root=Path(args.out), plotly_js=args.plotly_js)
    print(f"report → {out}")
    return 0


def load_study_for_report(name: str, storage: str | None) -> optuna.Study:
    from angioexp.sweep.storage import DEFAULT_JOURNAL, DEFAULT_SQLITE, open_storage

    candidates = [storage] if storage else [DEFAULT_SQLITE, DEFAULT_JOURNAL]
    for url in candidates:
        if url == DEFAULT_JOURNAL and not Path(url).exists():
            continue
        if url == DEFAULT_SQLITE and not storage and not Path("optuna.db").exists():
            continue
        handle = open_storage(url, workers=1 if url.startswith("sqlite") else 2)
        try:
            return optuna.load_study(study_name=name, storage=handle.storage)
        except KeyError:
            continue
    where = storage or f"{DEFAULT_SQLITE} / {DEFAULT_JOURNAL}"
    raise InputError(f"no study named '{name}' in {where}")


# ---------------------------------------------------------------------------------------------
# Figures


def outcome_of(trial: FrozenTrial) -> str:
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.state == TrialState.WAITING:
        return "waiting"
    if "outcome" in trial.user_attrs:
        return str(trial.user_attrs["outcome"])
    return {"COMPLETE": "complete", "PRUNED": "pruned"}.get(trial.state.name, "killed")


def _metrics(study: optuna.Study) -> list[str]:
    stored = study.user_attrs.get("angioexp.objective")
    if stored:
        return list(stored)
    return [f"objective {i}" for i in range(len(study.directions))]


def report_figures(study: optuna.Study) -> dict[str, object]:
    """Section id → plotly Figure, or a string saying why the section is empty."""
    from optuna import visualization as vis

    metrics = _metrics(study)
    multi = len(study.directions) > 1
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    out: dict[str, object] = {}

    def attempt(key: str, make, need: int = 1, why: str = "no completed trial yet"):
        if len(complete) < need:
            out[key] = why
            return
        try:
            fig = make()
            fig.update_layout(height=460, margin=dict(l=60, r=30, t=50, b=50))
            out[key] = fig
        except Exception as exc:  # noqa: BLE001 - one figure must not sink the report
            out[key] = f"could not draw this figure: {type(exc).__name__}: {exc}"

    first = (lambda t: t.values[0]) if multi else None
    kw = {"target": first, "target_name": metrics[0]} if multi else {"target_name": metrics[0]}
    attempt("history", lambda: vis.plot_optimization_history(study, **kw))
    attempt("parallel", lambda: vis.plot_parallel_coordinate(study, **kw))
    attempt("importances", lambda: vis.plot_param_importances(study, **kw), need=2,
            why="importances need at least two completed trials")
    if multi:
        out["intermediate"] = "multi-objective trials report no intermediate values (Optuna cannot prune them)"
        attempt("pareto", lambda: vis.plot_pareto_front(study, target_names=metrics))
    else:
        if any(t.intermediate_values for t in trials):
            attempt("intermediate", lambda: vis.plot_intermediate_values(study), need=0)
        else:
            out["intermediate"] = "no trial has reported an intermediate value yet"
        out["pareto"] = "single-objective study: no Pareto front"
    out["nan-map"] = nan_map_figure(trials) if trials else "no trials yet"
    return out


def nan_map_figure(trials: list[FrozenTrial]):
    """Scatter of the effective lr_scale × loss_mask of every trial, one colour per outcome."""
    import plotly.graph_objects as go

    fig = go.Figure()
    by_outcome: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        outcome = outcome_of(t)
        if outcome == "complete" and (t.user_attrs.get("nan_events") or 0) > 0:
            outcome = RESCUED
        by_outcome.setdefault(outcome, []).append(t)
    for outcome, group in sorted(by_outcome.items()):
        xs, ys, texts = [], [], []
        for t in group:
            x = _effective(t, "scratch.lr_scale")
            y = _effective(t, "loss.masks.loss_mask")
            if x is None or y is None:
                continue
            xs.append(x)
            ys.append(y)
            detail = [f"trial {t.number}: {outcome}"]
            if t.values:
                detail.append("values " + ", ".join(f"{v:.4g}" for v in t.values))
            for key in ("step", "lr", "events", "nan_events", "pruned_at_step", "error"):
                if t.user_attrs.get(key) is not None and not (key == "nan_events" and not t.user_attrs[key]):
                    detail.append(f"{key} {t.user_attrs[key]}")
            texts.append("<br>".join(html.escape(str(d))[:200] for d in detail))
        if xs:
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers", name=f"{outcome} ({len(xs)})", text=texts, hoverinfo="text",
                marker=dict(size=11, color=OUTCOME_COLOURS.get(outcome, "#333333"), line=dict(width=1, color="#222")),
            ))
    fig.update_xaxes(type="log", title="scratch.lr_scale")
    fig.update_yaxes(type="log", title="loss.masks.loss_mask")
    fig.update_layout(title="Where training diverges: lr_scale × loss_mask by outcome", height=460,
                      margin=dict(l=60, r=30, t=50, b=50), legend_title="outcome")
    return fig


def _effective(trial: FrozenTrial, key: str) -> float | None:
    value = trial.params.get(key, trial.user_attrs.get(f"cfg.{key}"))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


# ---------------------------------------------------------------------------------------------
# Tables and page


TABLE_COLUMNS = ("number", "state", "outcome", "values", "params", "metrics", "failure", "detail", "duration_s")


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        detail = {k: a[k] for k in ("step", "lr", "events", "pruned_at_step", "error") if a.get(k) is not None}
        if "failed_trial" in t.system_attrs:
            detail["retry_of"] = t.system_attrs["failed_trial"]
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({
            "number": t.number, "state": t.state.name, "outcome": outcome_of(t),
            "values": json.dumps(t.values) if t.values else "",
            "params": json.dumps(t.params, default=str), "metrics": json.dumps(a.get("metrics") or {}),
            "failure": a.get("failure", ""), "detail": json.dumps(detail, default=str) if detail else "",
            "duration_s": f"{duration:.1f}" if duration is not None else "",
        })
    return rows


def summary_of(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[outcome_of(t)] = counts.get(outcome_of(t), 0) + 1
    summary = {
        "study": study.study_name, "directions": [d.name.lower() for d in study.directions],
        "objective": _metrics(study), "trials": len(trials), "outcomes": counts,
        "n_trials_requested": study.user_attrs.get("angioexp.n_trials"),
        "mlflow_parent_run_id": study.user_attrs.get("angioexp.mlflow_parent_run_id"),
        "registered": study.user_attrs.get("angioexp.registered_version"),
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and len(study.directions) == 1:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "metrics": best.user_attrs.get("metrics", {})}
    elif complete:
        summary["pareto"] = [{"number": t.number, "values": t.values, "params": t.params} for t in study.best_trials]
    return summary


def _plotly_script(mode: str) -> str:
    from plotly.offline import get_plotlyjs
    from plotly.offline.offline import get_plotlyjs_version

    if mode == "cdn":
        # the CDN file is versioned by plotly.js, not by the plotly Python package
        return f'<script src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js" charset="utf-8"></script>'
    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def render_html(study: optuna.Study, *, plotly_js: str = "inline") -> str:
    figures = report_figures(study)
    summary = summary_of(study)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Sweep {esc(study.study_name)}</title>",
        "<style>body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;color:#222}"
        "section{margin:28px 0}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;max-width:420px;overflow-wrap:anywhere}"
        "th{background:#f3f3f3}.empty{color:#777;font-style:italic}nav a{margin-right:12px}</style>",
        _plotly_script(plotly_js), "</head><body>",
        f"<h1>Optuna study <code>{esc(study.study_name)}</code></h1>",
        "<p>" + esc(
            f"objective: {', '.join(f'{m} ({d})' for m, d in zip(summary['objective'], summary['directions']))}; "
            f"{summary['trials']} trials: " + ", ".join(f"{k} {v}" for k, v in sorted(summary['outcomes'].items()))
        ) + "</p>",
    ]
    if "best" in summary:
        b = summary["best"]
        parts.append(f"<p><b>best</b>: trial {b['number']}, {esc(summary['objective'][0])} = {b['value']:.4g}; "
                     f"<code>{esc(json.dumps(b['params'], default=str))}</code></p>")
    if summary.get("mlflow_parent_run_id"):
        parts.append(f"<p>MLflow parent run: <code>{esc(summary['mlflow_parent_run_id'])}</code>"
                     + (f"; registered: <code>{esc(str(summary['registered']))}</code>" if summary.get("registered") else "") + "</p>")
    sections = [(k, t) for k, t in SECTIONS if k != "pareto" or len(study.directions) > 1]
    parts.append("<nav>" + "".join(f'<a href="#{k}">{esc(t)}</a>' for k, t in sections) + '<a href="#trials">Trials</a></nav>')
    for key, title in sections:
        item = figures.get(key, "not available")
        parts.append(f'<section id="{key}"><h2>{esc(title)}</h2>')
        if isinstance(item, str):
            parts.append(f'<p class="empty">{esc(item)}</p>')
        else:
            parts.append(item.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{key}"))
        parts.append("</section>")
    rows = trial_rows(study)
    parts.append('<section id="trials"><h2>Trials</h2>')
    if rows:
        parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in TABLE_COLUMNS) + "</tr>")
        for r in rows:
            colour = OUTCOME_COLOURS.get(r["outcome"], "#333")
            cells = "".join(
                f'<td style="color:{colour}">{esc(str(r[c]))}</td>' if c == "outcome" else f"<td>{esc(str(r[c]))}</td>"
                for c in TABLE_COLUMNS
            )
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    else:
        parts.append('<p class="empty">no trials yet</p>')
    parts.append("</section></body></html>")
    return "\n".join(parts)


def build_report(study: optuna.Study, *, out_root: Path = Path("dashboards/sweeps"), plotly_js: str = "inline") -> Path:
    """Write the report folder atomically; returns the path of its index.html."""
    page = render_html(study, plotly_js=plotly_js)
    rows = trial_rows(study)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(TABLE_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    final = Path(out_root) / _safe_name(study.study_name)
    with atomic_dir(final, overwrite=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be read
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "trials.csv").write_text(buffer.getvalue(), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary_of(study), indent=2, default=str), encoding="utf-8")
    return final / "index.html"


def _safe_name(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return safe or "study"
