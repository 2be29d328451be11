"""MLproject entry points → ``angioexp`` commands.

MLproject parameters always have a value; an optional one defaults to the empty string. This
shim drops empty options, expands ``--overrides "a=1 b=2"`` into ``--set a=1 --set b=2`` and
``--extra "..."`` into raw arguments, then runs the ``angioexp`` command in-process — so the
run that ``mlflow run`` created (``MLFLOW_RUN_ID``) is the run the command logs into.

    python -m angioexp.tracking.mlproject train --stage 1 --backend core --config '' --overrides ''
"""

from __future__ import annotations

import shlex
import sys

# MLproject option → angioexp flag, per entry point ("" keeps the name)
RENAMES = {
    "train": {"--init_from": "--init-from", "--budget_minutes": "--budget-minutes", "--max_steps": "--max-steps"},
    "sweep": {"--n_trials": "--n-trials"},
    "promote": {"--from_alias": "--from-alias"},
}
COMMANDS = {"prepare", "train", "evaluate", "sweep", "promote", "dashboard"}


# The main job's wall-time budget per stage (minutes; train.max_steps still caps a fast machine):
# with data preparation and the evaluations it fits ~30 minutes on 2 CPU cores.
MAIN_JOB_MINUTES = {1: 8.0, 2: 14.0}
# Training-time evaluations of the main job score the first N val frames; the whole synthetic
# val split (~340 frames) would cost minutes per evaluation on a CPU.
MAIN_JOB_VAL_IMAGES = 120


def main_job_steps(argv: list[str]) -> list[list[str]]:
    """``main [--overrides "k=v ..."] [--stage1_minutes M] [--stage2_minutes M]`` → its commands.

    A budget of ``0`` or ``none`` trains to ``train.max_steps`` instead."""
    options = {"--overrides": "", "--stage1_minutes": "", "--stage2_minutes": ""}
    for key, value in zip(argv[::2], argv[1::2]):
        if key not in options:
            raise SystemExit(f"main: unknown option {key!r} (expected one of {sorted(options)})")
        options[key] = value.strip()
    extra = [f"data.max_val_images={MAIN_JOB_VAL_IMAGES}",
             *shlex.split(options["--overrides"].replace(";", " "))]  # the user's overrides come last and win
    steps = []
    for stage in (1, 2):
        text = options[f"--stage{stage}_minutes"] or str(MAIN_JOB_MINUTES[stage])
        budget = [] if text.lower() in ("0", "none", "null") else ["--budget-minutes", text]
        steps.append(["train", "--stage", str(stage), *budget, *[a for o in extra for a in ("--set", o)]])
    return [*steps, ["dashboard"]]


def run_main_job(argv: list[str]) -> int:
    """The ``main`` entry point: Stage 1 → Stage 2 (from Stage 1's champion) → dashboards.

    Each step is its own process and its own MLflow run (in ``angioexp-stage1`` /
    ``angioexp-stage2`` / ``angioexp-dashboards``); the launcher run that ``mlflow run`` made is
    only tagged with their ids, so that no step logs into it.
    """
    import os
    import subprocess

    steps = main_job_steps(argv)
    env = dict(os.environ)
    launcher = env.pop("MLFLOW_RUN_ID", None)
    for step in steps:
        print(f"[angioexp main] angioexp {' '.join(step)}", flush=True)
        code = subprocess.call([sys.executable, "-m", "angioexp", *step], env=env)
        if code != 0:
            print(f"[angioexp main] step failed with exit code {code}: angioexp {' '.join(step)}", file=sys.stderr)
            return code
    if launcher:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for stage in (1, 2):
            runs = client.search_runs(
                [client.get_experiment_by_name(f"angioexp-stage{stage}").experiment_id],
                order_by=["attributes.start_time DESC"], max_results=1,
            )
            if runs:
                client.set_tag(launcher, f"angioexp.stage{stage}_run", runs[0].info.run_id)
    return 0


def to_argv(entry: str, argv: list[str]) -> list[str]:
    """MLproject-style ``--key value`` pairs → the angioexp command line."""
    if entry not in COMMANDS:
        raise SystemExit(f"unknown entry point {entry!r} (expected one of {sorted(COMMANDS)})")
    out = [entry]
    overrides: list[str] = []
    extra: list[str] = []
    flags: list[str] = []
    i = 0
    while i < len(argv):
        key = argv[i]
        if not key.startswith("--"):
            raise SystemExit(f"expected --option value, got {key!r}")
        if i + 1 >= len(argv):
            raise SystemExit(f"option {key} has no value")
        value = argv[i + 1].strip()
        i += 2
        if value == "":
            continue  # optional parameter left at its default
        if key == "--overrides":
            overrides += shlex.split(value.replace(";", " "))  # "a=1 b=[1,3]" or "a=1; b=2"
        elif key == "--extra":
            extra += shlex.split(value)
        elif key == "--checkpoint" and entry == "train":
            overrides.append(f"sam3.checkpoint={value}")  # vanilla SAM3 weights for backend sam3
        elif value.lower() in ("true", "false") and key in ("--register", "--no_tracking"):
            if value.lower() == "true":
                flags.append(key.replace("_", "-"))
        else:
            out += [RENAMES.get(entry, {}).get(key, key.replace("_", "-")), value]
    for override in overrides:  # `angioexp train --set` takes one KEY=VALUE per flag
        out += ["--set", override]
    return out + flags + extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m angioexp.tracking.mlproject ENTRY [--key value ...]")
    if argv[0] == "main":
        return run_main_job(argv[1:])
    command = to_argv(argv[0], argv[1:])
    if command[0] == "sweep":
        from angioexp.sweep.__main__ import main as sweep_main

        return int(sweep_main(command[1:]) or 0)
    from angioexp.cli import main as cli_main

    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
