"""The overview's "Stage 1 init vs scratch" section: pairs found in a real MLflow store.

Runs are made with MlflowClient (params, tags, metrics as a training run logs them) — no
training, so this runs in seconds; the pairing and the interval are what is tested.
"""

from __future__ import annotations

import html as html_lib

import pytest

from angioexp.dashboard import DashboardOptions, build_dashboards
from angioexp.dashboard.init_vs_scratch import find_pairs, stage2_runs

VAL = "val/segments/dice_common"


def _run(client, experiment_id, *, seed, init, value, digest="d1", lr="3.0", status="FINISHED", test=None):
    run = client.create_run(experiment_id, run_name=f"s{seed}-{'init' if init else 'scratch'}")
    run_id = run.info.run_id
    params = {"seed": str(seed), "init_from": "models:/angio-stage1@champion" if init else "None",
              "scratch.lr_scale": lr, "train.out_dir": f"runs/{run_id}"}
    for key, value_ in params.items():
        client.log_param(run_id, key, value_)
    client.set_tag(run_id, "dataset.digest", digest)
    if value is not None:
        client.log_metric(run_id, VAL, value, step=600)
    if test is not None:
        client.log_metric(run_id, "test/segments/dice_common", test, step=600)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture()
def stage2(store_uri):
    from mlflow import MlflowClient

    client = MlflowClient(store_uri)
    return client, client.create_experiment("angioexp-stage2")


def test_pairs_match_everything_but_init_and_give_a_paired_interval(stage2, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)
    client, exp = stage2
    for seed, (a, b) in enumerate([(0.50, 0.45), (0.55, 0.47), (0.52, 0.46)]):
        _run(client, exp, seed=seed, init=True, value=a)
        _run(client, exp, seed=seed, init=False, value=b)
    # not pairs: another LR, another dataset, a failed run, a run without the metric
    _run(client, exp, seed=0, init=False, value=0.9, lr="1.0")
    _run(client, exp, seed=1, init=False, value=0.9, digest="d2")
    _run(client, exp, seed=2, init=True, value=0.9, status="FAILED")
    _run(client, exp, seed=3, init=True, value=None)
    _run(client, exp, seed=3, init=False, value=0.3)

    pairs = find_pairs(stage2_runs(client))
    assert sorted(round(p.difference, 3) for p in pairs) == [0.05, 0.06, 0.08]

    out = tmp_path / "dash"
    build_dashboards(DashboardOptions(out=out))
    text = html_lib.unescape((out / "index.html").read_text(encoding="utf-8"))
    # mean 0.0633, sd 0.0153, t(0.975, 2) = 4.303 → half-width 0.0379
    assert "over 3 pair(s): mean +0.063 [+0.025, +0.101]" in text
    assert "Stage 1 init helps" in text


def test_one_pair_is_called_an_anecdote_and_no_pair_says_how_to_get_one(stage2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client, exp = stage2
    out = tmp_path / "dash"
    build_dashboards(DashboardOptions(out=out, log_to_mlflow=False))
    assert "No paired Stage 2 runs yet" in (out / "index.html").read_text(encoding="utf-8")
    _run(client, exp, seed=0, init=True, value=0.40)
    _run(client, exp, seed=0, init=False, value=0.42)
    build_dashboards(DashboardOptions(out=out, log_to_mlflow=False))
    text = html_lib.unescape((out / "index.html").read_text(encoding="utf-8"))
    assert "over 1 pair(s): mean -0.020 — one pair is an anecdote" in text


def test_a_pair_compares_test_scores_when_both_runs_have_them(stage2):
    client, exp = stage2
    _run(client, exp, seed=0, init=True, value=0.5, test=0.61)
    _run(client, exp, seed=0, init=False, value=0.4, test=0.60)
    _run(client, exp, seed=1, init=True, value=0.5, test=0.61)
    _run(client, exp, seed=1, init=False, value=0.4)  # no test score: both compared on val
    pairs = sorted(find_pairs(stage2_runs(client)), key=lambda p: p.init.data.params["seed"])
    assert [p.metric for p in pairs] == ["test/segments/dice_common", VAL]
    assert [round(p.difference, 3) for p in pairs] == [0.01, 0.1]


@pytest.mark.slow
def test_the_stage2_bench_with_track_logs_pairs_the_overview_finds(store_uri, tmp_path, monkeypatch):
    """``python -m angioexp.bench --only stage2 --quick --track``: real tiny trainings, tracked."""
    from mlflow import MlflowClient

    from angioexp.bench import stage2
    from angioexp.bench.__main__ import main as bench_main
    from angioexp.dashboard.init_vs_scratch import BENCH_EXPERIMENT

    monkeypatch.setitem(stage2.QUICK, "seeds", (0,))  # one pair is enough to test the plumbing
    # budgets of a few seconds: a step or two per stage is what the plumbing needs
    monkeypatch.setitem(stage2.QUICK, "stage1", 0.05)
    monkeypatch.setitem(stage2.QUICK, "stage2", 0.08)
    monkeypatch.setitem(stage2.QUICK, "marks", (0.04, 0.08))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANGIOEXP_BENCH_CACHE", str(tmp_path / "cache"))
    assert bench_main(["--only", "stage2", "--quick", "--track", "--no-write"]) == 0
    client = MlflowClient(store_uri)
    runs = client.search_runs([client.get_experiment_by_name(BENCH_EXPERIMENT).experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all("test/segments/dice_common" in r.data.metrics for r in runs)
    assert client.search_registered_models() == []  # a benchmark registers nothing
    pairs = find_pairs(stage2_runs(client))
    assert len(pairs) == 1 and pairs[0].metric == "test/segments/dice_common"
