"""``tracked_train(cfg, args)``: one training run = one MLflow run, from checks to registry.

What ``angioexp train`` (and so ``mlflow run . -e train``) runs unless ``--no-tracking``:

1. checks that fail in seconds, before anything is created: tracking store reachable;
   ``init_from`` (Stage 2 default ``models:/angio-stage1@champion``) resolves to weights;
2. data: ``angioexp.data.prepare.prepare`` (synthetic default, cached by digest);
3. the run: the one ``mlflow run`` created (``MLFLOW_RUN_ID``), the one being resumed, or a
   new one in ``angioexp-stage{N}`` named ``s1-core-<digest>-<time>`` /
   ``s2-core-from-s1v3-<digest>-<time>``; tags stage, backend, dataset.digest, git.sha
   (+ sweep.study); system metrics; datasets as run inputs;
   the run folder is locked for this process (a second writer is refused, naming it); a resume of
   a FINISHED run does nothing unless ``--max-steps`` extends it;
4. training through the chosen backend with :class:`MlflowCallback` streaming metrics;
5. only after a successful, evaluated run: LoggedModel → registry version → ``challenger``
   (+ ``champion`` when it beats the current one).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import logging
import os
import subprocess
from pathlib import Path

from angioexp.checkpoints import config_from_dict
from angioexp.errors import AngioexpError, CheckpointLoadError, InputError, TrainingDiverged
from angioexp.fileio import refuse_output_over_inputs
from angioexp.tracking.callback import OUT_DIR_TAG, MlflowCallback, log_load_report
from angioexp.tracking.uri import check_tracking_server, configure_mlflow, ensure_experiment, tag_experiment_kind
from angioexp.train.runlock import claim_new_folder, refuse_foreign_run_folder, run_lock
from angioexp.train.signals import Terminated

log = logging.getLogger(__name__)

COCO_DIR_TAG = "angioexp.coco_dir"


# ---------------------------------------------------------------------------------------------
# Small helpers (public: the sweep uses them for its trial runs)


def git_sha(start: Path | None = None) -> tuple[str, bool | None]:
    """(HEAD sha, dirty?) of the repository holding angioexp, or ('unknown', None)."""
    folder = start or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10, check=True).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MLFLOW_GIT_COMMIT", "unknown"), None


def run_tags(cfg, *, digest: str, sweep_study: str | None = None, init=None) -> dict[str, str]:
    """The tags every angioexp run carries (docs/design.md#tags), plus lineage for the compare view."""
    sha, dirty = git_sha()
    tags = {
        "stage": str(cfg.stage),
        "backend": cfg.backend,
        "dataset.digest": digest,
        "git.sha": sha,
        "lineage": f"s{cfg.stage}" + (f"<-{init.short}" if init is not None else ""),
    }
    if dirty is not None:
        tags["git.dirty"] = str(dirty).lower()
    if sweep_study:
        tags["sweep.study"] = sweep_study
    if init is not None:
        tags.update(init.as_tags())
    return tags


def run_name(cfg, *, digest: str, init=None, when: _dt.datetime | None = None) -> str:
    """``s1-core-<digest8>-<MMDD-HHMMSS>`` or ``s2-core-from-s1v3-<digest8>-<…>``."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    stamp = (when or _dt.datetime.now()).strftime("%m%d-%H%M%S")
    origin = f"-from-{init.short}" if init is not None else ""
    return f"s{cfg.stage}-{cfg.backend}{origin}-{digest[:8]}-{stamp}"


def _prepare_data(cfg) -> tuple[Path, str]:
    from angioexp.data.prepare import prepare
    from angioexp.data.register import dataset_digest

    coco_dir = Path(prepare(cfg.data, cfg.stage)).resolve()
    return coco_dir, dataset_digest(coco_dir)


# ---------------------------------------------------------------------------------------------


class RunFinished(AngioexpError):
    """``--resume`` of a run that already finished: nothing to do (the CLI exits 0)."""

    exit_code = 0


def tracked_train(cfg, args=None, *, extra_callbacks=()):
    """Train with full MLflow tracking; returns the backend's ``TrainResult``.

    ``args`` (from ``angioexp train``) may carry ``resume`` (run id or out_dir), ``out``,
    ``max_steps``, ``budget_minutes`` and ``sweep_study``; everything else comes from ``cfg``.
    The run's folder is locked for the whole call (:mod:`angioexp.train.runlock`): one writer.
    """
    with contextlib.ExitStack() as held:
        return _tracked_train(cfg, args, extra_callbacks, held)


def _tracked_train(cfg, args, extra_callbacks, held: contextlib.ExitStack):
    import mlflow
    from mlflow import MlflowClient

    from angioexp.backends import get_backend
    from angioexp.config import experiment_name
    from angioexp.tracking.models import resolve_model
    from angioexp.tracking.resume import find_resume_point, write_run_file

    args = args if args is not None else argparse.Namespace()
    if cfg.stage not in (1, 2):
        raise InputError(f"unknown stage {cfg.stage!r} (expected 1 or 2)", key="stage")

    # 1. fail-fast checks ------------------------------------------------------------------
    backend = get_backend(cfg.backend)
    backend.check(cfg)
    uri = configure_mlflow()
    check_tracking_server(uri)
    client = MlflowClient(uri)

    resume_handle = getattr(args, "resume", None)
    resume_point = None
    if resume_handle:
        resume_point = find_resume_point(resume_handle, client=client)
        held.enter_context(run_lock(resume_point.out_dir))  # a second writer stops here
        cfg = _resumed_config(resume_point, args)
        if resume_point.run_id and resume_point.step >= cfg.train.max_steps:
            status = client.get_run(resume_point.run_id).info.status
            if status == "FINISHED":
                raise RunFinished(
                    f"run {resume_point.run_id} is finished (step {resume_point.step} of {cfg.train.max_steps}); "
                    f"nothing to do — pass --max-steps N (> {resume_point.step}) to train it further")

    init = None
    init_checkpoint = None
    if cfg.init_from and resume_point is None:
        init = resolve_model(cfg.init_from, client=client)
        init_checkpoint = init.weights
        log.info("init_from %s → %s", cfg.init_from, init.weights)
        backend.check_init(cfg, init_checkpoint)  # refused weights leave no run and no folder

    # 2. data -------------------------------------------------------------------------------
    coco_dir, digest = _prepare_data(cfg)

    # 3. the run ----------------------------------------------------------------------------
    env_run_id = os.environ.get("MLFLOW_RUN_ID")
    sweep_study = getattr(args, "sweep_study", None) or os.environ.get("ANGIOEXP_SWEEP_STUDY")
    if resume_point is not None and resume_point.run_id is None:
        raise InputError(f"{resume_point.out_dir} has no mlflow_run.json: it was trained without tracking; resume it with --no-tracking", key="--resume")
    resume_run_id = resume_point.run_id if resume_point is not None else None
    if resume_run_id:
        old_digest = client.get_run(resume_run_id).data.tags.get("dataset.digest")
        if old_digest and old_digest != digest:
            raise InputError(f"the data changed since run {resume_run_id} started (digest {old_digest} → {digest}); resuming would mix datasets", key="--resume")
        run_id, experiment_id, name = resume_run_id, client.get_run(resume_run_id).info.experiment_id, None
        if env_run_id and env_run_id != resume_run_id:
            # `mlflow run -P resume=…` made a fresh run; the training continues in the old one
            log.warning("resuming into run %s; the run %s that `mlflow run` created only points to it", resume_run_id, env_run_id)
            client.set_tag(env_run_id, "angioexp.resumed_into", resume_run_id)
    elif env_run_id:
        run_id = env_run_id
        experiment_id = client.get_run(env_run_id).info.experiment_id
        tag_experiment_kind(client, experiment_id)  # `mlflow run` created it without angioexp's tag
        expected = experiment_name(cfg)
        actual = client.get_experiment(experiment_id).name
        if actual != expected:
            log.warning("this run lives in experiment '%s' (chosen by `mlflow run`); pass --experiment-name %s to keep the convention", actual, expected)
        name = run_name(cfg, digest=digest, init=init)
    else:
        run_id = None
        experiment_id = ensure_experiment(experiment_name(cfg), client)
        name = run_name(cfg, digest=digest, init=init)

    if resume_point is None:
        # --out is this run's folder; by default each run gets its own under train.out_dir
        explicit = getattr(args, "out", None)
        out_dir = Path(explicit if explicit else Path(cfg.train.out_dir) / name).resolve()
        refuse_output_over_inputs(out_dir, [coco_dir, getattr(args, "config", None), init_checkpoint])
        if explicit:
            refuse_foreign_run_folder(out_dir)
        else:
            out_dir = claim_new_folder(out_dir)
        cfg.train.out_dir = str(out_dir)
        held.enter_context(run_lock(out_dir))

    tags = run_tags(cfg, digest=digest, sweep_study=sweep_study, init=init)
    tags[COCO_DIR_TAG] = str(coco_dir)
    tags[OUT_DIR_TAG] = str(Path(cfg.train.out_dir).resolve())
    system_metrics = cfg.tracking.log_system_metrics
    if system_metrics and importlib.util.find_spec("psutil") is None:
        log.warning("system metrics need psutil (pip install psutil); logging without them")
        system_metrics = False
    active = mlflow.start_run(
        run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=name,
        tags=tags if resume_point is None else {"angioexp.resumes": _resume_count(client, resume_run_id) + 1},
        log_system_metrics=system_metrics,
    )
    run_id = active.info.run_id
    status = "FAILED"
    callback = MlflowCallback(run_id, client=client, init_source=init.uri if init is not None else None)
    try:
        Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
        write_run_file(Path(cfg.train.out_dir), run_id, uri, active.info.experiment_id)
        if resume_point is None:
            _log_inputs(coco_dir)
        log.info("MLflow run %s (%s) in %s", run_id, name or "resumed", uri)

        # 4. train ------------------------------------------------------------------------
        try:
            result = backend.train(
                cfg, data=coco_dir, init=init_checkpoint, callbacks=[callback, *extra_callbacks],
                resume_from=resume_point.out_dir if resume_point else None,  # both backends take the run folder
                run_id=run_id,
            )
        except CheckpointLoadError as exc:
            if exc.report is not None:
                log_load_report(client, run_id, exc.report, source=init.uri if init is not None else None)
            client.set_tag(run_id, "angioexp.failure", f"init load: {exc}"[:5000])
            raise
        except TrainingDiverged as exc:
            callback.flush()
            client.set_tag(run_id, "angioexp.failure", f"diverged at step {exc.step} (lr {exc.lr:.3g}, {exc.events} non-finite steps)")
            raise

        # 5. model + registry (only for a finished, evaluated run) ---------------------------
        callback.flush()
        if cfg.tracking.register and not result.pruned and not result.diverged:
            _log_and_register(cfg, result, client=client, run_id=run_id, digest=digest, init=init)
        status = "FINISHED"
        return result
    except KeyboardInterrupt as exc:
        status = "KILLED"
        try:
            client.set_tag(run_id, "angioexp.stopped", "SIGTERM" if isinstance(exc, Terminated) else "interrupted")
        except Exception:  # noqa: BLE001 - stopping matters more than the note
            log.warning("could not record the stop on run %s", run_id)
        raise
    except Exception as exc:
        if type(exc).__name__ == "TrialPruned":
            status = "KILLED"
        elif not isinstance(exc, (InputError, TrainingDiverged, CheckpointLoadError)):
            # why it stopped (a crash, a full disk …) stays on the run for whoever finds it FAILED
            try:
                client.set_tag(run_id, "angioexp.failure", f"{type(exc).__name__}: {exc}"[:5000])
            except Exception:  # noqa: BLE001 - the original error matters more
                log.warning("could not record the failure on run %s", run_id)
        raise
    finally:
        callback.close()
        mlflow.end_run(status=status)


def _resume_count(client, run_id: str | None) -> int:
    if not run_id:
        return 0
    try:
        return int(client.get_run(run_id).data.tags.get("angioexp.resumes", "0"))
    except ValueError:
        return 0


def _resumed_config(point, args):
    """The run's own config; only the stopping rules may change on resume."""
    from angioexp.train.cli import resumed_config

    cfg = config_from_dict(point.config, source=point.out_dir)
    cfg.train.out_dir = str(point.out_dir)
    return resumed_config(cfg, args)


def _log_inputs(coco_dir: Path, attempts: int = 4) -> None:
    import time

    from mlflow.exceptions import MlflowException

    from angioexp.data.register import log_coco_inputs

    for attempt in range(attempts):
        try:
            return log_coco_inputs(coco_dir, splits={"train": "training", "val": "validation"})
        except MlflowException as exc:
            # Runs started together log the same new dataset at once; behind `mlflow server` on
            # PostgreSQL all but one insert hit the datasets' unique key. The dataset exists then:
            # the next try links it.
            text = str(exc).lower()
            if attempt == attempts - 1 or not ("duplicate key" in text or "unique constraint" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


def _log_and_register(cfg, result, *, client, run_id, digest, init):
    from angioexp.tracking.models import log_trained_model, register_and_alias

    checkpoint = result.best_checkpoint or result.checkpoint
    if checkpoint is None or not Path(checkpoint).is_file():
        log.warning("no checkpoint to register (run %s)", run_id)
        return None
    if cfg.backend == "core" and result.best_checkpoint:
        metrics, step = result.best_metrics, None  # best.pt: its own step, its evaluation's metrics
    else:
        # sam3: best_checkpoint holds the final weights (SAM3's trainer keeps one checkpoint)
        metrics, step = result.final_metrics, result.steps
    extra = {"source_run_id": run_id, "dataset_digest": digest, "metrics": metrics,
             "init_from": init.uri if init is not None else None}
    info = log_trained_model(checkpoint, cfg, step=step, tags={"stage": cfg.stage, "backend": cfg.backend, "dataset.digest": digest},
                             extra_info=extra)
    if not metrics:
        log.warning("run %s has no evaluation; logged model %s but did not register it", run_id, info.model_id)
        return None
    tags = {"dataset.digest": digest, "source_run": run_id}
    if init is not None:
        tags["init_from"] = init.uri
        if init.model_name and init.version:
            tags["init_from.version"] = f"{init.model_name}/{init.version}"
    reg = register_and_alias(info, cfg, metrics=metrics, tags=tags, client=client)
    client.set_tag(run_id, "registered.model", reg.name)
    client.set_tag(run_id, "registered.version", reg.version)
    client.set_tag(run_id, "registered.decision", reg.decision)
    return reg
