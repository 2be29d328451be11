"""``angioexp train``: one training run of either backend.

    angioexp train --stage 1 [--backend core] [--config my.yaml] [--set scratch.lr_scale=0.5 ...]
                   [--init-from PATH|models:/angio-stage1@champion] [--resume RUN_ID_OR_DIR]
                   [--out DIR] [--max-steps N] [--budget-minutes M] [--no-tracking]

With tracking (the default when :mod:`angioexp.tracking.session` is installed) the run is an
MLflow run; ``--no-tracking`` trains plainly into ``--out``. Under ``torchrun`` the core backend
trains with DDP (see :mod:`angioexp.train.ddp`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

from angioexp.config import load_config, set_value

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


def build_config(args: argparse.Namespace):
    overrides = list(args.overrides or [])
    if args.init_from is not None:
        overrides.append(f"init_from={args.init_from}")
    if args.coco_dir:
        overrides.append(f"data.coco_dir={args.coco_dir}")
    cfg = load_config(args.config, overrides, stage=args.stage, backend=args.backend)
    if args.out:
        set_value(cfg, "train.out_dir", args.out, "--out")
    if args.max_steps is not None:
        set_value(cfg, "train.max_steps", args.max_steps, "--max-steps")
    if args.budget_minutes is not None:
        set_value(cfg, "train.budget_minutes", args.budget_minutes, "--budget-minutes")
    return cfg


def _resumed_config(resume: str, args: argparse.Namespace):
    """Untracked resume: the config stored in the checkpoint; only stopping rules may change."""
    from angioexp.train.checkpoint import config_from_dict, load_training_checkpoint, resolve_resume

    path = resolve_resume(resume)
    cfg = config_from_dict(load_training_checkpoint(path)["config"], source=path)
    if args.max_steps is not None:
        set_value(cfg, "train.max_steps", args.max_steps, "--max-steps")
    if args.budget_minutes is not None:
        set_value(cfg, "train.budget_minutes", args.budget_minutes, "--budget-minutes")
    return cfg


def run(args: argparse.Namespace) -> int:
    tracked = not args.no_tracking and importlib.util.find_spec("angioexp.tracking.session") is not None
    if args.resume and not tracked:
        cfg = _resumed_config(args.resume, args)
    else:
        cfg = build_config(args)
    if tracked:
        from angioexp.tracking.session import tracked_train

        result = tracked_train(cfg, args)
    elif cfg.backend == "sam3":
        from angioexp.backends.sam3.run import train_sam3

        result = train_sam3(cfg, args)
    else:
        from angioexp.train.loop import train

        result = train(cfg, resume_from=args.resume)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.final_metrics.items())
                        if k in ("val/AP", "val/AP75", "val/AP75_tol", "val/dice", "val/cldice", "val/dice_mean_segments"))
    print(f"trained {result.steps} steps ({result.stopped_reason}, {result.wall_seconds / 60:.1f} min) → {result.out_dir}"
          + (f"; {summary}" if summary else "") + (f"; {result.nan_events} non-finite steps" if result.nan_events else ""))
    return 0
