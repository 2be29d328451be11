"""Registry page: every version of the registered models, champion vs champion, Stage 2 per
segment, and the init-load report of each Stage 2 version.

The question it answers first: did Stage 2 beat Stage 1's starting point? Stage 1 is scored on
the whole tree as one instance, Stage 2 per SYNTAX segment (its Dice is the mean over segments),
so the side-by-side bars compare the same metric names on related — not identical — tasks; the
caption says so.
"""

from __future__ import annotations

import datetime as _dt

from angioexp.dashboard.data import HEADLINE, VersionInfo, by_alias, init_report, model_versions, run_url
from angioexp.dashboard.html import Cell, Page, alias_badges, esc, fmt, table
from angioexp.segments import BY_SLUG, SEGMENTS

CHAMPION = "champion"
CHALLENGER = "challenger"
SEGMENT_METRICS = ("AP75", "dice")  # per-segment bars: val/AP75/<slug>, val/dice/<slug>
MAX_SEGMENT_VERSIONS = 6  # per-segment bars: champion + challenger + newest, at most this many


def _when(ms: int | None) -> str:
    if not ms:
        return ""
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _short(text: str, n: int = 12) -> str:
    return text[:n] if text else ""


def _run_cell(v: VersionInfo, tracking_uri: str) -> Cell:
    url = run_url(tracking_uri, v.run)
    name = f'<a href="{esc(url)}">{esc(v.run_name)}</a>' if url else esc(v.run_name)
    return Cell(f"{name}<br><code>{esc(v.run_id or '')}</code>", v.run_name)


def version_table(versions: list[VersionInfo], tracking_uri: str = "") -> str:
    columns = ["version", "aliases", "created", "source run", "dataset digest", "backend", "primary metric", "primary",
               *(k.removeprefix("val/") for k in HEADLINE), "eval step", "init from", "champion decision"]
    rows = []
    for v in versions:
        rows.append([
            Cell(esc(v.version), float(v.version), "num"),
            Cell(alias_badges(v.aliases), " ".join(v.aliases)),
            _when(v.created_ms),
            _run_cell(v, tracking_uri),
            Cell(f"<code>{esc(_short(v.dataset_digest))}</code>", v.dataset_digest),
            v.tags.get("backend", ""),
            v.primary_metric,
            v.primary_value,
            *(v.metrics.get(k) for k in HEADLINE),
            v.metrics_step,
            v.init_from,
            v.tags.get("champion.decision", ""),
        ])
    return table(columns, rows, table_id=f"versions-{versions[0].name}" if versions else None)


def champion_figure(champions: list[tuple[str, VersionInfo]]):
    """Grouped bars: headline metrics × the given (label, version) pairs."""
    import plotly.graph_objects as go

    keys = [k for k in HEADLINE if any(k in v.metrics for _, v in champions)]
    fig = go.Figure()
    for label, v in champions:
        fig.add_trace(go.Bar(
            name=label, x=[k.removeprefix("val/") for k in keys], y=[v.metrics.get(k) for k in keys],
            text=[fmt(v.metrics.get(k), 3) for k in keys], textposition="outside",
            hovertemplate="%{x}: %{y:.4f}<extra>" + esc(label) + "</extra>",
        ))
    fig.update_layout(
        barmode="group", height=420, margin=dict(l=50, r=20, t=50, b=50),
        title="Champion vs champion (validation metrics at each model's evaluation)",
        yaxis=dict(title="score", range=[0, 1.08]), legend=dict(orientation="h", y=-0.15),
    )
    return fig


def champion_pairs(models: dict[str, list[VersionInfo] | None]) -> list[tuple[str, VersionInfo]]:
    """(label, version) for each model's champion — plus, when Stage 2's champion started from a
    Stage 1 version other than the current Stage 1 champion, that starting version."""
    pairs = []
    names = list(models)
    for name in names:
        champ = by_alias(models[name], CHAMPION)
        if champ is not None:
            pairs.append((f"{name}@champion (v{champ.version})", champ))
    if len(names) >= 2:
        first, second = names[0], names[1]
        s1_champ, s2_champ = by_alias(models[first], CHAMPION), by_alias(models[second], CHAMPION)
        origin = (s2_champ.init_from if s2_champ is not None else "") or ""
        if s2_champ is not None and origin.startswith(f"{first}/"):
            version = origin.split("/", 1)[1]
            if s1_champ is None or s1_champ.version != version:
                start = next((v for v in models[first] or [] if v.version == version), None)
                if start is not None:
                    pairs.append((f"{first} v{version} (Stage 2's starting point)", start))
    return pairs


