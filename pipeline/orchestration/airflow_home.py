"""The embedded Airflow: one folder under the project's data directory, no servers to run first.

`environment()` is the set of variables every Airflow process of the project gets (the demo's `airflow dags
test`, the tests, `airflow standalone` for the UI): `AIRFLOW_HOME` under `CMACLIP_HOME`, the repo's `dags/`
and `plugins/` (in a checkout) as the dags and plugins folders, a SQLite metadata DB, LocalExecutor sized
for this machine, no example DAGs, MLflow without progress bars. `prepare()` migrates that DB and creates
the `gpu` pool the training tasks queue on; `paused()` keeps a DAG paused while the demo's test runs emit
the Asset events it is scheduled on, so the scheduler does not start runs from them later.

At scale nothing here changes in the DAGs: point `AIRFLOW__DATABASE__SQL_ALCHEMY_CONN` at PostgreSQL and
`AIRFLOW__CORE__EXECUTOR` at Celery or Kubernetes; an already-set `AIRFLOW__*` variable wins over these
defaults. This module never imports airflow (pipeline/ must not): it only builds variables and runs the
`airflow` command.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from pipeline import settings

# The checkout's dags/ and plugins/. The wheel does not ship them: installed, the DAG files and the plugin
# go where Airflow looks by default, $AIRFLOW_HOME/dags and $AIRFLOW_HOME/plugins.
DAGS_FOLDER = settings.REPO_ROOT / "dags" if settings.REPO_ROOT else None
PLUGINS_FOLDER = settings.REPO_ROOT / "plugins" if settings.REPO_ROOT else None
GPU_POOL = "gpu"
# How many training tasks may run at once across all DAG runs: one per accelerator of the training
# workers (a task that runs torchrun over N devices should count for N). Two on the embedded setup.
GPU_POOL_SLOTS = int(os.environ.get("CMACLIP_GPU_POOL_SLOTS", "2"))
ENV_FILE = "cmaclip.env"
# What `write_env_file` records: enough for another shell to run Airflow on the same state.
EXPORTED = ("CMACLIP_HOME", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__LOGGING__BASE_LOG_FOLDER", "AIRFLOW__CORE__EXECUTOR",
            "AIRFLOW__CORE__LOAD_EXAMPLES", "AIRFLOW__CORE__UNIT_TEST_MODE",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "AIRFLOW__API__HOST", "AIRFLOW__CORE__PARALLELISM",
            "PYTHONPATH", "HF_HUB_OFFLINE", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
# What locates state: pinned when a caller asks for a specific home (see `environment`).
_STATE_KEYS = ("CMACLIP_HOME", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__LOGGING__BASE_LOG_FOLDER", "MLFLOW_TRACKING_URI",
               "CMACLIP_ARTIFACT_ROOT")


def cpu_count() -> int:
    """The CPUs this process may run on (a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def airflow_home(home: Path | None = None) -> Path:
    return (home or settings.home()) / "airflow"


def environment(home: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) plus the embedded Airflow settings.

    Without `home`, variables already present in `base` win, so a deployment's own configuration (the
    Docker image sets AIRFLOW_HOME, the executor, PostgreSQL) is never overridden. With `home` (tests, a
    scratch environment) everything that locates state is pinned under it, so nothing leaks in from the
    caller's shell. `CMACLIP_HOME` is always set so the tasks, MLflow and Airflow agree on one data dir.
    """
    env = dict(os.environ if base is None else base)
    if home is not None:
        for key in _STATE_KEYS:
            env.pop(key, None)
    home = (home or Path(env.get("CMACLIP_HOME") or settings.home())).resolve()
    af_home = Path(env.get("AIRFLOW_HOME") or airflow_home(home))
    defaults = {
        "CMACLIP_HOME": str(home),
        "AIRFLOW_HOME": str(af_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER or af_home / "dags"),
        # The API server's check of a trigger's conf against the DAG's params (plugins/cmaclip_trigger_guard.py).
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER or af_home / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{af_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(af_home / "logs"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # LocalExecutor forks `parallelism` workers up front (32 by default: ~6 GB of idle processes).
        # Tasks beyond it wait their turn; the training pool and the scoring map are smaller anyway.
        "AIRFLOW__CORE__PARALLELISM": str(max(2, cpu_count())),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        # New DAGs run when triggered: the nightly cron must not wait for someone to unpause it.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # The embedded UI is for this machine only.
        "AIRFLOW__API__HOST": "127.0.0.1",
        # Pretrained weights are local files; a hub lookup would hang offline.
        "HF_HUB_OFFLINE": "1",
        # MLflow draws its download progress bars on stderr, which a task log shows as ERROR lines.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    # Tasks import `pipeline` from where this process did, even where the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(settings.IMPORT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def airflow_command(args: Sequence[str]) -> list[str]:
    """`airflow <args>` with the `airflow` next to this interpreter (the venv's), not whatever is on PATH."""
    exe = Path(sys.executable).with_name("airflow")
    return [str(exe) if exe.exists() else "airflow", *args]


def run_airflow(args: Sequence[str], env: Mapping[str, str], check: bool = True,
                capture: bool = True) -> subprocess.CompletedProcess:
    """Run one `airflow` command in the embedded environment; on failure the error carries its output."""
    proc = subprocess.run(airflow_command(args), env=dict(env), text=True,
                          capture_output=capture, cwd=settings.IMPORT_ROOT)
    if check and proc.returncode != 0:
        detail = (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:] if capture else ""
        raise RuntimeError(f"`airflow {' '.join(args)}` failed with exit code {proc.returncode}\n{detail}")
    return proc


def prepare(home: Path | None = None, pool_slots: int = GPU_POOL_SLOTS) -> dict[str, str]:
    """Create (or upgrade) the metadata DB and the `gpu` pool; return the environment to run Airflow in.

    Idempotent: `db migrate` is a no-op on a current DB and `pools set` overwrites the slot count.
    """
    env = environment(home)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    run_airflow(["db", "migrate"], env)
    run_airflow(["pools", "set", GPU_POOL, str(pool_slots),
                 "Training tasks: one slot per accelerator-bound task"], env)
    if env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:"):
        write_env_file(env)  # embedded only: a server connection string carries a password
    return env


@contextlib.contextmanager
def paused(dag_id: str, env: Mapping[str, str]) -> Iterator[None]:
    """`dag_id` paused while the block runs, then as it was. Airflow queues a run for an Asset event only
    for unpaused DAGs, and `airflow dags test` runs a paused DAG all the same: the demo runs its DAGs with
    `dags test` and the scoring DAG paused, so the champion event of its retrain run does not start a
    scoring run the first time someone starts `airflow standalone`. The event stays in the Asset's history."""
    run_airflow(["dags", "reserialize"], env)  # `dags pause` passes over a DAG with no row yet
    # The JSON is the last line: Airflow's start-up warnings go to stdout too.
    details = json.loads(run_airflow(["dags", "details", dag_id, "-o", "json"], env).stdout.splitlines()[-1])
    was_paused = str(details[0]["is_paused"]) == "True"  # the CLI prints it as text
    run_airflow(["dags", "pause", dag_id], env)
    try:
        yield
    finally:
        if not was_paused:
            run_airflow(["dags", "unpause", dag_id], env)


def write_env_file(env: Mapping[str, str]) -> Path:
    """`$AIRFLOW_HOME/cmaclip.env`: the embedded settings as shell assignments, so any shell can join this
    environment (`set -a; . data/airflow/cmaclip.env; set +a`) to run the UI or `airflow dags trigger`."""
    path = Path(env["AIRFLOW_HOME"]) / ENV_FILE
    keys = [k for k in EXPORTED if k in env] + [k for k in ("MLFLOW_TRACKING_URI",) if k in env]
    path.write_text("".join(f"{k}={shlex.quote(env[k])}\n" for k in keys))
    path.chmod(0o600)
    return path


def ui_hint(env: Mapping[str, str]) -> str:
    """The command that opens the Airflow UI on this embedded environment (printed by the demo)."""
    env_file = Path(env["AIRFLOW_HOME"]) / ENV_FILE
    # standalone starts its components as `airflow ...` from PATH: put this interpreter's bin first.
    bin_dir = Path(sys.executable).parent
    return f"(set -a; . {shlex.quote(str(env_file))}; set +a; PATH={shlex.quote(str(bin_dir))}:$PATH airflow standalone)"


if __name__ == "__main__":
    # `python -m pipeline.orchestration.airflow_home`: prepare the embedded Airflow (or the one the environment names).
    prepared = prepare()
    print(f"Airflow ready: AIRFLOW_HOME={prepared['AIRFLOW_HOME']}; settings in "
          f"{Path(prepared['AIRFLOW_HOME']) / ENV_FILE}")
