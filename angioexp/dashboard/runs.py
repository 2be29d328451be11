"""Runs page: learning curves of chosen runs overlaid, NaN events on the curves, params diff.

One small-multiple per metric (every ``train/*`` loss term, grad norm, lr, NaN counters, and
the headline ``val/*`` metrics); one colour per run across all of them, and clicking a run in
the legend hides it everywhere. Non-finite steps (the NaN guard's events) are red ✕ markers on
each training curve at that step, and a timeline of all events per run follows with their
kind, action and learning rate — which run went NaN, when, and at what lr.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json
import math

from angioexp.dashboard.data import HEADLINE, metric_history, nan_events, run_label, run_url
from angioexp.dashboard.html import Cell, Page, esc, table

# train/* keys drawn first, in this order; other train/* keys (loss terms) follow sorted.
TRAIN_FIRST = ("train/loss",)
TRAIN_LAST = ("train/grad_norm", "train/lr", "train/lr_factor", "train/nan_events", "train/nan_restores",
              "train/images_per_s")
LOG_Y = ("train/loss", "train/grad_norm")  # plus every train/loss_* term
# Params that differ between any two runs by construction: leaving them out keeps the diff readable.
NOISY_PARAMS = {"train.out_dir", "init.source"}
SUMMARY_TAGS = ("stage", "backend", "dataset.digest", "git.sha", "lineage", "sweep.study", "angioexp.stopped_reason")
COLUMNS = 3
MAX_MARKERS = 300  # NaN markers per run and panel (a run NaN for thousands of steps stays a small page)
MAX_TIMELINE = 3000  # events on the timeline in all
ROW_PX = 210  # height of one row of small multiples


def curve_keys(runs) -> list[str]:
    """Metric keys to draw: every train/* key and the headline val/* keys any run has."""
    present = set()
    for run in runs:
        present |= set(run.data.metrics)
    train = [k for k in present if k.startswith("train/")]
    middle = sorted(k for k in train if k not in TRAIN_FIRST and k not in TRAIN_LAST)
    ordered = [k for k in TRAIN_FIRST if k in present] + middle + [k for k in TRAIN_LAST if k in present]
    return ordered + [k for k in HEADLINE if k in present]


def _colour(i: int) -> str:
    import plotly.express as px

    palette = px.colors.qualitative.D3 + px.colors.qualitative.Dark24
    return palette[i % len(palette)]


def _value_at(series: list[tuple[int, float]], step: int) -> float | None:
    """The curve's value at ``step`` (last logged point at or before it, else the first after)."""
    if not series:
        return None
    steps = [s for s, _ in series]
    i = bisect.bisect_right(steps, step) - 1
    return series[max(i, 0)][1]


def curves_figure(runs, histories: dict[str, dict[str, list]], events: dict[str, list[dict]], keys: list[str]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = max(1, math.ceil(len(keys) / COLUMNS))
    height = 60 + ROW_PX * rows
    fig = make_subplots(rows=rows, cols=COLUMNS, subplot_titles=keys, horizontal_spacing=0.06,
                        vertical_spacing=min(0.3, 60 / height))  # ~60 px between rows, for the titles
    for i, run in enumerate(runs):
        run_id, label, colour = run.info.run_id, run_label(run), _colour(i)
        shown = False
        for k, key in enumerate(keys):
            series = histories[run_id].get(key) or []
            if not series:
                continue
            row, col = k // COLUMNS + 1, k % COLUMNS + 1
            is_val = key.startswith("val/")
            fig.add_trace(go.Scatter(
                x=[s for s, _ in series], y=[_round(v) for _, v in series], name=label, legendgroup=run_id,
                showlegend=not shown, mode="lines+markers" if is_val or len(series) < 3 else "lines",
                line=dict(color=colour, width=1.6), marker=dict(size=5, color=colour),
                hovertemplate=f"{esc(label)}<br>{esc(key)}<br>step %{{x}}: %{{y:.4g}}<extra></extra>",
            ), row=row, col=col)
            shown = True
            run_events = events.get(run_id) or []
            if run_events and key.startswith("train/"):
                # the step only: the details (kind, action, lr) are on the timeline, once per event
                xs = sorted({int(e["step"]) for e in run_events})[:MAX_MARKERS]
                fig.add_trace(go.Scatter(
                    x=xs, y=[_round(_value_at(series, x)) for x in xs], name=f"NaN events: {label}", legendgroup=run_id,
                    showlegend=False, mode="markers",
                    marker=dict(symbol="x", size=10, color="#d62728", line=dict(width=1, color="#7a0000")),
                    hovertemplate=f"{esc(label)}<br>non-finite step %{{x}}<extra></extra>",
                ), row=row, col=col)
    for k, key in enumerate(keys):
        row, col = k // COLUMNS + 1, k % COLUMNS + 1
        if key in LOG_Y or key.startswith("train/loss_"):
            positive = all(v > 0 for h in histories.values() for _, v in h.get(key) or [])
            if positive:
                fig.update_yaxes(type="log", row=row, col=col)
        fig.update_xaxes(title_text="step" if row == rows else None, row=row, col=col)
    fig.update_annotations(font_size=11)
    legend_rows = math.ceil(len(runs) / 6)  # horizontal legend above the panels, clear of their titles
    top = 30 + 22 * legend_rows
    height += top
    fig.update_layout(height=height, margin=dict(l=50, r=20, t=top, b=40),
                      legend=dict(orientation="h", y=1.0 + 28 / (height - top - 40), yanchor="bottom"))
    return fig


def _round(value: float) -> float:
    """4 significant digits: a curve drawn from 17-digit floats costs 3× the page size."""
    return float(f"{value:.4g}")


def _event_text(label: str, event: dict) -> str:
    parts = [f"<b>{esc(label)}</b>", f"step {event.get('step')}"]
    for key in ("kind", "action", "lr", "detail"):
        value = event.get(key)
        if value is not None:
            parts.append(f"{key}: {esc(f'{value:.3g}' if isinstance(value, float) else str(value))[:160]}")
    return "<br>".join(parts)


def nan_timeline(runs, events: dict[str, list[dict]]):
    """Scatter: step × run, one marker per non-finite step, coloured by the guard's action."""
    import plotly.graph_objects as go

    colours = {"skip": "#ff7f0e", "restore": "#d62728", "diverged": "#7a0000"}
    by_action: dict[str, tuple[list, list, list]] = {}
    for run in runs:
        label = run_label(run)
        for e in (events.get(run.info.run_id) or [])[:MAX_TIMELINE // max(1, len(runs))]:
            action = str(e.get("action", "event"))
            xs, ys, texts = by_action.setdefault(action, ([], [], []))
            xs.append(int(e["step"]))
            ys.append(label)
            texts.append(_event_text(label, e))
    fig = go.Figure()
    for action, (xs, ys, texts) in sorted(by_action.items()):
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=action, text=texts, hoverinfo="text",
                                 marker=dict(symbol="x", size=11, color=colours.get(action, "#9467bd"))))
    labels = {run_label(r) for r in runs if events.get(r.info.run_id)}
    fig.update_layout(height=140 + 28 * len(labels), margin=dict(l=200, r=20, t=40, b=40),
                      title="Non-finite steps by run (NaN guard events)", xaxis_title="step",
                      yaxis=dict(type="category"))
    return fig


def _short(run) -> str:
    label = run_label(run)
    return label if len(label) <= 28 else label[:27] + "…"


def summary_table(runs, events, experiment_names: dict[str, str], tracking_uri: str = "") -> str:
    columns = ["run", "experiment", "status", "started", *SUMMARY_TAGS, "steps", "NaN events", "restores",
               "val/AP75_tol", "val/AP75", "val/dice", "val/cldice"]
    rows = []
    for run in runs:
        t, m = run.data.tags, run.data.metrics
        started = _dt.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M") if run.info.start_time else ""
        n_events = len(events.get(run.info.run_id) or [])
        rows.append([
            Cell(f"{_linked(run, tracking_uri)}<br><code>{esc(run.info.run_id)}</code>", run_label(run)),
            experiment_names.get(run.info.experiment_id, run.info.experiment_id), run.info.status, started,
            *(t.get(k, "")[:12] if k in ("git.sha", "dataset.digest") else t.get(k, "") for k in SUMMARY_TAGS),
            m.get("summary/steps"),
            Cell(esc(str(n_events)), n_events, "num diff" if n_events else "num"),
            m.get("summary/restores"),
            m.get("val/AP75_tol"), m.get("val/AP75"), m.get("val/dice"), m.get("val/cldice"),
        ])
    return table(columns, rows, table_id="runs-summary")


def _linked(run, tracking_uri: str) -> str:
    url = run_url(tracking_uri, run)
    return f'<a href="{esc(url)}">{esc(run_label(run))}</a>' if url else esc(run_label(run))


def params_diff(runs, *, show_all: bool = False) -> tuple[str, int]:
    """Table of params whose value differs between the chosen runs (cells differing from the
    first run highlighted). Returns (html, number of differing params)."""
    keys = sorted(set().union(*(run.data.params for run in runs)) - NOISY_PARAMS) if runs else []
    rows = []
    for key in keys:
        values = [run.data.params.get(key) for run in runs]
        if not show_all and len(set(values)) <= 1:
            continue
        first = values[0]
        row = [Cell(f"<code>{esc(key)}</code>", key)]
        for value in values:
            text = "—" if value is None else value
            css = "diff" if value != first else ""
            sort = _as_number(value)
            row.append(Cell(esc(text if len(text) <= 80 else text[:79] + "…"), sort, css))
        rows.append(row)
    if not rows:
        return "", 0
    return table(["param", *[_short(r) for r in runs]], rows, table_id="params-diff"), len(rows)


def _as_number(text):
    try:
        value = float(json.loads(text)) if text not in (None, "") else None
    except (ValueError, TypeError):
        return None
    return value if value is not None and math.isfinite(value) else None


def build(client, runs, *, max_points: int = 160) -> Page:
    page = Page("runs.html", "Runs", f"{len(runs)} run(s): learning curves, NaN events, params")
    if not runs:
        page.empty("No runs to show: the experiments searched have no runs yet (train one with "
                   "mlflow run . -e train -P stage=1), or pass --runs RUN_ID,… / --experiment NAME.")
        return page
    names = {}
    for run in runs:
        exp_id = run.info.experiment_id
        if exp_id not in names:
            try:
                names[exp_id] = client.get_experiment(exp_id).name
            except Exception:  # noqa: BLE001
                names[exp_id] = exp_id
    keys = curve_keys(runs)
    histories = {run.info.run_id: {k: metric_history(client, run.info.run_id, k, max_points=max_points)
                                   for k in keys if k in run.data.metrics} for run in runs}
    events = {run.info.run_id: nan_events(client, run) for run in runs}

    page.section("curves", "Learning curves")
    if keys:
        page.para("Every training loss term, gradient norm, learning rate and NaN counters, then validation metrics. "
                  "Red ✕: a non-finite step (skipped or restored by the NaN guard). Click a run in the legend to hide it.",
                  "note")
        page.figure(curves_figure(runs, histories, events, keys), "fig-curves")
    else:
        page.empty("These runs have logged no train/* or val/* metrics yet.")

    page.section("nan", "NaN events")
    if any(events.values()):
        page.figure(nan_timeline(runs, events), "fig-nan")
    else:
        page.empty("No non-finite step in these runs.")

    page.section("summary", "Runs")
    page.add(summary_table(runs, events, names, client.tracking_uri))

    page.section("params", "Params that differ")
    diff, count = params_diff(runs)
    if count:
        page.para(f"{count} param(s) differ; highlighted cells differ from the first run's value.", "note")
        page.add(diff)
    elif len(runs) > 1:
        page.empty("All params are identical across these runs.")
    else:
        page.empty("Only one run chosen: nothing to compare.")
    return page
