"""Real servers for the integration tests, started as child processes on 127.0.0.1 and always stopped:
an `mlflow server`, fresh PostgreSQL databases, a Redis reachability probe. Shared by
test_s3_end_to_end.py and test_celery_postgres.py (moto's S3 server is conftest's `moto_s3`)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    """A console script of the interpreter running the tests (the project's venv), not PATH's."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Until `url` answers 2xx; raises with the reason if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception as exc:  # connection refused while starting, 5xx while migrating
            last = repr(exc)
            time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s: {last}")


def start(command: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """A child process in its own process group (so stop() also ends what it forks), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")
    try:
        return subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=dict(env or os.environ),
                                cwd=cwd, start_new_session=True)
    finally:
        out.close()  # the child holds its own descriptor


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the process group (warm shutdown), SIGKILL to what is left after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children of the group may outlive its leader (forked task processes): end them too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts_destination: str, log: Path,
                  env: Mapping[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` with proxied artifacts (clients upload over HTTP; the server writes to
    `artifacts_destination`, e.g. s3://bucket/prefix with MLFLOW_S3_ENDPOINT_URL in `env`). Yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # MLflow's job runner (7 huey consumer processes, for GenAI jobs the pipeline never submits): off.
    env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start([venv_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", backend_uri, "--serve-artifacts",
                  "--artifacts-destination", artifacts_destination], log, env)
    try:
        try:
            wait_http(f"{url}/health", proc, timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"mlflow server did not start: {exc}\n{tail(log)}") from exc
        yield url
    finally:
        stop(proc)


# --- PostgreSQL and Redis on this machine --------------------------------------------------------------

def postgres_unavailable() -> str | None:
    """Why the local PostgreSQL cannot be used, or None."""
    try:
        import psycopg2
    except ImportError:
        return "psycopg2 is not installed"
    try:
        psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3).close()
    except Exception as exc:
        return f"no PostgreSQL at {PG_HOST}:{PG_PORT} (user {PG_USER}): {str(exc).strip()}"
    return None


def redis_unavailable() -> str | None:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=3) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):
                return f"{REDIS_HOST}:{REDIS_PORT} does not answer PING like Redis"
    except OSError as exc:
        return f"no Redis at {REDIS_HOST}:{REDIS_PORT}: {exc}"
    return None


def _admin(sql: str) -> None:
    import psycopg2
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    conn.autocommit = True  # CREATE/DROP DATABASE refuse to run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty database with a unique name; dropped afterwards (connections still open are ended
    first). Yields its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_url(database: str, driver: str = "postgresql+psycopg2") -> str:
    return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"
