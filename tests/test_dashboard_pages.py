"""Dashboards built from a real tracking store: the pages hold the expected figures and tables,
and open in headless Chromium without script errors.

One session-scoped store is filled once by REAL short runs on the conftest COCO fixtures:
Stage 1 (registered, champion), a Stage 1 run that hits NaN steps and recovers (lr_scale 1e4,
no clipping: the NaN guard skips and restores), Stage 2 initialised from the Stage 1 champion
(init-load report), and a 2-trial Optuna sweep (one trial diverges → PRUNED, failure=nan) plus
an empty study — then the dashboards are built once and every test reads them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.helpers.browser_check import chromium_path, plot_area_not_blank, render
from tests.helpers.sweep_space import write_space
from tests.helpers.tracking_store import copy_of_migrated_store

pytestmark = pytest.mark.slow

TINY = [
    "scratch.resolution=64", "scratch.train_batch_size=2", "scratch.scheduler_warmup=0",
    "scratch.scheduler_timescale=4", "scratch.scheduler_cooldown=1", "model.encoder_channels=[8,8,16,16]",
    "model.d_model=16", "model.num_queries=2", "model.decoder_layers=1", "model.num_heads=2",
    "train.log_every=1", "data.max_val_images=6", "eval.overlays=2", "tracking.log_system_metrics=false",
    # an untrained tiny model's masks are faint: a low mask threshold gives the gallery something to show
    "eval.mask_threshold=0.2", "eval.score_threshold=0.0",
]
# lr_scale 1e4 without clipping: step 1 is finite, then gradients blow up; the guard skips,
# restores its snapshot with the LR cut 50×, and the run finishes (NaN events on its curves).
NAN_RUN = ["scratch.lr_scale=1e4", "optim.gradient_clip.max_norm=null", "nan_guard.max_consecutive=2",
           "nan_guard.lr_backoff=0.02", "nan_guard.max_restores=4"]
SWEEP_SPACE = """
study: dash_nan
objective: val/AP75_tol
pruner: none
sampler: {name: random, seed: 0}
params:
  scratch.lr_scale: {type: categorical, choices: [0.1, 1.0e6]}
