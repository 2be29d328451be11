"""Finding where a killed or stopped run left off: ``angioexp train --resume RUN_ID|DIR``.

A tracked run records its output folder as the run tag ``angioexp.out_dir`` (and the folder
records its run in ``mlflow_run.json``), so either handle leads to the last checkpoint: the core
backend's ``checkpoints/last.pt`` (whose ``config`` entry is the configuration the run trained
with) or the sam3 backend's ``sam3/checkpoints/checkpoint.pt`` (config from the run's logged
``config/config.yaml``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from angioexp.errors import InputError
from angioexp.tracking.callback import OUT_DIR_TAG

RUN_FILE = "mlflow_run.json"  # written into each tracked run's out_dir
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ResumePoint:
    run_id: str | None  # None: a folder from an untracked run
    out_dir: Path
    checkpoint: Path  # out_dir/checkpoints/last.pt
    step: int
    config: dict  # the config dict stored in the checkpoint


def write_run_file(out_dir: Path, run_id: str, tracking_uri: str, experiment_id: str) -> None:
    from angioexp.fileio import write_json_atomic

    write_json_atomic(Path(out_dir) / RUN_FILE, {"run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id})


def find_resume_point(handle: str, *, client=None) -> ResumePoint:
    """``handle``: an MLflow run id or a run's out_dir. Errors name what is missing."""
    from angioexp.checkpoints import read_checkpoint

    text = str(handle).strip()
    run_id: str | None = None
    if _RUN_ID.match(text) and not Path(text).exists():
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = client or MlflowClient()
        try:
            run = client.get_run(text)
        except MlflowException:
            raise InputError(f"no MLflow run '{text}' in {client.tracking_uri}", key="--resume") from None
        if run.info.lifecycle_stage == "deleted":
            raise InputError(f"run '{text}' is deleted; restore it before resuming", key="--resume")
        out = run.data.tags.get(OUT_DIR_TAG)
        if not out:
            raise InputError(f"run '{text}' has no '{OUT_DIR_TAG}' tag: it was not started by angioexp train, or was killed before training began", key="--resume")
        out_dir, run_id = Path(out), text
    else:
        out_dir = Path(text).expanduser().resolve()
        if not out_dir.is_dir():
            raise InputError("not a run id and not a folder", file=text, key="--resume")
        run_file = out_dir / RUN_FILE
        if run_file.is_file():
            try:
                run_id = json.loads(run_file.read_text(encoding="utf-8")).get("run_id")
            except (OSError, ValueError):
                raise InputError("unreadable run file", file=run_file) from None
    from angioexp.train.runlock import refuse_if_owned

    refuse_if_owned(out_dir)  # still training: a second writer would duplicate its steps
    # core: checkpoints/last.pt (holds its config); sam3: SAM3's trainer checkpoint
    candidates = [out_dir / "checkpoints" / "last.pt", out_dir / "sam3" / "checkpoints" / "checkpoint.pt"]
    checkpoint = next((c for c in candidates if c.is_file()), None)
    if checkpoint is None:
        if run_id is not None:
            _close_abandoned_run(run_id, out_dir, client)
        raise InputError(
            "no checkpoint to resume from (the run stopped before its first checkpoint; "
            "start it again instead)", file=candidates[0], key="--resume",
        )
    payload = read_checkpoint(checkpoint)
    config = payload.get("config") if isinstance(payload, dict) else None
    if not isinstance(config, dict) and run_id is not None:
        config = _logged_config(run_id, client)  # sam3 checkpoints hold SAM3's config, not ours
    if not isinstance(config, dict):
        raise InputError("checkpoint has no 'config' entry and the run has no config/config.yaml", file=checkpoint)
    step = payload.get("step", payload.get("steps", 0)) if isinstance(payload, dict) else 0
    return ResumePoint(run_id=run_id, out_dir=out_dir, checkpoint=checkpoint, step=int(step or 0), config=config)


def _logged_config(run_id: str, client=None) -> dict | None:
    """The resolved config YAML that MlflowCallback logged as ``config/config.yaml``."""
    import tempfile

    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/config.yaml", dst_path=tmp,
                                                        tracking_uri=client.tracking_uri if client is not None else None)
        except (MlflowException, OSError):
            return None
        data = yaml.safe_load(Path(local).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _close_abandoned_run(run_id: str, out_dir: Path, client=None) -> None:
    """A run whose process died before its first checkpoint cannot be resumed; unless a live
    process still owns its folder, end it as FAILED instead of leaving it RUNNING for ever."""
    from mlflow import MlflowClient

    from angioexp.train.runlock import owner_of

    client = client or MlflowClient()
    if owner_of(out_dir) is None and client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "angioexp.failure", "the process died before its first checkpoint")
        client.set_terminated(run_id, "FAILED")
