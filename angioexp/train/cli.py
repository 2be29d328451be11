"""``angioexp train``: one training run of either backend.

    angioexp train --stage 1 [--backend core] [--config my.yaml] [--set scratch.lr_scale=0.5 ...]
                   [--init-from PATH|models:/angio-stage1@champion] [--resume RUN_ID_OR_DIR]
                   [--out DIR] [--max-steps N] [--budget-minutes M] [--no-tracking]

With tracking (the default when :mod:`angioexp.tracking.session` is installed) the run is an
MLflow run; ``--no-tracking`` trains plainly into ``--out``. Under ``torchrun`` the core backend
trains with DDP (see :mod:`angioexp.train.ddp`).

Either way the run folder has one writer (:mod:`angioexp.train.runlock`), a new run never takes
another run's folder or an input's, and SIGTERM stops like Ctrl-C (:mod:`angioexp.train.signals`):
checkpoint, run KILLED, one line, exit 143, ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

from angioexp.config import load_config, set_value, validate
from angioexp.errors import InputError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, choices=(1, 2), default=None, help="1: whole tree, 2: segments (default: config's)")
    parser.add_argument("--backend", choices=("core", "sam3"), default=None, help="core (built-in, CPU) or sam3 (SAM3's trainer)")
    parser.add_argument("--config", metavar="YAML", help="config file (angioexp.config keys)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help="override one config key (repeatable)")
    parser.add_argument("--init-from", metavar="PATH|URI", help="starting weights (file, run folder, models:/…); 'none' for scratch")
    parser.add_argument("--resume", metavar="RUN_ID_OR_DIR", help="continue a stopped run exactly where it stopped")
    parser.add_argument("--out", metavar="DIR", help="output folder (checkpoints, evaluations)")
    parser.add_argument("--coco-dir", metavar="DIR", help="train on this COCO folder (default: data.coco_dir or synthetic)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--budget-minutes", type=float, help="stop cleanly (evaluate + checkpoint) after this wall time")
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow: a plain run into --out")


# What --resume may change: the run's own config is restored, only the stopping rules move.
RESUME_OPTIONS = ("--max-steps", "--budget-minutes")


def apply_stopping_rules(cfg, args: argparse.Namespace):
    """``--max-steps`` / ``--budget-minutes`` onto ``cfg``, checked like the config keys they set."""
    if getattr(args, "max_steps", None) is not None:
        set_value(cfg, "train.max_steps", args.max_steps, "--max-steps")
    if getattr(args, "budget_minutes", None) is not None:
        set_value(cfg, "train.budget_minutes", args.budget_minutes, "--budget-minutes")
    return validate(cfg)


def build_config(args: argparse.Namespace):
    overrides = list(args.overrides or [])
    if args.init_from is not None:
        overrides.append(f"init_from={args.init_from}")
    if args.coco_dir:
        overrides.append(f"data.coco_dir={args.coco_dir}")
    cfg = load_config(args.config, overrides, stage=args.stage, backend=args.backend)
    if args.out:
        set_value(cfg, "train.out_dir", args.out, "--out")
    return apply_stopping_rules(cfg, args)


def _refuse_changes_on_resume(args: argparse.Namespace) -> None:
    given = [flag for flag, value in (("--set", args.overrides), ("--config", args.config), ("--init-from", args.init_from),
                                      ("--out", args.out), ("--coco-dir", args.coco_dir)) if value]
    if given:
        raise _cannot_change(", ".join(given))


def _cannot_change(what: str) -> InputError:
    return InputError(f"--resume continues a run with its own configuration; {what} cannot change it "
                      f"(only {' and '.join(RESUME_OPTIONS)} may) — start a new run instead", key="--resume")


def resumed_config(cfg, args: argparse.Namespace):
    """A resumed run's stored ``cfg`` with the stopping rules of ``args``; ``--stage``/``--backend``
    may be given (``mlflow run`` always passes them) only if they match the run's."""
    for flag, given, stored in (("--stage", getattr(args, "stage", None), cfg.stage),
                                ("--backend", getattr(args, "backend", None), cfg.backend)):
        if given is not None and given != stored:
            raise _cannot_change(f"{flag} {given} (the run has {stored})")
    return apply_stopping_rules(cfg, args)


def _train_untracked(args: argparse.Namespace):
    """A plain run into its folder: the same folder rules and lock as a tracked run."""
    from angioexp.backends import get_backend
    from angioexp.checkpoints import config_from_dict, load_training_checkpoint, resolve_resume
    from angioexp.data.prepare import prepare
    from angioexp.fileio import refuse_output_over_inputs
    from angioexp.tracking.models import resolve_weights
    from angioexp.train.runlock import refuse_foreign_run_folder, run_lock

    if args.resume:
        path = resolve_resume(args.resume)
        out_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        with run_lock(out_dir):
            payload = load_training_checkpoint(path)
            cfg = resumed_config(config_from_dict(payload["config"], source=path), args)
            if int(payload["step"]) >= cfg.train.max_steps:
                print(f"{out_dir}: finished (step {payload['step']} of {cfg.train.max_steps}); nothing to do — "
                      f"pass --max-steps N (> {payload['step']}) to train it further")
                return None
            backend = get_backend(cfg.backend)
            backend.check(cfg)
            return backend.train(cfg, data=prepare(cfg.data, cfg.stage), resume_from=args.resume)
    cfg = build_config(args)
    backend = get_backend(cfg.backend)
    backend.check(cfg)
    if cfg.backend == "sam3" and not args.out:  # SAM3 runs get a folder of their own under train.out_dir
        from angioexp.backends.sam3.run import output_dir

        cfg.train.out_dir = str(output_dir(cfg, args))
    out_dir = cfg.train.out_dir
    # data checked (stage, splits) and starting weights found before the run folder exists
    coco_dir = prepare(cfg.data, cfg.stage)
    init = resolve_weights(cfg.init_from)  # models:/…, runs:/… through the tracking store
    local_init = cfg.init_from if cfg.init_from and "://" not in cfg.init_from else None
    refuse_output_over_inputs(out_dir, [coco_dir, args.config, local_init])
    refuse_foreign_run_folder(out_dir)
    with run_lock(out_dir):
        return backend.train(cfg, data=coco_dir, init=init)



def run(args: argparse.Namespace) -> int:
    from angioexp.train.signals import stop_signals_raise

    if args.resume:
        _refuse_changes_on_resume(args)
    tracked = not args.no_tracking and importlib.util.find_spec("angioexp.tracking.session") is not None
    with stop_signals_raise():  # SIGTERM (preemption, docker stop) is handled like Ctrl-C
        if tracked:
            from angioexp.tracking.session import RunFinished, tracked_train

            try:
                result = tracked_train(build_config(args), args)  # a resumed run's own config replaces it
            except RunFinished as exc:
                print(exc)
                return 0
        else:
            result = _train_untracked(args)
    if result is None:
        return 0
    summary = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.final_metrics.items())
                        if k in ("val/AP", "val/AP75", "val/AP75_tol", "val/dice", "val/cldice", "val/dice_mean_segments"))
    print(f"trained {result.steps} steps ({result.stopped_reason}, {result.wall_seconds / 60:.1f} min) → {result.out_dir}"
          + (f"; {summary}" if summary else "") + (f"; {result.nan_events} non-finite steps" if result.nan_events else ""))
    return 0

