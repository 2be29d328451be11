"""Overview section: does starting Stage 2 from Stage 1 help? Paired runs, not anecdotes.

Two finished Stage 2 runs form a pair when they trained the same dataset (tag
``dataset.digest``) with the same configuration — every config param equal, the seed and the
budget included — except ``init_from``: one arm started from a Stage 1 model, the other from
scratch. Each pair gives one difference of the Stage 2 headline (init − scratch, at each run's
last evaluation); their mean is reported with its 95 % t-interval over pairs, and read as a
claim only when the interval excludes 0. Two ``mlflow run . -e train -P stage=2`` runs that
differ only in ``-P init_from=none`` make a pair; repeat with other seeds (``-P overrides=seed=N``).
"""

from __future__ import annotations

from dataclasses import dataclass

from angioexp.dashboard.data import DEFAULT_EXPERIMENTS, _given, experiment_ids, run_label
from angioexp.dashboard.html import Cell, Page, esc, table
from angioexp.evaluate.paired import paired_interval

METRIC = "val/segments/dice_common"
# Params that may differ inside a pair: the arm itself, where files went, what ran it.
NOT_PAIRED_ON = ("init_from", "train.out_dir", "train.device", "train.threads", "tracking.", "init.")


@dataclass
class Pair:
    key: tuple  # (dataset digest, the shared params)
    init: object  # mlflow Run started from a Stage 1 model
    scratch: object  # mlflow Run started from scratch

    @property
    def difference(self) -> float:
        return self.init.data.metrics[METRIC] - self.scratch.data.metrics[METRIC]


def _pair_key(run) -> tuple:
    shared = tuple(sorted((k, v) for k, v in run.data.params.items() if not k.startswith(NOT_PAIRED_ON)))
    return run.data.tags.get("dataset.digest", ""), shared


def find_pairs(runs: list) -> list[Pair]:
    """Pairs among finished Stage 2 runs with the headline metric (newest run of each arm per key)."""
    arms: dict[tuple, dict[str, object]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):  # newer runs replace older ones
        if run.info.status != "FINISHED" or METRIC not in run.data.metrics:
            continue
        arm = "init" if _given(run.data.params.get("init_from")) else "scratch"
        arms.setdefault(_pair_key(run), {})[arm] = run
    return [Pair(key, both["init"], both["scratch"]) for key, both in arms.items() if len(both) == 2]


def stage2_runs(client, experiments=DEFAULT_EXPERIMENTS) -> list:
    ids = [i for name, i in experiment_ids(client, experiments).items() if name.endswith("stage2")]
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
    page.para(f"{METRIC}, init − scratch over {len(pairs)} pair(s): mean {mean:+.3f}{interval} — {verdict}.")
    rows = [[p.init.data.params.get("seed", ""), Cell(f"<code>{esc(p.key[0][:12])}</code>", p.key[0]),
             run_label(p.init), p.init.data.metrics[METRIC], run_label(p.scratch), p.scratch.data.metrics[METRIC],
             p.difference] for p in pairs]
    page.add(table(["seed", "dataset", "init run", "init", "scratch run", "scratch", "init − scratch"], rows,
                   table_id="init-vs-scratch"))
    return page
