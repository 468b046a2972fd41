"""Shared fixtures: small synthetic catalogs, an untrained tiny checkpoint, a moto S3 server on 127.0.0.1, the
shipped real data set, a fresh embedded Airflow environment per module."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FASHION_SMALL = SHARED / "data" / "fashion-small" / "products.parquet"


@pytest.fixture(scope="session")
def tmp_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A clean synthetic catalog: 400 products, string columns (color, pattern, style)."""
    from pipeline.synthetic import make_catalog
    path = tmp_path_factory.mktemp("catalog") / "catalog.parquet"
    make_catalog(400, str(path), seed=11)
    return str(path)


@pytest.fixture(scope="session")
def bad_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    """200 good products plus one row of each bad kind (synthetic.BAD_ROWS)."""
    from pipeline.synthetic import make_catalog
    path = tmp_path_factory.mktemp("bad") / "catalog.parquet"
    make_catalog(200, str(path), seed=5, with_bad_rows=True)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained tiny model over the synthetic catalog's tasks (color, pattern, style): enough where a test
    is about columns, files or which rows are scored, not accuracy. test_scoring and test_cuda override it
    with one trained briefly."""
    import torch

    import cmaclip
    from cmaclip.checkpoint import Checkpoint, save_checkpoint
    from pipeline import synthetic

    tasks = {"color": list(synthetic.COLORS), "pattern": list(synthetic.PATTERNS), "style": list(synthetic.STYLES)}
    config = cmaclip.load_config("tiny").with_tasks({t: len(v) for t, v in tasks.items()})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    save_checkpoint(path, cmaclip.create_model(config, load_pretrained=False), Checkpoint(config, tasks, {}, {}))
    return str(path)


@pytest.fixture(scope="session")
def fashion_small() -> str:
    if not FASHION_SMALL.is_file():
        pytest.skip(f"real data set not present at {FASHION_SMALL}")
    return str(FASHION_SMALL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server_command() -> list[str] | None:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    return [found] if found else None


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except Exception:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1 and a free port; AWS_* env points at it for the
    session. Skips when moto_server is not installed or does not start."""
    command = _moto_server_command()
    if command is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not _wait_ready(endpoint, proc):
            pytest.skip(f"moto_server did not start on {endpoint}")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_EC2_METADATA_DISABLED": "true"}.items():
                mp.setenv(key, value)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_bucket(moto_s3: str) -> str:
    """A fresh, empty bucket; returns its s3:// URI."""
    from pipeline.io import storage
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"s3://{name}")
    fs.mkdir(name)
    return f"s3://{name}"


def _rebind_airflow() -> None:
    """Airflow reads AIRFLOW__* overrides on every `conf.get`, but binds its metadata DB engine when first
    imported. If another test module imported airflow already (a module-level provider import does),
    bind it again to what the environment says now."""
    if "airflow.settings" in sys.modules:
        from airflow import settings
        settings.configure_vars()
        settings.reconfigure_orm()


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory):
    """A fresh embedded environment: every variable that locates state points under a temporary folder."""
    from pipeline.orchestration import airflow_home

    home = tmp_path_factory.mktemp("cmaclip-home")
    env = airflow_home.environment(home)
    env.update(CMACLIP_RETRY_DELAY_S="1", CMACLIP_TASK_RETRIES="1")  # retries in seconds, not minutes
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        _rebind_airflow()
        yield {"home": home, "env": env}
    _rebind_airflow()


def pytest_report_header(config: pytest.Config) -> str:
    return f"cmaclip shared data: {FASHION_SMALL} ({'present' if FASHION_SMALL.is_file() else 'absent'}); " \
           f"cpus: {os.cpu_count()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip where no CUDA device is; bench/gpu.sh runs them (`-m cuda`) on a GPU."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch  # only when a collected test needs to know

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu.sh runs these on a GPU)")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    """Loading an MLflow pyfunc puts its bundled code first on sys.path; a process spawned later by the
    same test session (DDP workers) would then import that copy instead of the repository's."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved
