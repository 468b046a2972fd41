"""Where the project keeps its state, and the MLflow connection every pipeline step shares.

Embedded default: `$CMACLIP_HOME/mlflow.db` (SQLite) with artifacts in `$CMACLIP_HOME/mlartifacts`.
At scale, `MLFLOW_TRACKING_URI` points at an MLflow server and its artifact store takes over.

SQLite and parallel writers (mapped Airflow tasks, pytest workers): MLflow already sets a busy timeout
per session; what breaks is (1) several processes creating the schema of a fresh file at once, (2) pooled
connections holding stale locks, and (3) two processes creating the same experiment. `configure()`
handles (1) with a file lock and WAL mode, (2) with SQLAlchemy's NullPool, and `experiment_id()` (3)
by re-reading after a lost race.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

# The folder that holds the `pipeline` and `cmaclip` packages: the repo in a source checkout, site-packages
# when installed from a wheel. Subprocesses get it on PYTHONPATH so they import this same code.
IMPORT_ROOT = Path(__file__).resolve().parent.parent
# The source checkout this code runs from, or None when installed from a wheel. Only defaults meant for
# development hang off it (the data folder, the DAG folder, git lineage, the paper's results folder).
REPO_ROOT = IMPORT_ROOT if (IMPORT_ROOT / "pyproject.toml").is_file() else None
# Creating the schema takes seconds; a holder past this is hung (a dead one releases the lock with its fd).
SCHEMA_LOCK_TIMEOUT_S = 300.0
_prepared: set[str] = set()  # SQLite files this process has already prepared
# MLflow 3 files an experiment as GenAI or model training by this tag (its `mlflow.experimentKind`); every
# cmaclip experiment is model training. MLflow 3.17's UI picks its view from a per-browser switch (or the
# link's `?workflowType=machine_learning`, which pipeline.tracking.links adds) and other MLflow tools read
# the tag.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def home() -> Path:
    """The project's data directory: `CMACLIP_HOME`; else `<repo>/data` in a source checkout, and
    `$XDG_DATA_HOME/cmaclip` (`~/.local/share/cmaclip`) when installed, where site-packages is no place
    for data."""
    if os.environ.get("CMACLIP_HOME"):
        return Path(os.environ["CMACLIP_HOME"]).expanduser().resolve()
    if REPO_ROOT is not None:
        return REPO_ROOT / "data"
    return (Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "cmaclip").resolve()


def storage_prefixes() -> list[str]:
    """Where storage named by a DAG param may lie: `CMACLIP_STORAGE_PREFIXES` (comma-separated URI
    prefixes, e.g. `s3://cmaclip/,/data/`), else `home()` alone, which is where the embedded defaults
    put everything. The CLI is not confined: whoever runs it has its own access already."""
    return _listed("CMACLIP_STORAGE_PREFIXES") or [str(home())]


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the embedded SQLite file under `home()`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str:
    """Artifact location for experiments created against a SQLite store (a server picks its own)."""
    return os.environ.get("CMACLIP_ARTIFACT_ROOT") or (home() / "mlartifacts").as_uri()


def _listed(variable: str) -> list[str]:
    return [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]


def image_roots() -> list[str]:
    """`CMACLIP_IMAGE_ROOTS`: folders or bucket prefixes that `image_uri` rows may read besides the
    catalog's own folder (comma-separated). See docs/security.md."""
    return _listed("CMACLIP_IMAGE_ROOTS")


def image_hosts() -> list[str]:
    """`CMACLIP_IMAGE_HOSTS`: the http(s) hosts (`host` or `host:port`) that `image_uri` rows may fetch
    from; none when unset, so a catalog row cannot make a worker call an internal service."""
    return _listed("CMACLIP_IMAGE_HOSTS")


def image_timeout_s() -> float:
    """`CMACLIP_IMAGE_TIMEOUT_S`: the most one `image_uri` row's fetch may take (default 10 s, like
    img2dataset's); a stalled connect or socket read gives up after half of it."""
    return float(os.environ.get("CMACLIP_IMAGE_TIMEOUT_S") or 10.0)


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


def configure(uri: str | None = None) -> str:
    """Point this process's MLflow client (tracking and registry) at `uri` (default `tracking_uri()`),
    preparing a SQLite store for concurrent use first. Idempotent and cheap after the first call."""
    import mlflow

    uri = uri or tracking_uri()
    # MLflow announces every SQLAlchemy engine (one per client) and every start and stop of the system
    # metrics monitor (once per stage) at INFO: noise in every command's output.
    for name in ("mlflow.store.db.utils", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if is_sqlite(uri):
        # Set before MLflow builds its engine: a pooled connection can keep a lock between sessions.
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        _prepare_sqlite(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _prepare_sqlite(uri: str) -> None:
    """WAL mode (readers never block the writer) and the schema, created by exactly one process."""
    if uri in _prepared:
        return
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    path = _sqlite_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = f"{path}.lock"
    try:
        with FileLock(lock, timeout=SCHEMA_LOCK_TIMEOUT_S):
            with sqlite3.connect(path, timeout=60) as conn:
                conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            # Building the store runs MLflow's migrations on an empty file; under the lock, only once.
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
    except Timeout:
        raise TimeoutError(f"waited {SCHEMA_LOCK_TIMEOUT_S:.0f} s for {lock}: another process has held it "
                           f"that long while preparing the MLflow store {path}; if that process is hung, "
                           "stop it") from None
    _prepared.add(uri)


def experiment_id(name: str, retries: int = 5) -> str:
    """The id of experiment `name`, created if missing and tagged as model training
    (`EXPERIMENT_TAGS`). Two processes may race to create it: the loser's create fails on the unique
    name, and it reads the winner's experiment instead."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    location = f"{artifact_root().rstrip('/')}/{name}" if is_sqlite(uri) else None
    for attempt in range(retries):
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return _tagged(found)
        try:
            return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:
            time.sleep(0.2 * (attempt + 1))
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        raise RuntimeError(f"could not create or find MLflow experiment {name!r} at {uri}")
    return _tagged(found)


def _tagged(experiment) -> str:
    """An experiment made before cmaclip tagged them gets the tags on first use."""
    import mlflow

    for key, value in EXPERIMENT_TAGS.items():
        if experiment.tags.get(key) is None:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id
