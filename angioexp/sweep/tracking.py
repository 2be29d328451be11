"""MLflow for sweeps: one parent run per study, one nested run per trial (docs/design.md#tracking).

Experiment ``angioexp-sweeps``. The parent run (tag ``sweep.role=parent``) is found again by its
``sweep.study`` tag when a study is resumed, so a study has exactly one parent however often it
is restarted. Each trial's nested run (``mlflow.parentRunId``) streams the training through
``angioexp.tracking.callback.MlflowCallback`` and ends with the trial's state, outcome and
Optuna number as tags; the best trial's model is logged into its own run and registered
(``angio-stage{N}``, alias ``challenger``) with ``angioexp.tracking.models``.

Optuna's storage is the source of truth: tracking trouble is logged as a warning and never fails
a trial.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "angioexp-sweeps"
STUDY_TAG = "sweep.study"
ROLE_TAG = "sweep.role"
PARENT_RUN_ATTR = "angioexp.mlflow_parent_run_id"
# Optuna state → MLflow run status (pruned runs were stopped on purpose: KILLED).
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_digest(coco_dir: Path | None) -> str | None:
    if coco_dir is None:
        return None
    try:
        from angioexp.data.register import dataset_digest as digest

        return digest(coco_dir)
    except Exception as exc:  # noqa: BLE001 - a tag must not stop a sweep
        log.warning("could not compute the dataset digest of %s: %s", coco_dir, exc)
        return None


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite tracking stores answer 'database is locked' under several writers: retry briefly."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if i == attempts - 1 or "locked" not in str(exc).lower():
                raise
            time.sleep(0.2 * (2**i))


@dataclass
class TrialRun:
    run_id: str
    callback: Any  # MlflowCallback
    trial_number: int
    started: float


class SweepTracker:
    """Creates/finds the parent run and the nested trial runs of one study."""

    def __init__(self, study_name: str, parent_run_id: str, *, base_tags: dict[str, str] | None = None,
                 experiment_id: str | None = None, client=None):
        from mlflow import MlflowClient

        self.study_name = study_name
        self.parent_run_id = parent_run_id
        self.client = client or MlflowClient()
        self.experiment_id = experiment_id or self.client.get_run(parent_run_id).info.experiment_id
        self.base_tags = dict(base_tags or {})

    @classmethod
    def attach(cls, study_name: str, parent_run_id: str, client=None) -> "SweepTracker":
        """A worker process joining the launcher's parent run (its tags become the trials' tags)."""
        from mlflow import MlflowClient

        client = client or MlflowClient()
        parent = _retry(client.get_run, parent_run_id)
        keep = (STUDY_TAG, "stage", "backend", "git.sha", "dataset.digest")
        tags = {k: v for k, v in parent.data.tags.items() if k in keep}
        return cls(study_name, parent_run_id, base_tags=tags, experiment_id=parent.info.experiment_id, client=client)

    # -- the parent run ---------------------------------------------------------------------

    @classmethod
    def start_parent(cls, study, space, *, backend: str, storage_url: str, coco_dir: Path | None,
                     n_trials: int | None, client=None) -> "SweepTracker":
        """Find this study's parent run (resume) or create it; mark it RUNNING."""
        from mlflow import MlflowClient

        from angioexp.tracking.uri import configure_mlflow, ensure_experiment

        configure_mlflow()
        client = client or MlflowClient()
        experiment_id = _retry(ensure_experiment, EXPERIMENT)
        digest = dataset_digest(coco_dir)
        base_tags = {
            STUDY_TAG: study.study_name, "stage": str(space.stage), "backend": backend, "git.sha": git_sha(),
        }
        if digest:
            base_tags["dataset.digest"] = digest
        parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if parent_id:
            try:
                if client.get_run(parent_id).info.lifecycle_stage != "active":
                    parent_id = None
            except Exception:  # noqa: BLE001 - deleted, or another tracking store
                parent_id = None
        # `mlflow run . -e sweep` starts a run and hands it over in MLFLOW_RUN_ID: it becomes the
        # study's parent (first time) or points to it (resume). Either way it is taken out of the
        # environment so that no trial (e.g. SAM3's writer) logs into it by mistake.
        project_run = os.environ.pop("MLFLOW_RUN_ID", None)
        if not parent_id and project_run:
            parent_id = project_run
            study.set_user_attr(PARENT_RUN_ATTR, parent_id)
        elif project_run and project_run != parent_id:
            client.set_tag(project_run, "sweep.parent_run_id", parent_id or "")
        if not parent_id:
            found = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{STUDY_TAG}` = '{_quote(study.study_name)}' and tags.`{ROLE_TAG}` = 'parent'",
                max_results=1,
            )
            parent_id = found[0].info.run_id if found else None
        tags = {**base_tags, ROLE_TAG: "parent", "optuna.storage": storage_url,
                "sweep.directions": ",".join(d.name.lower() for d in study.directions),
                "sweep.objective": ",".join(space.metrics), "sweep.sampler": space.sampler.name,
                "sweep.pruner": space.pruner.name,
                "sweep.pruner_metric": space.pruning_metric}
        if space.path:
            tags["sweep.space"] = str(space.path)
        if n_trials is not None:
            tags["sweep.n_trials"] = str(n_trials)
        if parent_id:
            # nested runs live in the parent's experiment (an adopted `mlflow run` run may not be
            # in angioexp-sweeps), or the UI cannot nest them
            experiment_id = _retry(client.get_run, parent_id).info.experiment_id
            _retry(client.update_run, parent_id, status="RUNNING")
            log.info("MLflow: continuing parent run %s of study %s", parent_id, study.study_name)
        else:
            run = _retry(client.create_run, experiment_id, run_name=f"sweep-{study.study_name}", tags={"mlflow.runName": f"sweep-{study.study_name}"})
            parent_id = run.info.run_id
            study.set_user_attr(PARENT_RUN_ATTR, parent_id)
            try:
                with _tmp_file("space.yaml", space.text) as path:
                    client.log_artifact(parent_id, str(path))
            except Exception as exc:  # noqa: BLE001
                log.warning("could not log the space file to MLflow: %s", exc)
            log.info("MLflow: parent run %s for study %s (experiment %s)", parent_id, study.study_name, EXPERIMENT)
        from mlflow.entities import RunTag

        _retry(client.log_batch, parent_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return cls(study.study_name, parent_id, base_tags=base_tags, experiment_id=experiment_id, client=client)

    def finish_parent(self, study, summary: dict, *, status: str = "FINISHED") -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(f"sweep/{k}", float(v), now, 0) for k, v in summary.get("counts", {}).items()]
        for i, value in enumerate(summary.get("best_values") or []):
            metrics.append(Metric(f"sweep/best_value_{i}" if i else "sweep/best_value", float(value), now, 0))
        tags = [RunTag("sweep.best_trial", str(summary.get("best_trial")))]
        if summary.get("best_params") is not None:
            tags.append(RunTag("sweep.best_params", json.dumps(summary["best_params"])[:5000]))
        try:
            _retry(self.client.log_batch, self.parent_run_id, metrics=metrics, tags=tags)
            _retry(self.client.set_terminated, self.parent_run_id, status)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not finish the MLflow parent run %s: %s", self.parent_run_id, exc)

    # -- trial runs -------------------------------------------------------------------------

    def start_trial(self, trial, cfg, values: dict[str, Any]) -> TrialRun | None:
        from angioexp.tracking.callback import MlflowCallback

        tags = {
            **self.base_tags,
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": f"{self.study_name}-t{trial.number:03d}",
            ROLE_TAG: "trial",
            "sweep.trial_number": str(trial.number),
            "optuna.trial_number": str(trial.number),
            "optuna.trial_id": str(trial._trial_id),
            "sweep.params": json.dumps(values, default=str)[:5000],
        }
        retried = trial.system_attrs.get("failed_trial") if hasattr(trial, "system_attrs") else None
        if retried is not None:
            tags["sweep.retry_of_trial"] = str(retried)
        try:
            run = _retry(self.client.create_run, self.experiment_id, run_name=tags["mlflow.runName"], tags=tags)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not create the run of trial %d (the trial goes on): %s", trial.number, exc)
            return None
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        callback = MlflowCallback(run.info.run_id, client=self.client, plot=False)
        return TrialRun(run.info.run_id, callback, trial.number, time.time())

    def finish_trial(self, trial_run: TrialRun, *, state: str, outcome: str, metrics: dict[str, float],
                     attrs: dict, error: Any = None, checkpoint: Path | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        try:
            trial_run.callback.flush()
            now = int(time.time() * 1000)
            step = int(attrs.get("steps") or attrs.get("step") or attrs.get("pruned_at_step") or 0)
            final = [Metric(f"final/{k}", float(v), now, step) for k, v in metrics.items()]
            tags = {"sweep.state": state, "sweep.outcome": outcome}
            for key in ("failure", "step", "lr", "events", "pruned_at_step", "worker_pid", "worker_host"):
                if attrs.get(key) is not None:
                    tags[f"sweep.{key}"] = attrs[key]
            if error is not None:  # why it stopped: the error of a FAIL, the reason of a PRUNED
                tags["sweep.error" if state == "FAIL" else "sweep.reason"] = str(error)[:4000]
            if checkpoint is not None:
                tags["sweep.checkpoint"] = str(Path(checkpoint).resolve())
            _retry(self.client.log_batch, trial_run.run_id, metrics=final,
                   tags=[RunTag(k, str(v)) for k, v in tags.items()])
            _retry(self.client.set_terminated, trial_run.run_id, RUN_STATUS.get(state, "FAILED"))
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not finish the run of trial %d: %s", trial_run.trial_number, exc)

    def close_stale_trial_runs(self, study) -> int:
        """Trial runs of FAILed trials (killed workers) left RUNNING → FAILED. Returns how many."""
        from optuna.trial import TrialState

        closed = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            run_id = t.user_attrs.get("mlflow_run_id")
            if not run_id:
                continue
            try:
                run = self.client.get_run(run_id)
                if run.info.status == "RUNNING":
                    self.client.set_tag(run_id, "sweep.state", "FAIL")
                    self.client.set_tag(run_id, "sweep.outcome", t.user_attrs.get("outcome", "killed"))
                    self.client.set_terminated(run_id, "FAILED")
                    closed += 1
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow: could not close run %s of trial %d: %s", run_id, t.number, exc)
        return closed

    # -- the best model -----------------------------------------------------------------------

    def register_best(self, study, space, trial, cfg) -> Any:
        """Log the best trial's checkpoint as a model in its run and register it (challenger).

        Skipped (with a warning) when the checkpoint is not on this machine, e.g. a trial that
        ran on another host of a PostgreSQL sweep.
        """
        import mlflow

        from angioexp.tracking.models import log_trained_model, register_and_alias

        if study.user_attrs.get("angioexp.registered_trial") == trial.number:
            log.info("best trial %d is already registered", trial.number)
            return None
        checkpoint = trial.user_attrs.get("checkpoint")
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not checkpoint or not Path(checkpoint).is_file():
            log.warning("best trial %d: checkpoint %s is not on this machine; not registered", trial.number, checkpoint)
            return None
        if not run_id:
            log.warning("best trial %d has no MLflow run; not registered", trial.number)
            return None
        metrics = dict(trial.user_attrs.get("metrics") or {})
        tags = {"sweep.study": study.study_name, "sweep.trial_number": trial.number, "source": "sweep"}
        with mlflow.start_run(run_id=run_id):
            info = log_trained_model(checkpoint, cfg, tags=tags)
            registration = register_and_alias(info, cfg, metrics=metrics, tags=tags)
            mlflow.set_tags({"sweep.registered": f"{registration.name} v{registration.version}"})
        # start_run(run_id) reopened the finished run; restore its terminal state
        self.client.set_terminated(run_id, "FINISHED")
        study.set_user_attr("angioexp.registered_trial", trial.number)
        study.set_user_attr("angioexp.registered_version", f"{registration.name}/{registration.version}")
        self.client.set_tag(self.parent_run_id, "sweep.registered", f"{registration.name} v{registration.version} (trial {trial.number})")
        return registration


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


class _tmp_file:
    def __init__(self, name: str, text: str):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="angioexp-sweep-")
        self.path = Path(self._dir.name) / name
        self.path.write_text(text, encoding="utf-8")

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()