"""
SWEEP_GUARD = """
optim.gradient_clip.max_norm: null
nan_guard.max_consecutive: 2
nan_guard.max_restores: 0
"""


@dataclass
class Store:
    uri: str
    root: Path
    runs: dict  # role → run id: s1, s1_nan, s2
    storage: str  # Optuna storage URL


@dataclass
class Built:
    store: Store
    out: Path
    result: object  # DashboardResult


def _train(stage: int, coco: Path, root: Path, extra: list[str], name: str) -> str:
    from angioexp.config import load_config
    from angioexp.tracking.session import tracked_train

    overrides = [*TINY, f"data.coco_dir={coco}", f"train.out_dir={root / 'runs'}", f"tracking.run_name={name}", *extra]
    cfg = load_config(None, overrides, stage=stage)
    tracked_train(cfg, argparse.Namespace())
    import mlflow

    run = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(f"angioexp-stage{stage}").experiment_id],
        filter_string=f"attributes.run_name = '{name}'")[0]
    return run.info.run_id


@pytest.fixture(scope="session")
def dash_store(coco_stage1, coco_stage2, tmp_path_factory, _migrated_store) -> Store:
    import mlflow
    import optuna

    from angioexp.sweep.cli import main as sweep_main

    root = tmp_path_factory.mktemp("dash-store")
    uri = copy_of_migrated_store(_migrated_store, root)
    storage = f"sqlite:///{root / 'optuna.db'}"
    with pytest.MonkeyPatch.context() as mp:  # session-wide env must not leak into other modules
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("ANGIOEXP_ARTIFACT_ROOT", str(root / "mlartifacts"))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.chdir(root)
        try:
            runs = {
                "s1": _train(1, coco_stage1, root, ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=6"], "dash-s1"),
                "s1_nan": _train(1, coco_stage1, root, ["train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=8",
                                                        *NAN_RUN], "dash-s1-nan"),
                "s2": _train(2, coco_stage2, root, ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=6",
                                                    "init_from=models:/angio-stage1@champion", "min_loaded_fraction=0.5"],
                             "dash-s2"),
            }
            space = write_space(root / "dash_nan.yaml", SWEEP_SPACE, steps=4, eval_every=2, extra_fixed=SWEEP_GUARD)
            assert sweep_main(["--space", str(space), "--storage", storage, "--coco-dir", str(coco_stage1),
                               "--out", str(root / "sweep-runs"), "--n-trials", "2"]) == 0
            optuna.create_study(study_name="dash_empty", storage=storage, direction="maximize")  # no trials at all
        finally:
            mlflow.set_tracking_uri(None)
    return Store(uri, root, runs, storage)


def _build(store: Store, out: Path, **kwargs):
    import mlflow

    from angioexp.dashboard import DashboardOptions, build_dashboards

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store.uri)
        mp.setenv("ANGIOEXP_ARTIFACT_ROOT", str(store.root / "mlartifacts"))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            return build_dashboards(DashboardOptions(out=out, storages=(store.storage,), **kwargs))
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def built(dash_store, tmp_path_factory) -> Built:
    out = tmp_path_factory.mktemp("dash-out") / "dashboards"
    return Built(dash_store, out, _build(dash_store, out))


@pytest.fixture()
def client(dash_store):
    from mlflow import MlflowClient

    return MlflowClient(dash_store.uri)


# ---------------------------------------------------------------------------------------------
# Reading the pages back


def figure(page: str, div_id: str) -> tuple[list[dict], dict]:
    """(traces, layout) of figure ``div_id``: the JSON handed to Plotly.newPlot."""
    match = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert match, f"no figure {div_id}"
    decoder = json.JSONDecoder()
    traces, end = decoder.raw_decode(page, match.end())
    layout, _ = decoder.raw_decode(page, page.index("{", end))
    return traces, layout


def figure_traces(page: str, div_id: str) -> list[dict]:
    return figure(page, div_id)[0]


class _Tables(HTMLParser):
    """Every <table id=…>: rows of cells as (text, data-v, inner img srcs)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[dict]]] = {}
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"t{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"text": "", "v": a.get("data-v"), "imgs": [], "header": tag == "th"}
        elif tag == "img" and self._cell is not None:
            self._cell["imgs"].append(a.get("src", ""))
        elif tag == "a" and self._cell is not None:
            self._cell.setdefault("links", []).append(a.get("href", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def tables(page: str) -> dict[str, list[list[dict]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def body_rows(table: list[list[dict]]) -> list[list[dict]]:
    return [row for row in table if not row[0]["header"]]


def col(table: list[list[dict]], name: str) -> int:
    """Index of the column headed ``name``."""
    return [c["text"].strip() for c in table[0]].index(name)


def model_id(mv) -> str:
    """A version's LoggedModel id (SQLite stores leave ModelVersion.model_id empty; source has it)."""
    return mv.model_id or mv.source.removeprefix("models:/").strip("/")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Tests


def test_every_page_is_written_and_linked(built):
    out = built.out
    for name in ("index.html", "registry.html", "runs.html", "sweeps.html", "predictions.html"):
        assert (out / name).is_file() and name in built.result.pages
    index = read(out / "index.html")
    for href in ("registry.html", "runs.html", "sweeps.html", "predictions.html"):
        assert f'href="{href}"' in index
    # headline: Stage 1 champion vs Stage 2 champion on the overview too
    names = {t["name"] for t in figure_traces(index, "fig-overview")}
    assert any(n.startswith("angio-stage1@champion") for n in names)
    assert any(n.startswith("angio-stage2@champion") for n in names)
    # no temporary files left beside the pages
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_registry_lists_every_version_with_aliases_and_init_report(built, client):
    page = read(built.out / "registry.html")
    t = tables(page)
    for name in ("angio-stage1", "angio-stage2"):
        versions = client.search_model_versions(f"name='{name}'")
        rows = body_rows(t[f"versions-{name}"])
        assert sorted(int(float(r[0]["v"])) for r in rows) == sorted(int(v.version) for v in versions)
        aliases = client.get_registered_model(name).aliases
        for alias, version in aliases.items():
            row = next(r for r in rows if r[0]["v"] == f"{float(version)}")
            assert alias in row[1]["text"]
        for r in rows:  # source run and dataset digest of each version
            mv = client.get_model_version(name, r[0]["text"])
            assert mv.run_id in r[3]["text"]
            assert client.get_run(mv.run_id).data.tags["dataset.digest"][:12] in r[4]["text"]

    champion1 = client.get_model_version_by_alias("angio-stage1", "champion")
    champion2 = client.get_model_version_by_alias("angio-stage2", "champion")
    traces = {tr["name"]: tr for tr in figure_traces(page, "fig-champions")}
    s1 = traces[f"angio-stage1@champion (v{champion1.version})"]
    s2 = traces[f"angio-stage2@champion (v{champion2.version})"]
    # bar heights are the registered models' metrics (the LoggedModel's, at the model's step)
    logged = {m.key: m.value for m in client.get_logged_model(model_id(champion2)).metrics}
    assert s2["y"][s2["x"].index("dice")] == pytest.approx(logged["val/dice"])
    assert "AP75_tol" in s1["x"] and "cldice" in s1["x"]

    # per-segment AP75 / Dice bars for Stage 2: one bar per segment the val split has
    seg = figure_traces(page, "fig-segments-angio-stage2")
    run2 = client.get_run(built.store.runs["s2"])
    slugs = {k.split("/", 2)[2] for k in run2.data.metrics if k.startswith("val/AP75/")}
    assert slugs and set(seg[0]["x"]) == slugs and len(seg) == 2

    # init-load report of the Stage 2 version: counts from its run's params, started from the S1 champion
    init_rows = body_rows(t["init-angio-stage2"])
    row = next(r for r in init_rows if r[0]["text"] == str(champion2.version))
    assert row[2]["text"] == f"angio-stage1/{run2.data.tags['init.version']}"
    assert row[3]["text"] == run2.data.params["init.loaded"]
    assert row[4]["text"] == run2.data.params["init.model_tensors"]
    assert "init-angio-stage1" not in t  # Stage 1 versions started from scratch: no init table


def test_runs_page_overlays_curves_marks_nan_events_and_diffs_params(built, client):
    page = read(built.out / "runs.html")
    runs = {role: client.get_run(run_id) for role, run_id in built.store.runs.items()}
    traces, layout = figure(page, "fig-curves")
    curve_names = {t["name"] for t in traces if not t["name"].startswith("NaN events")}
    assert {"dash-s1", "dash-s1-nan", "dash-s2"} <= curve_names
    # every loss term of the Stage 1 run and the headline val metrics have a panel
    titles = {a["text"] for a in layout["annotations"]}
    loss_terms = {k for k in runs["s1"].data.metrics if k.startswith("train/loss")}
    assert loss_terms and loss_terms <= titles
    assert {"val/AP75_tol", "val/dice", "val/cldice"} <= titles
    # the loss curve of a run has the steps MLflow holds
    history = client.get_metric_history(built.store.runs["s1"], "train/loss")
    s1_loss = next(t for t in traces if t["name"] == "dash-s1" and t.get("xaxis", "x") == "x")
    assert s1_loss["x"] == sorted(p.step for p in history)

    # NaN events: red markers at the steps the guard recorded (nan_events.json of that run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            events = json.loads(Path(client.download_artifacts(built.store.runs["s1_nan"], "nan_events.json", tmp)).read_text())
    steps = sorted(int(e["step"]) for e in events["events"])
    assert steps, "the lr_scale 1e4 run should have had non-finite steps"
    markers = [t for t in traces if t["name"] == "NaN events: dash-s1-nan"]
    assert markers and all(sorted(m["x"]) == steps for m in markers)
    assert not [t for t in traces if t["name"] == "NaN events: dash-s1"]
    timeline = figure_traces(page, "fig-nan")
    assert sorted(x for t in timeline for x in t["x"]) == steps

    # params diff: lr_scale differs (1 vs 1e4), stage differs; identical params are left out
    diff = {r[0]["text"]: [c["text"] for c in r[1:]] for r in body_rows(tables(page)["params-diff"])}
    assert "scratch.lr_scale" in diff and "stage" in diff
    assert "model.d_model" not in diff and "train.out_dir" not in diff
    summary = tables(page)["runs-summary"]
    nan_row = next(r for r in body_rows(summary) if "dash-s1-nan" in r[0]["text"])
    assert int(nan_row[col(summary, "NaN events")]["v"]) == len(steps)


def test_sweeps_page_links_the_study_reports(built):
    page = read(built.out / "sweeps.html")
    rows = {r[0]["text"]: r for r in body_rows(tables(page)["studies"])}
    assert set(rows) == {"dash_nan", "dash_empty"}
    links = rows["dash_nan"][7]["links"]
    assert "sweeps/dash_nan/index.html" in links
    for anchor in ("history", "parallel", "importances", "intermediate", "nan-map"):
        assert f"sweeps/dash_nan/index.html#{anchor}" in links
    report = read(built.out / "sweeps" / "dash_nan" / "index.html")
    for anchor in ("history", "parallel", "importances", "intermediate", "nan-map"):
        assert f'id="{anchor}"' in report  # every linked anchor exists in the report
    assert "nan 1" in rows["dash_nan"][4]["text"] and "complete 1" in rows["dash_nan"][4]["text"]
    assert rows["dash_empty"][3]["text"] == "0"
    assert "No completed trial yet in: dash_empty" in page  # the empty study says so
    assert (built.out / "sweeps" / "dash_empty" / "index.html").is_file()
    outcomes = {t["name"]: t for t in figure_traces(page, "fig-outcomes")}
    assert outcomes["nan"]["y"][outcomes["nan"]["x"].index("dash_nan")] == 1


def test_prediction_galleries_sort_worst_first_with_thumbnails(built, client):
    page = read(built.out / "predictions.html")
    galleries = body_rows(tables(page)["galleries"])
    labels = {r[0]["text"] for r in galleries}
    n_versions = sum(len(client.search_model_versions(f"name='{m}'")) for m in ("angio-stage1", "angio-stage2"))
    assert len(labels) == n_versions
    dice_box = figure_traces(page, "fig-dice")
    assert {t["name"] for t in dice_box} <= labels

    version = next(v for v in client.search_model_versions("name='angio-stage1'") if v.run_id == built.store.runs["s1"])
    version = client.get_model_version("angio-stage1", version.version)
    gallery = read(built.out / "predictions" / f"angio-stage1-v{version.version}.html")
    rows = body_rows(tables(gallery)["gallery"])
    # the evaluator's own per-image scores (per_image.csv of the model's evaluation), worst first
    logged_step = max(m.step for m in client.get_logged_model(model_id(version)).metrics if m.key.startswith("val/"))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = client.download_artifacts(version.run_id, f"eval/step_{logged_step:06d}/per_image.csv", tmp)
        expected = {r["case_id"]: float(r["dice"]) for r in csv.DictReader(io.StringIO(Path(csv_path).read_text()))}
    assert len(rows) == len(expected)
    dice = [float(r[2]["v"]) for r in rows]
    assert dice == sorted(dice)
    for r in rows:
        assert float(r[2]["v"]) == pytest.approx(expected[r[1]["v"]])
        imgs = [src for c in r[5:9] for src in c["imgs"]]
        assert len(imgs) == 4 and all(src.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for src in imgs)
    # the prediction thumbnail shows the model's masks (low mask threshold: something is predicted)
    import base64

    import numpy as np
    from PIL import Image

    def decode(src):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))

    predicted = [decode(r[7]["imgs"][0]).any() for r in rows]
    truth = [decode(r[6]["imgs"][0]).any() for r in rows]
    assert all(truth) and any(predicted)
    # Stage 2 gallery: segments coloured, legend lists them
    s2 = client.get_model_version_by_alias("angio-stage2", "champion")
    s2_page = read(built.out / "predictions" / f"angio-stage2-v{s2.version}.html")
    assert "Segments:" in s2_page and "swatch" in s2_page


def test_pages_stay_small(built):
    sizes = {rel: path.stat().st_size for rel, path in built.result.pages.items()}
    from plotly.offline import get_plotlyjs

    library = len(get_plotlyjs().encode("utf-8"))
    for rel, size in sizes.items():
        assert size - library < 1_500_000, (rel, size)  # the content itself (plotly.js inline aside)
    gallery_sizes = [s for rel, s in sizes.items() if rel.startswith("predictions/")]
    assert gallery_sizes and max(gallery_sizes) < 1_000_000  # galleries carry no plotly.js


def test_pages_are_logged_to_a_dashboard_run(built, client):
    run = client.get_run(built.result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["angioexp.role"] == "dashboard"
    assert client.get_experiment(run.info.experiment_id).name == "angioexp-dashboards"

    def walk(path=None):
        out = set()
        for item in client.list_artifacts(run.info.run_id, path):
            out |= walk(item.path) if item.is_dir else {item.path}
        return out

    logged = walk()
    assert set(built.result.pages) <= logged
    assert "sweeps/dash_nan/index.html" in logged and "sweeps/dash_empty/index.html" in logged


def test_file_mode_writes_plotly_once_and_references_it(dash_store, tmp_path):
    out = tmp_path / "dash"
    result = _build(dash_store, out, plotly_js="file", log_to_mlflow=False)
    assert result.run_id is None
    library = out / "plotly.min.js"
    assert library.is_file() and library.stat().st_size > 1_000_000
    pages = list(result.pages.values()) + [d / "index.html" for d in result.sweep_reports]
    for path in pages:
        text = read(path)
        assert "cdn.plot.ly" not in text
        assert path.stat().st_size < 1_500_000, path
        for src in re.findall(r'<script src="([^"]+)"', text):
            assert (path.parent / src).resolve() == library.resolve()


@pytest.mark.browser
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium, or set ANGIOEXP_CHROMIUM)")
def test_pages_render_in_headless_chromium_without_errors(built, tmp_path):
    shots = tmp_path / "shots"
    # every top-level page, one gallery and one study report (each load starts a Chromium: ~5 s)
    top = [(rel, path) for rel, path in sorted(built.result.pages.items()) if "/" not in rel]
    gallery = next((rel, path) for rel, path in sorted(built.result.pages.items()) if rel.startswith("predictions/"))
    pages = [*top, gallery, ("sweeps/dash_nan", built.out / "sweeps" / "dash_nan" / "index.html")]
    for rel, path in pages:
        png = shots / (rel.replace("/", "_") + ".png")
        errors = render(path, png, height=1100)
        assert errors == [], (rel, errors)
        assert plot_area_not_blank(png), rel


@pytest.mark.browser
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium, or set ANGIOEXP_CHROMIUM)")
def test_file_mode_pages_render_offline(dash_store, tmp_path):
    out = tmp_path / "dash"
    result = _build(dash_store, out, plotly_js="file", log_to_mlflow=False, max_versions=1)
    png = tmp_path / "runs.png"
    assert render(result.pages["runs.html"], png) == []  # plotly.min.js found beside the page
    assert plot_area_not_blank(png)
    report = out / "sweeps" / "dash_nan" / "index.html"  # ../../plotly.min.js from the report folder
    assert render(report, tmp_path / "report.png") == []
    assert plot_area_not_blank(tmp_path / "report.png")


def test_cli_writes_pages_for_chosen_runs(dash_store, tmp_path, capsys):
    import mlflow

    from angioexp.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", dash_store.uri)
        mp.setenv("ANGIOEXP_ARTIFACT_ROOT", str(dash_store.root / "mlartifacts"))
        try:
            code = main(["dashboard", "--out", str(tmp_path / "d"), "--no-log", "--plotly-js", "cdn",
                         "--runs", f"{dash_store.runs['s1']},{dash_store.runs['s2']}", "--study", "dash_nan",
                         "--storage", dash_store.storage, "--max-images", "2"])
        finally:
            mlflow.set_tracking_uri(None)
    assert code == 0
    assert "dashboards →" in capsys.readouterr().out
    runs_page = read(tmp_path / "d" / "runs.html")
    names = {t["name"] for t in figure_traces(runs_page, "fig-curves")}
    assert names == {"dash-s1", "dash-s2"}
    sweeps_page = read(tmp_path / "d" / "sweeps.html")
    assert "dash_nan" in sweeps_page and "dash_empty" not in sweeps_page
    assert re.search(r'<script src="https://cdn\.plot\.ly/plotly-\d+\.\d+\.\d+\.min\.js"', runs_page)
    gallery = next((tmp_path / "d" / "predictions").glob("angio-stage1-*.html"))
    assert len(body_rows(tables(read(gallery))["gallery"])) <= 2


def test_sweep_trial_runs_can_be_chosen_by_experiment(dash_store, tmp_path):
    result = _build(dash_store, tmp_path / "dash", experiments=("angioexp-sweeps",), log_to_mlflow=False, max_versions=1)
    page = read(result.pages["runs.html"])
    names = {t["name"] for t in figure_traces(page, "fig-curves") if not t["name"].startswith("NaN")}
    assert names == {"dash_nan-t000", "dash_nan-t001"}
    assert "sweep-dash_nan" not in page  # the parent run has nothing to draw
    timeline = {y for t in figure_traces(page, "fig-nan") for y in t["y"]}
    assert timeline == {"dash_nan-t000"}  # lr_scale 1e6: the trial that diverged
    summary = tables(page)["runs-summary"]
    assert {r[0]["v"] for r in body_rows(summary)} == {"dash_nan-t000", "dash_nan-t001"}
    assert "scratch.lr_scale" in {r[0]["text"] for r in body_rows(tables(page)["params-diff"])}


def test_dashboards_read_through_an_mlflow_server_too(dash_store, built, tmp_path):
    """Any tracking URI: the same pages from a real `mlflow server` on 127.0.0.1 over REST."""
    from tests.helpers.tracking_store import mlflow_server

    with mlflow_server(dash_store.uri) as base:
        result = _build(dash_store, tmp_path / "dash", tracking_uri=base, log_to_mlflow=False, max_versions=1)
    local, remote = read(built.out / "registry.html"), read(result.pages["registry.html"])
    for name in ("angio-stage1", "angio-stage2"):  # same versions, aliases, metrics
        strip = [[c["text"] for c in row] for row in tables(local)[f"versions-{name}"]]
        assert [[c["text"] for c in row] for row in tables(remote)[f"versions-{name}"]] == strip
    remote_runs = read(result.pages["runs.html"])
    assert figure_traces(remote_runs, "fig-curves") == figure_traces(read(built.out / "runs.html"), "fig-curves")
    assert f'href="{base}/#/experiments/' in remote_runs  # run names link to the server's UI
    galleries = [p for rel, p in result.pages.items() if rel.startswith("predictions/")]
    assert galleries and all("data:image/" in read(p) for p in galleries if "angio-stage1-v1" in p.name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
