"""``python -m angioexp.sweep`` / ``angioexp sweep``: run (or resume) an Optuna study.

    python -m angioexp.sweep --space sweeps/stage1_nan.yaml --n-trials 12
    python -m angioexp.sweep --space sweeps/stage1_ap75.yaml --n-trials 40 --workers 4
    python -m angioexp.sweep --study stage1_ap75 --storage postgresql://u@db/optuna --n-trials 200
    python -m angioexp.sweep --study stage1_nan --export best.yaml      # no new trials needed

Re-running with the same study name resumes it; ``--n-trials`` is the study's TOTAL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from angioexp.errors import InputError
from angioexp.fileio import atomic_file, local_store_file, refuse_output_over_inputs
from angioexp.sweep.objective import Objective, TrialContext
from angioexp.sweep.space import SearchSpace, load_space, space_from_study
from angioexp.sweep.storage import StorageHandle, open_storage
from angioexp.sweep.workers import budget_used, finished_count, run_worker, spawn_workers, wait_workers

log = logging.getLogger("angioexp.sweep")

DEFAULT_N_TRIALS = 20
ATTR = "angioexp."  # study user-attr prefix


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", help="search-space YAML (sweeps/*.yaml); optional when resuming a stored study")
    parser.add_argument("--study", help="study name (default: the space file's `study`)")
    parser.add_argument("--n-trials", type=int, help=f"TOTAL trials the study should hold (default: stored, else {DEFAULT_N_TRIALS})")
    parser.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    parser.add_argument("--storage", help="sqlite:///optuna.db (default, 1 worker), journal:///path.log (default for --workers > 1), postgresql://…")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (> 1 uses a journal file or PostgreSQL)")
    parser.add_argument("--backend", choices=["core", "sam3"], help="training backend (default: the space file's)")
    parser.add_argument("--coco-dir", help="COCO dataset root (default: prepare the config's data once)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trial (repeatable), after the space's `fixed`")
    parser.add_argument("--out", default="runs/sweeps", help="trial run folders go to OUT/<study>/trial_NNNN")
    parser.add_argument("--export", metavar="YAML", help="write the best trial's config (runs with `angioexp train --config`)")
    parser.add_argument("--export-trial", type=int, help="export this trial number instead of the best")
    parser.add_argument("--report", action="store_true", help="write the HTML report at the end (see --report-out)")
    parser.add_argument("--report-out", default="dashboards/sweeps", help="the report goes to REPORT_OUT/<study>/index.html")
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow runs")
    parser.add_argument("--no-register", action="store_true", help="do not register the best trial's model")
    parser.add_argument("--heartbeat-interval", type=int, default=10, help="seconds between trial heartbeats")
    parser.add_argument("--grace-period", type=int, default=60, help="a RUNNING trial without a heartbeat for this long is failed and retried")
    parser.add_argument("--max-retry", type=int, default=1, help="retries of a killed worker's trial")
    # Internal: how the launcher starts its worker processes.
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent-run-id", help=argparse.SUPPRESS)
    parser.add_argument("--init-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------
# Samplers and pruners


def build_sampler(space: SearchSpace, *, worker_index: int = 0, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    seed = space.sampler.seed
    if seed is not None:
        # Distinct streams per worker, and no replay of the first random draws when resuming.
        seed = seed + 7919 * worker_index + n_existing
    opts = dict(space.sampler.options)
    if space.sampler.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **opts)
    if space.sampler.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **opts)
    return optuna.samplers.RandomSampler(seed=seed)


def build_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    opts = dict(space.pruner.options)
    name = space.pruner.name
    if name == "median":
        return optuna.pruners.MedianPruner(**opts)
    if name in ("successive_halving", "hyperband"):
        # Rungs in training steps; unset, the first rung is the first evaluation (and Hyperband's
        # last the final step) of a trial's config.
        needs_base = "min_resource" not in opts or (name == "hyperband" and "max_resource" not in opts)
        base = space.build_config() if needs_base else None
        if "min_resource" not in opts:
            opts["min_resource"] = max(1, base.train.eval_every)
        if name == "successive_halving":  # ASHA: one bracket, every trial can be stopped at the first rung
            return optuna.pruners.SuccessiveHalvingPruner(**opts)
        if "max_resource" not in opts:
            opts["max_resource"] = base.train.max_steps
        return optuna.pruners.HyperbandPruner(**opts)
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(**opts)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------
# Study


def study_exists(handle: StorageHandle, name: str) -> bool:
    try:
        handle.storage.get_study_id_from_name(name)
        return True
    except KeyError:
        return False


def open_study(handle: StorageHandle, name: str, space: SearchSpace | None, *, worker_index: int = 0) -> tuple[optuna.Study, SearchSpace]:
    """Create or load study ``name``; refuse a space whose directions contradict the stored ones."""
    exists = study_exists(handle, name)
    if not exists and space is None:
        raise InputError(f"study '{name}' does not exist in {handle.display_url}; pass --space to create it")
    if exists:
        probe = optuna.load_study(study_name=name, storage=handle.storage)
        stored_space = None
        if space is None:
            space = space_from_study(probe)
            stored_space = space
        wanted = [d.upper() for d in space.directions]
        have = [d.name for d in probe.directions]
        if wanted != have:
            raise InputError(
                f"study '{name}' in {handle.display_url} optimises {'/'.join(h.lower() for h in have)} "
                f"but the space asks to {'/'.join(w.lower() for w in wanted)} {space.metrics}; "
                "use another --study name (stored trials are left untouched)",
                key="objective",
            )
        stored_metrics = probe.user_attrs.get(ATTR + "objective")
        if stored_metrics and list(stored_metrics) != space.metrics:
            raise InputError(
                f"study '{name}' optimises {stored_metrics} but the space asks for {space.metrics}; "
                "use another --study name", key="objective",
            )
        n_existing = len(probe.get_trials(deepcopy=False))
        study = optuna.load_study(
            study_name=name, storage=handle.storage,
            sampler=build_sampler(space, worker_index=worker_index, n_existing=n_existing), pruner=build_pruner(space),
        )
        if stored_space is None and study.user_attrs.get(ATTR + "space") != space.text and worker_index == 0:
            log.warning("study '%s': the space file differs from the one stored; storing the new one", name)
            _store_space(study, space)
        return study, space
    study = optuna.create_study(
        study_name=name, storage=handle.storage, directions=space.directions, load_if_exists=True,
        sampler=build_sampler(space, worker_index=worker_index), pruner=build_pruner(space),
    )
    _store_space(study, space)
    return study, space


def _store_space(study: optuna.Study, space: SearchSpace) -> None:
    study.set_user_attr(ATTR + "space", space.text)
    study.set_user_attr(ATTR + "space_path", str(space.path.resolve()) if space.path else None)
    study.set_user_attr(ATTR + "objective", space.metrics)
    study.set_user_attr(ATTR + "stage", space.stage)


# ---------------------------------------------------------------------------------------------
# Data, init weights


def prepare_data(space: SearchSpace, backend: str, coco_dir: str | None, overrides: list[str]) -> Path | None:
    """The COCO root all trials train on, prepared once before any worker starts."""
    if coco_dir:
        path = Path(coco_dir)
        if not path.is_dir():
            raise InputError(f"--coco-dir {path} is not a directory")
        return path.resolve()
    cfg = space.build_config(extra=overrides, backend=backend)
    if cfg.data.coco_dir:
        return Path(cfg.data.coco_dir).resolve()
    try:
        from angioexp.data.prepare import prepare
    except ImportError:
        raise InputError("no --coco-dir given and angioexp.data.prepare (data preparation) is not available") from None
    log.info("preparing the dataset once for all trials …")
    return Path(prepare(cfg.data, cfg.stage)).resolve()


def resolve_init(space: SearchSpace, backend: str, overrides: list[str]) -> Path | None:
    """Stage 2: resolve ``init_from`` (e.g. models:/angio-stage1@champion) once, to local weights."""
    cfg = space.build_config(extra=overrides, backend=backend)
    if not cfg.init_from:
        return None
    if "://" not in cfg.init_from and ":/" not in cfg.init_from:
        path = Path(cfg.init_from)
        if not path.is_file():
            raise InputError(f"init_from file not found: {path}", key="init_from")
        return path.resolve()
    from angioexp.tracking.models import resolve_model
    from angioexp.tracking.uri import configure_mlflow

    configure_mlflow()
    return Path(resolve_model(cfg.init_from).weights).resolve()


# ---------------------------------------------------------------------------------------------
# Summary, export


def summarize(study: optuna.Study, space: SearchSpace) -> dict:
    trials = study.get_trials(deepcopy=False)
    outcomes = Counter(t.user_attrs.get("outcome") or ("killed" if t.state == TrialState.FAIL else t.state.name.lower()) for t in trials)
    states = Counter(t.state.name for t in trials)
    best = best_trial(study, space)
    return {
        "study": study.study_name,
        "trials": len(trials),
        "budget_used": budget_used(trials),
        "counts": {**{f"state_{k.lower()}": v for k, v in states.items()}, **{f"outcome_{k}": v for k, v in outcomes.items()}},
        "best_trial": best.number if best else None,
        "best_values": list(best.values) if best else None,
        "best_params": best.params if best else None,
    }


def best_trial(study: optuna.Study, space: SearchSpace) -> optuna.trial.FrozenTrial | None:
    """Single objective: Optuna's best. Several: the Pareto trial best on the first objective."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return None
    if not space.multi_objective:
        return study.best_trial
    sign = 1 if space.directions[0] == "maximize" else -1
    return max(study.best_trials, key=lambda t: sign * t.values[0])


