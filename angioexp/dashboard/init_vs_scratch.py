"""Overview section: does starting Stage 2 from Stage 1 help? Paired runs, not anecdotes.

Two finished Stage 2 runs form a pair when they trained the same dataset (tag
``dataset.digest``) with the same configuration — every config param equal, the seed and the
budget included — except ``init_from``: one arm started from a Stage 1 model, the other from
scratch. Each pair gives one difference of the Stage 2 headline (init − scratch: the test
split's score where both runs carry one, as the Stage 2 benchmark logs it, else each run's last
validation); their mean is reported with its 95 % t-interval over pairs, and read as a
claim only when the interval excludes 0. Two ``mlflow run . -e train -P stage=2`` runs that
differ only in ``-P init_from=none`` make a pair; repeat with other seeds (``-P overrides=seed=N``).
"""

from __future__ import annotations

from dataclasses import dataclass

from angioexp.dashboard.data import DEFAULT_EXPERIMENTS, _given, experiment_ids, run_label
from angioexp.dashboard.html import Cell, Page, esc, table
from angioexp.evaluate.paired import paired_interval

# The Stage 2 headline: the test split's when both runs of a pair carry it (the Stage 2
# benchmark logs it), else their last validation.
METRICS = ("test/segments/dice_common", "val/segments/dice_common")
BENCH_EXPERIMENT = "angioexp-bench-stage2"  # python -m angioexp.bench --only stage2 --track
# Params that may differ inside a pair: the arm itself, where files went, what ran it.
NOT_PAIRED_ON = ("init_from", "train.out_dir", "train.device", "train.threads", "tracking.", "init.")


@dataclass
class Pair:
    key: tuple  # (dataset digest, the shared params)
    init: object  # mlflow Run started from a Stage 1 model
    scratch: object  # mlflow Run started from scratch

    @property
    def metric(self) -> str:
        return next(k for k in METRICS if k in self.init.data.metrics and k in self.scratch.data.metrics)

    @property
    def values(self) -> tuple[float, float]:
        return self.init.data.metrics[self.metric], self.scratch.data.metrics[self.metric]

    @property
    def difference(self) -> float:
        init, scratch = self.values
        return init - scratch


def _pair_key(run) -> tuple:
    shared = tuple(sorted((k, v) for k, v in run.data.params.items() if not k.startswith(NOT_PAIRED_ON)))
    return run.data.tags.get("dataset.digest", ""), shared


def find_pairs(runs: list) -> list[Pair]:
    """Pairs among finished Stage 2 runs with the headline metric (newest run of each arm per key)."""
    arms: dict[tuple, dict[str, object]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):  # newer runs replace older ones
        if run.info.status != "FINISHED" or not any(k in run.data.metrics for k in METRICS):
            continue
        arm = "init" if _given(run.data.params.get("init_from")) else "scratch"
        arms.setdefault(_pair_key(run), {})[arm] = run
    pairs = [Pair(key, both["init"], both["scratch"]) for key, both in arms.items() if len(both) == 2]
    return [p for p in pairs if any(k in p.init.data.metrics and k in p.scratch.data.metrics for k in METRICS)]


def stage2_runs(client, experiments=DEFAULT_EXPERIMENTS) -> list:
    names = [*experiments, BENCH_EXPERIMENT]
    ids = [i for name, i in experiment_ids(client, names).items() if name.endswith("stage2")]
    return client.search_runs(ids, filter_string="attributes.status = 'FINISHED'", max_results=1000) if ids else []


def build_section(page: Page, pairs: list[Pair]) -> Page:
    page.section("init-vs-scratch", "Stage 2: from Stage 1 or from scratch?")
    if not pairs:
        return page.empty("No paired Stage 2 runs yet: two finished Stage 2 runs on the same data and configuration, "
                          "one with init_from a Stage 1 model and one with init_from=none (mlflow run . -e train "
                          "-P stage=2 -P init_from=none), for several seeds.")
    mean, low, high = paired_interval([p.difference for p in pairs])
    if len(pairs) < 2:
        verdict = "one pair is an anecdote, not a claim: run more seeds"
    elif low > 0 or high < 0:
        verdict = f"Stage 1 init {'helps' if low > 0 else 'hurts'}: the 95 % interval excludes 0"
    else:
        verdict = "no difference shown: the 95 % interval contains 0"
    interval = f" [{low:+.3f}, {high:+.3f}]" if len(pairs) > 1 else ""
    metrics = " / ".join(sorted({p.metric for p in pairs}))
    page.para(f"{metrics}, init − scratch over {len(pairs)} pair(s): mean {mean:+.3f}{interval} — {verdict}.")
    rows = [[p.init.data.params.get("seed", ""), Cell(f"<code>{esc(p.key[0][:12])}</code>", p.key[0]), p.metric,
             run_label(p.init), p.values[0], run_label(p.scratch), p.values[1], p.difference] for p in pairs]
    page.add(table(["seed", "dataset", "metric", "init run", "init", "scratch run", "scratch", "init − scratch"], rows,
                   table_id="init-vs-scratch"))
    return page
