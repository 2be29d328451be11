"""Where runs go: the tracking URI, the artifact root, experiments, and an up-front reachability check.

Defaults (docs/design.md#tracking): ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db``.
Artifacts of experiments created here go under ``ANGIOEXP_ARTIFACT_ROOT``, else
``<cwd>/mlartifacts`` (MLflow 3 no longer accepts a plain file store by default, so the SQLite
store needs an explicit artifact root next to it). Remote servers choose their own artifact
store unless ``ANGIOEXP_ARTIFACT_ROOT`` is set explicitly.

    uri = configure_mlflow()              # sets mlflow's tracking URI, returns it
    check_tracking_server(uri)            # InputError in seconds, not minutes of HTTP retries
    experiment_id = ensure_experiment("angioexp-stage1")
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from angioexp.errors import InputError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# MLflow's own HTTP client retries for minutes with back-off; the check below answers first.
CONNECT_TIMEOUT_S = 5.0


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or an absolute SQLite path in the current directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{(Path.cwd() / DEFAULT_DB).resolve()}"


def artifact_root() -> Path:
    """Folder under which experiments we create keep their artifacts."""
    return Path(os.environ.get("ANGIOEXP_ARTIFACT_ROOT") or Path.cwd() / DEFAULT_ARTIFACTS).resolve()


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https", "databricks")


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def configure_mlflow(uri: str | None = None) -> str:
    """Point mlflow (fluent API and new clients) at ``uri`` or :func:`tracking_uri`; return it."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    _create_sqlite_store_once(uri)
    return uri


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and ``:memory:``)."""
    if urlparse(uri).scheme != "sqlite":
        return None
    db_path = uri[len("sqlite:///"):]  # sqlite:////abs.db → /abs.db; sqlite:///rel.db → rel.db
    return Path(db_path).expanduser() if db_path and db_path != ":memory:" else None


def _create_sqlite_store_once(uri: str) -> None:
    """Open a local SQLite store under an exclusive lock on its folder.

    Opening a store runs MLflow's schema migrations when the file is new; several processes
    doing that at once (four runs and a sweep started together on the default ``mlflow.db``)
    fail with "Online migration expected to match one row". Under the lock the first one
    creates the schema and the others find it done. Stores that are not there yet or are not
    SQLite files are left to :func:`check_tracking_server` to report.
    """
    import fcntl

    import mlflow

    db = _sqlite_file(uri)
    if db is None or not db.parent.is_dir() or (db.exists() and not _is_sqlite_file(db)):
        return
    folder = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates + migrates, cached per URI
    finally:
        os.close(folder)  # releases the lock


def _is_sqlite_file(db: Path) -> bool:
    if not db.is_file():
        return False
    if db.stat().st_size == 0:
        return True  # SQLite treats an empty file as an empty database
    with open(db, "rb") as handle:
        return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def check_tracking_server(uri: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with a one-line error when the tracking store cannot be used.

    http(s): the server's ``/health`` endpoint must answer within ``timeout``. sqlite: the
    database's folder must exist and be writable (SQLite creates the file itself).
    """
    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            raise InputError(
                f"tracking server {uri} is unreachable ({type(exc).__name__}); start it "
                "(mlflow server --host 127.0.0.1 ...) or unset MLFLOW_TRACKING_URI",
                key="MLFLOW_TRACKING_URI",
            ) from None
        if response.status_code != 200:
            raise InputError(f"tracking server {uri} answered HTTP {response.status_code} on /health", key="MLFLOW_TRACKING_URI")
    elif parsed.scheme == "sqlite":
        db = _sqlite_file(uri)
        if db is not None:
            folder = db.resolve().parent
            if not folder.is_dir():
                raise InputError(f"folder of the SQLite tracking store does not exist: {folder}", key="MLFLOW_TRACKING_URI")
            if not os.access(folder, os.W_OK):
                raise InputError(f"folder of the SQLite tracking store is not writable: {folder}", key="MLFLOW_TRACKING_URI")
            if db.is_dir():
                raise InputError("the SQLite tracking store is a folder, not a database file", file=db, key="MLFLOW_TRACKING_URI")
            if db.exists() and not _is_sqlite_file(db):
                raise InputError("not an SQLite database (point MLFLOW_TRACKING_URI at an MLflow database, "
                                 "or at a new file name to create one)", file=db, key="MLFLOW_TRACKING_URI")
    elif parsed.scheme in ("", "file"):
        raise InputError(
            f"'{uri}' is a plain file store, which MLflow 3 no longer uses by default; "
            "use sqlite:///mlflow.db or an http(s) tracking server",
            key="MLFLOW_TRACKING_URI",
        )


# MLflow's UI opens experiments with this tag as model-training experiments (runs, metrics,
# models) rather than GenAI/trace views; every experiment angioexp creates or logs into gets it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tag_experiment_kind(client, experiment) -> None:
    """Give ``experiment`` (an Experiment or its id) the model-training kind tag if it lacks it."""
    if isinstance(experiment, str):
        experiment = client.get_experiment(experiment)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def ensure_experiment(name: str, client=None) -> str:
    """Id of experiment ``name``, creating it (artifacts under :func:`artifact_root`) if needed,
    tagged as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`, also on an older one).

    Safe against a concurrent creator (sweep workers): a lost race re-reads the winner's id.
    A deleted experiment of that name is an error (MLflow would refuse to log into it).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if _is_local(client.tracking_uri) or os.environ.get("ANGIOEXP_ARTIFACT_ROOT"):
            location = (artifact_root() / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            # another process created it between our lookup and create
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise InputError(
            f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or choose another tracking.experiment",
            key="tracking.experiment",
        )
    tag_experiment_kind(client, experiment)
    return experiment.experiment_id