def export_config(study: optuna.Study, space: SearchSpace, path: str | Path, *, trial_number: int | None = None) -> Path:
    """Write the chosen trial's full config; ``angioexp train --config PATH`` runs it as is."""
    from angioexp.config import dump_yaml, load_config

    if trial_number is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not matches:
            raise InputError(f"study '{study.study_name}' has no trial {trial_number}")
        trial = matches[0]
    else:
        trial = best_trial(study, space)
        if trial is None:
            raise InputError(f"study '{study.study_name}' has no completed trial to export yet")
    overrides = list(study.user_attrs.get(ATTR + "overrides") or [])
    if study.user_attrs.get(ATTR + "coco_dir"):  # trained on --coco-dir data: keep it so the file runs as is
        overrides.insert(0, f"data.coco_dir={json.dumps(study.user_attrs[ATTR + 'coco_dir'])}")
    backend = study.user_attrs.get(ATTR + "backend") or space.backend
    cfg = space.build_config(space.values_from_params(trial.params), extra=overrides, backend=backend)
    values = ", ".join(f"{m}={v:.4g}" for m, v in zip(space.metrics, trial.values or []))
    header = (
        f"# angioexp config exported from Optuna study '{study.study_name}', trial {trial.number} "
        f"({trial.state.name.lower()}{': ' + values if values else ''}).\n"
        f"# Searched: {json.dumps(space.values_from_params(trial.params), default=str)}\n"
        f"# Run it: angioexp train --config {Path(path).name}\n"
    )
    text = header + dump_yaml(cfg)
    path = Path(path)
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    load_config(path)  # must load as is (fails loudly if the dump ever drifts from the loader)
    return path