def segment_figure(versions: list[VersionInfo]):
    """Per-segment AP75 and Dice bars (SYNTAX order) for up to MAX_SEGMENT_VERSIONS versions."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    chosen: list[VersionInfo] = []
    for v in [by_alias(versions, CHAMPION), by_alias(versions, CHALLENGER), *versions]:
        if v is not None and v not in chosen and len(chosen) < MAX_SEGMENT_VERSIONS:
            chosen.append(v)
    slugs_present = {k.split("/", 2)[2] for v in chosen for k in v.metrics if k.count("/") == 2 and k.split("/")[1] in SEGMENT_METRICS}
    order = [s.slug for s in SEGMENTS if s.slug in slugs_present] + sorted(slugs_present - set(BY_SLUG))
    if not order:
        return None, chosen
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{m} per segment" for m in SEGMENT_METRICS])
    for i, v in enumerate(chosen):
        label = f"v{v.version}" + (f" ({', '.join(v.aliases)})" if v.aliases else "")
        for row, metric in enumerate(SEGMENT_METRICS, start=1):
            fig.add_trace(go.Bar(
                name=label, legendgroup=label, showlegend=row == 1, marker_color=_colour(i),
                x=order, y=[v.metrics.get(f"val/{metric}/{slug}") for slug in order],
                hovertemplate="%{x}: %{y:.4f}<extra>" + esc(label) + "</extra>",
            ), row=row, col=1)
    fig.update_layout(barmode="group", height=560, margin=dict(l=50, r=20, t=60, b=90),
                      title=f"{chosen[0].name}: per-segment validation metrics")
    fig.update_yaxes(range=[0, 1.05])
    return fig, chosen


def _colour(i: int) -> str:
    import plotly.express as px

    palette = px.colors.qualitative.D3
    return palette[i % len(palette)]


def init_report_table(client, versions: list[VersionInfo]) -> str:
    """One row per version with its source run's init-load counts; names in <details>."""
    columns = ["version", "aliases", "started from", "loaded", "model tensors", "loaded fraction", "missing", "unexpected",
               "shape mismatched", "skipped by rule", "details"]
    rows = []
    for v in versions:
        report = init_report(client, v.run)
        if report is None:
            rows.append([Cell(esc(v.version), float(v.version), "num"), Cell(alias_badges(v.aliases)),
                         v.init_from or "", Cell('<span class="warn">no init-load report on the source run</span>'),
                         "", "", "", "", "", "", ""])
            continue
        p = report["params"]

        def num(key):
            try:
                return float(p[key]) if "." in str(p.get(key, "")) else int(p[key])
            except (KeyError, ValueError):
                return p.get(key, "")

        detail = report.get("detail") or {}
        blocks = []
        for key in ("missing", "unexpected", "shape_mismatched", "skipped_by_rule", "new_by_design"):
            names = detail.get(key) or []
            if names:
                shown = "<br>".join(esc(str(n)) for n in names[:200])
                more = f"<br>… and {len(names) - 200} more" if len(names) > 200 else ""
                blocks.append(f"<details><summary>{esc(key)} ({len(names)})</summary><code>{shown}{more}</code></details>")
        fraction = num("loaded_fraction")
        css = "num" + (" diff" if isinstance(fraction, float) and fraction < 0.9 else "")
        rows.append([
            Cell(esc(v.version), float(v.version), "num"), Cell(alias_badges(v.aliases)),
            v.init_from or report["tags"].get("init.uri", ""),
            num("loaded"), num("model_tensors"),
            Cell(esc(fmt(fraction)), fraction if isinstance(fraction, (int, float)) else None, css),
            num("missing"), num("unexpected"), num("shape_mismatched"), num("skipped_by_rule"),
            Cell("".join(blocks) or '<span class="note">none</span>'),
        ])
    return table(columns, rows, table_id=f"init-{versions[0].name}" if versions else None)


def build(client, models: list[str]) -> tuple[Page, dict]:
    """The registry page; also returns the loaded versions per model (the index reuses them)."""
    page = Page("registry.html", "Model registry", "every version, aliases, source runs, init-load reports")
    loaded = {name: model_versions(client, name) for name in models}

    page.section("champions", "Stage 1 champion vs Stage 2 champion")
    pairs = champion_pairs(loaded)
    if pairs:
        page.figure(champion_figure(pairs), "fig-champions")
        page.para("Stage 1 scores the whole tree as one instance; Stage 2 scores each SYNTAX segment (its Dice is the "
                  "mean over segments) — the same metric names on related tasks. AP75_tol is AP75 with a 1-px boundary "
                  "tolerance (raw AP75 on thin vessels mostly measures ±1 px label noise).", "note")
        if len(pairs) < 2:
            missing = [n for n in models if by_alias(loaded[n], CHAMPION) is None]
            page.empty(f"no champion yet for: {', '.join(missing)} — train that stage (angioexp train --stage N) to compare.")
    else:
        page.empty("No champion to compare: no registered model has a 'champion' alias yet. Train Stage 1 "
                   "(mlflow run . -e train -P stage=1), then Stage 2.")

    for name in models:
        versions = loaded[name]
        page.section(f"model-{name}", f"{name}: versions")
        if versions is None:
            page.empty(f"Registered model '{name}' does not exist in this tracking store yet.")
            continue
        if not versions:
            page.empty(f"Registered model '{name}' has no versions.")
            continue
        page.add(version_table(versions, client.tracking_uri))
        has_segments = any(k.count("/") == 2 for v in versions for k in v.metrics)
        if has_segments:
            page.add(f'<h3 id="segments-{esc(name)}">{esc(name)}: per-segment AP75 and Dice</h3>')
            fig, _ = segment_figure(versions)
            if fig is not None:
                page.figure(fig, f"fig-segments-{name}")
        if any(v.stage == "2" or v.init_from for v in versions):
            page.add(f'<h3 id="init-{esc(name)}">{esc(name)}: init-load report of each version</h3>')
            page.para("How many of the model's tensors each version's training loaded from its starting weights "
                      "(a Stage 2 run that loaded nothing silently trained from scratch). Highlighted: below 90%.", "note")
            page.add(init_report_table(client, versions))
    return page, loaded
