"""The nightly scoring DAG on the real engines: Airflow with a PostgreSQL metadata database and the
CeleryExecutor (Redis broker, a real `airflow celery worker` process), MLflow as a server on a PostgreSQL
backend store. Uses the PostgreSQL and Redis servers of this machine; skips, saying why, where they are absent.

Airflow 3 runs a DAG through an executor with four processes: the dag-processor parses dags/ into the
metadata DB, the scheduler creates task instances and hands them to the CeleryExecutor (a message on
Redis), the Celery worker runs each task in a task-SDK process that reports its state and XComs to the
api-server's execution API (signed with the JWT secret the scheduler shares), and the api-server writes
them to the DB. This test starts exactly those, triggers one run with `airflow dags trigger` and watches
the metadata DB. Isolation: fresh databases (dropped at the end), a dedicated Redis DB number and a queue
name of its own, free ports, a temporary AIRFLOW_HOME and CMACLIP_HOME.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import servers

pytestmark = [pytest.mark.slow, pytest.mark.services]

_missing = servers.postgres_unavailable() or servers.redis_unavailable()
if _missing is None:
    try:
        import airflow.providers.celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        _missing = f"the Celery provider or redis client is not installed: {exc}"
if _missing:
    pytest.skip(_missing, allow_module_level=True)

DAG_ID = "cmaclip_nightly_scoring"
REDIS_DB = 13            # dedicated to this test; the queue name is unique per run on top of that
ROWS, ROWS_PER_SHARD = 90, 45
RUN_TIMEOUT_S = 300


def _far_cron() -> str:
    """A daily cron 12 hours away: no scheduled run can start during the test (a cron whose last fire
    time is recent would be run at once by CronTriggerTimetable), only the one the test triggers."""
    at = datetime.now(timezone.utc) + timedelta(hours=12)
    return f"{at.minute} {at.hour} * * *"


def _query(database: str, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg2
    conn = psycopg2.connect(host=servers.PG_HOST, port=servers.PG_PORT, user=servers.PG_USER, dbname=database)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _wait(what: str, check, timeout: float, interval: float = 2.0, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s\n{on_timeout()}")


def _clean_redis(queue: str) -> None:
    """Remove this run's queue and its bindings from the shared Redis DB; leave everything else."""
    import redis
    r = redis.Redis(host=servers.REDIS_HOST, port=servers.REDIS_PORT, db=REDIS_DB)
    for key in r.scan_iter(f"*{queue}*"):
        r.delete(key)
    for key in r.scan_iter("_kombu.binding.*"):
        stale = [m for m in r.smembers(key) if queue.encode() in m]
        if stale:
            r.srem(key, *stale)
    r.close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """Everything that locates state under tmp_path; nothing inherited from the caller's shell."""
    monkeypatch.setenv("CMACLIP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "home" / "airflow"))
    monkeypatch.setenv("CMACLIP_STORAGE_PREFIXES", str(tmp_path))  # the DAG params name files under tmp_path
    for key in ("MLFLOW_TRACKING_URI", "CMACLIP_ARTIFACT_ROOT", "AIRFLOW__CORE__DAGS_FOLDER",
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER", "AIRFLOW_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_nightly_scoring_dag_on_celery_postgres_redis(home, monkeypatch):
    from pipeline.ingest.dataset import ingest
    from pipeline.orchestration import airflow_home
    from pipeline.synthetic import make_catalog
    from pipeline.training import trainer

    queue = f"cmaclip_test_{uuid.uuid4().hex[:8]}"
    logs = home / "logs"
    procs: dict[str, object] = {}
    with servers.postgres_database("cmaclip_test_airflow") as af_db, \
            servers.postgres_database("cmaclip_test_mlflow") as ml_db, \
            servers.mlflow_server(servers.postgres_url(ml_db), (home / "mlartifacts").as_uri(),
                                  logs / "mlflow.log") as mlflow_url:
        try:
            # --- a champion in the Postgres-backed registry (trained here, outside Airflow) -------------
            monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
            model_name = f"cmaclip-celery-{uuid.uuid4().hex[:6]}"
            catalog = str(home / "catalog.parquet")
            make_catalog(ROWS, catalog, seed=31)
            ingest(catalog, ["color", "pattern", "style"], str(home / "dataset"))
            trained = trainer.train("tiny", str(home / "dataset"), str(home / "training"), stages=["warmup"],
                                    epochs=1, model_name=model_name, device="cpu", print_fn=None)
            assert trained["registered"]["alias"] == "champion"

            # --- Airflow on Postgres + Celery/Redis ----------------------------------------------------
            api_port = servers.free_port()
            for key, value in {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": servers.postgres_url(af_db),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": f"redis://{servers.REDIS_HOST}:{servers.REDIS_PORT}/{REDIS_DB}",
                "AIRFLOW__CELERY__RESULT_BACKEND": servers.postgres_url(af_db, "db+postgresql"),
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "CMACLIP_SCORING_SCHEDULE": _far_cron(),
                "CMACLIP_TASK_RETRIES": "0",       # a failure should fail the test now, not in minutes
            }.items():
                monkeypatch.setenv(key, value)
            # `db migrate` on Postgres and the gpu pool. No `home` argument: with one, prepare() would pin
            # the embedded SQLite defaults; without, the variables set above win.
            env = airflow_home.prepare()
            assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
            af = lambda *args: airflow_home.airflow_command(args)  # noqa: E731
            procs["api-server"] = servers.start(af("api-server", "--apps", "execution", "--host", "127.0.0.1",
                                                   "--port", str(api_port), "--workers", "1"),
                                                logs / "api-server.log", env)
            procs["dag-processor"] = servers.start(af("dag-processor"), logs / "dag-processor.log", env)
            procs["scheduler"] = servers.start(af("scheduler"), logs / "scheduler.log", env)
            procs["worker"] = servers.start(af("celery", "worker", "--queues", queue, "--concurrency", "2",
                                               "--skip-serve-logs"), logs / "worker.log", env)

            def diagnostics() -> str:
                rows = _query(af_db, "SELECT task_id, map_index, state, hostname FROM task_instance "
                                     "WHERE dag_id = %s ORDER BY task_id", (DAG_ID,))
                task_logs = sorted(Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]).rglob("*.log"))
                return "\n".join([f"task instances: {rows}",
                                  *(f"--- {p}\n{servers.tail(p, 3000)}" for p in task_logs[-4:]),
                                  *(f"--- {n}\n{servers.tail(logs / f'{n}.log', 3000)}" for n in procs)])

            def alive() -> None:
                # A component that exits (bad config, an import error) fails the test at once, with its log.
                dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
                assert not dead, f"exited: {dead}\n{diagnostics()}"

            servers.wait_http(f"http://127.0.0.1:{api_port}/execution/health", procs["api-server"], timeout=180)
            _wait("the dag-processor to serialize the DAG", lambda: alive() or _query(
                af_db, "SELECT 1 FROM serialized_dag WHERE dag_id = %s", (DAG_ID,)), 180, on_timeout=diagnostics)

            # --- one run, triggered like an operator would ----------------------------------------------
            run_id = f"test__{uuid.uuid4().hex[:8]}"
            conf = {"catalog_uri": catalog, "model": f"models:/{model_name}@champion",
                    "predictions_uri": str(home / "predictions"), "rows_per_shard": ROWS_PER_SHARD}
            airflow_home.run_airflow(["dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf)],
                                     env)

            def finished():
                alive()
                rows = _query(af_db, "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s",
                              (DAG_ID, run_id))
                return rows and rows[0][0] in ("success", "failed") and rows[0][0]

            state = _wait(f"run {run_id} to finish", finished, RUN_TIMEOUT_S, on_timeout=diagnostics)
            assert state == "success", diagnostics()

            # --- what ran where ----------------------------------------------------------------------------
            tis = _query(af_db, "SELECT task_id, map_index, state, queue, hostname FROM task_instance "
                                "WHERE dag_id = %s AND run_id = %s", (DAG_ID, run_id))
            assert {t[0] for t in tis} == {"validate", "plan", "score", "finalize", "report", "gate", "publish"}
            assert [t for t in tis if t[0] == "score"] and len([t for t in tis if t[0] == "score"]) == 2
            assert all(t[2] == "success" and t[3] == queue and t[4] for t in tis), tis
            # Every task went through Celery: the worker stores one result per task in the result backend
            # (just after the task reported its state to the api-server, hence the short wait).
            _wait("a Celery result for every task", lambda: _query(
                af_db, "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")[0][0] >= len(tis), 60)

            # --- the outputs, and MLflow's registry on Postgres ---------------------------------------------
            import pyarrow.parquet as pq
            latest = pq.read_table(home / "predictions" / "published" / "latest.parquet")
            manifests = list((home / "predictions" / "_manifests").glob("*.json"))
            assert len(manifests) == 1
            manifest = json.loads(manifests[0].read_text())
            assert manifest["rows_in"] == ROWS == manifest["predicted"] + manifest["quarantined"]
            assert latest.num_rows == manifest["predicted"]
            assert set(latest.column("model_name").to_pylist()) == {model_name}
            registered = _query(ml_db, "SELECT name FROM registered_models WHERE name = %s", (model_name,))
            assert registered == [(model_name,)]
        finally:
            for name in ("scheduler", "worker", "dag-processor", "api-server"):  # scheduler first: no new work
                if name in procs:
                    servers.stop(procs[name])
            _clean_redis(queue)