def print_summary(summary: dict, space: SearchSpace, n_trials: int) -> None:
    counts = summary["counts"]
    outcome = {k[len("outcome_"):]: v for k, v in counts.items() if k.startswith("outcome_")}
    print(f"study {summary['study']}: {summary['budget_used']}/{n_trials} trials "
          f"({', '.join(f'{k} {v}' for k, v in sorted(outcome.items()))})")
    if summary["best_trial"] is not None:
        values = ", ".join(f"{m}={v:.4g}" for m, v in zip(space.metrics, summary["best_values"]))
        print(f"best: trial {summary['best_trial']} {values} {json.dumps(summary['best_params'], default=str)}")


# ---------------------------------------------------------------------------------------------
# Entry


def _worker_argv(args, *, study: str, storage_url: str, index: int, parent_run_id: str | None,
                 coco_dir: Path | None, init: Path | None, backend: str, deadline: float | None,
                 threads: int | None, n_trials: int) -> list[str]:
    argv = ["--study", study, "--storage", storage_url, "--worker-index", str(index), "--backend", backend,
            "--out", args.out, "--n-trials", str(n_trials), "--heartbeat-interval", str(args.heartbeat_interval),
            "--grace-period", str(args.grace_period), "--max-retry", str(args.max_retry)]
    if parent_run_id:
        argv += ["--parent-run-id", parent_run_id]
    else:
        argv += ["--no-tracking"]
    if coco_dir:
        argv += ["--coco-dir", str(coco_dir)]
    if init:
        argv += ["--init-checkpoint", str(init)]
    if deadline:
        argv += ["--deadline", repr(deadline)]
    if threads:
        argv += ["--threads", str(threads)]
    for o in args.overrides:
        argv += ["--set", o]
    return argv


def _run_as_worker(args) -> int:
    """A worker process started by the launcher: join the study and run trials."""
    # (the launcher already refused SQLite for several workers)
    handle = open_storage(args.storage, workers=1 if args.storage.startswith("sqlite") else 2,
                          heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period, max_retry=args.max_retry)
    study, space = open_study(handle, args.study, None, worker_index=args.worker_index)
    tracker = None
    if args.parent_run_id:
        from angioexp.tracking.uri import configure_mlflow

        configure_mlflow()
        from angioexp.sweep.tracking import SweepTracker

        tracker = SweepTracker.attach(study.study_name, args.parent_run_id)
    ctx = TrialContext(
        space=space, backend=args.backend, out_root=Path(args.out), study_name=study.study_name,
        coco_dir=Path(args.coco_dir) if args.coco_dir else None,
        init_checkpoint=Path(args.init_checkpoint) if args.init_checkpoint else None,
        extra_overrides=list(args.overrides), threads=args.threads, tracker=tracker, worker_index=args.worker_index,
    )
    stats = run_worker(study, handle, Objective(ctx), n_trials=args.n_trials, deadline=args.deadline)
    log.info("worker %d done: %d trials (%d complete, %d pruned, %d failed)", args.worker_index, stats.ran, stats.complete, stats.pruned, stats.failed)
    return 0


def run(args: argparse.Namespace) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # One log line per trial is the sweep's progress; per-step bars of every trial are noise.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.worker_index is not None:
        return _run_as_worker(args)
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    if args.n_trials is not None and args.n_trials < 0:
        raise InputError(f"--n-trials must be >= 0, got {args.n_trials}")
    if args.space is None and args.study is None:
        raise InputError("give --space (a sweeps/*.yaml file) or --study (a stored study)")
    inputs = [args.coco_dir, args.space, local_store_file(args.storage)]
    refuse_output_over_inputs(args.out, inputs)
    refuse_output_over_inputs(args.report_out, inputs, option="--report-out")
    space = load_space(args.space) if args.space else None
    handle = open_storage(args.storage, workers=args.workers, heartbeat_interval=args.heartbeat_interval,
                          grace_period=args.grace_period, max_retry=args.max_retry)
    name = args.study or space.study
    study, space = open_study(handle, name, space)
    earlier = sorted((Path(args.out) / name).glob("trial_*"))
    if earlier and not study.get_trials(deepcopy=False):
        # a new study would write its trial_0000… over the folders of an earlier one of this name
        raise InputError(f"{Path(args.out) / name} holds trial folders of an earlier study named '{name}' "
                         f"({earlier[0].name} …) that this storage does not know; choose another --out or study name",
                         key="--out")
    backend = args.backend or study.user_attrs.get(ATTR + "backend") or space.backend
    for override in args.overrides:  # fail on a bad --set before anything runs
        space.build_config(extra=[override], backend=backend)

    n_trials = args.n_trials if args.n_trials is not None else study.user_attrs.get(ATTR + "n_trials", DEFAULT_N_TRIALS)
    study.set_user_attr(ATTR + "n_trials", int(n_trials))
    study.set_user_attr(ATTR + "backend", backend)
    if args.overrides or ATTR + "overrides" not in study.user_attrs:
        study.set_user_attr(ATTR + "overrides", list(args.overrides))
    if args.coco_dir:
        study.set_user_attr(ATTR + "coco_dir", str(Path(args.coco_dir).resolve()))
    print(f"study {name} in {handle.display_url}: {space.sampler.name} sampler, {space.pruner.name} pruner, "
          f"objective {', '.join(f'{o.metric} ({o.direction})' for o in space.objectives)}")

    trials = study.get_trials(deepcopy=False)
    needs_work = budget_used(trials) < n_trials or any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials)
    tracker = None
    if needs_work:
        coco_dir = prepare_data(space, backend, args.coco_dir, args.overrides)
        init = resolve_init(space, backend, args.overrides)
        if not args.no_tracking:
            from angioexp.sweep.tracking import SweepTracker

            tracker = SweepTracker.start_parent(study, space, backend=backend, storage_url=handle.display_url,
                                                coco_dir=coco_dir, n_trials=n_trials)
        deadline = time.time() + args.timeout if args.timeout else None
        threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None
        try:
            if args.workers == 1:
                ctx = TrialContext(space=space, backend=backend, out_root=Path(args.out), study_name=name, coco_dir=coco_dir,
                                   init_checkpoint=init, extra_overrides=list(args.overrides), tracker=tracker)
                run_worker(study, handle, Objective(ctx), n_trials=n_trials, deadline=deadline)
            else:
                argv = [
                    _worker_argv(args, study=name, storage_url=handle.url, index=i,
                                 parent_run_id=tracker.parent_run_id if tracker else None, coco_dir=coco_dir, init=init,
                                 backend=backend, deadline=deadline, threads=threads, n_trials=n_trials)
                    for i in range(args.workers)
                ]
                print(f"launching {args.workers} workers on {socket.gethostname()} ({threads} threads each)")
                wait_workers(spawn_workers(argv))
                study = optuna.load_study(study_name=name, storage=handle.storage)
        except KeyboardInterrupt:
            if tracker is not None:
                tracker.close_stale_trial_runs(study)
                tracker.finish_parent(study, summarize(study, space), status="KILLED")
            raise

    summary = summarize(study, space)
    if tracker is not None:
        tracker.close_stale_trial_runs(study)
        best = best_trial(study, space)
        if best is not None and not args.no_register:
            try:
                cfg = space.build_config(space.values_from_params(best.params), extra=args.overrides, backend=backend)
                tracker.register_best(study, space, best, cfg)
            except Exception as exc:  # noqa: BLE001 - the sweep's results stand without a registry entry
                log.warning("could not register the best trial's model: %s", exc)
        tracker.finish_parent(study, summary)
    print_summary(summary, space, n_trials)
    if args.export:
        path = export_config(study, space, args.export, trial_number=args.export_trial)
        print(f"exported trial config → {path}")
    if args.report:
        from angioexp.sweep.report import build_report

        out = build_report(study, out_root=Path(args.report_out))
        print(f"report → {out}")
    finished = finished_count(study.get_trials(deepcopy=False))
    return 0 if finished >= n_trials or args.timeout else 1


def main(argv: list[str] | None = None) -> int:
    import sys

    from angioexp.errors import AngioexpError

    parser = argparse.ArgumentParser(prog="python -m angioexp.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(run(args) or 0)
    except AngioexpError as exc:
        print(f"angioexp sweep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("angioexp sweep: interrupted", file=sys.stderr)
        return 130
