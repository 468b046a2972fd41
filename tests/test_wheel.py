"""The project installs like a package: a wheel built from this tree, installed where the source tree
cannot be imported, runs make-catalog, ingest, train and score from an unrelated folder. It reuses the
dependencies of this interpreter (`--no-deps`), so only the packages and their data are under test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = 40


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command[:3]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def build_wheel(tmp: Path) -> Path:
    """`pip wheel` over a copy of what pyproject.toml names (the packages and the readme), so no stale
    build/ folder of the checkout can put files in the wheel that the tree no longer has."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy(REPO_ROOT / name, source / name)
    for package in {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}:
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(source),
          "-w", str(tmp / "dist")], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("cmaclip-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, str]]:
    """The wheel installed into its own folder; the environment that imports it and nothing of the repo,
    with no CMACLIP_HOME, so the installed default for the data directory is the one in use."""
    tmp = tmp_path_factory.mktemp("wheel")
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(build_wheel(tmp))])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMACLIP_", "MLFLOW_", "AIRFLOW"))}
    env.update(PYTHONPATH=str(site), XDG_DATA_HOME=str(tmp / "xdg"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    work = tmp / "elsewhere"
    work.mkdir()
    return {"site": site, "env": env, "work": work, "xdg": tmp / "xdg"}


def test_the_installed_packages_are_the_wheels(installed):
    code = "import cmaclip, paper, pipeline; print(cmaclip.__file__); print(paper.__file__); print(pipeline.__file__)"
    done = _run([sys.executable, "-c", code], env=installed["env"], cwd=installed["work"])
    assert len(done.stdout.split()) == 3
    for path in done.stdout.split():
        assert Path(path).is_relative_to(installed["site"]), f"imported {path}, not the wheel's code"


def test_the_paper_command_is_installed(installed):
    """`cmaclip-paper` runs from the install; with no checkout beside it there is no default catalog."""
    command = [str(installed["site"] / "bin" / "cmaclip-paper")]
    assert "--catalog" in _run([*command, "--help"], env=installed["env"], cwd=installed["work"]).stdout
    done = subprocess.run(command, capture_output=True, text=True, env=installed["env"], cwd=installed["work"])
    assert done.returncode == 2 and "--catalog" in done.stderr


def test_wheel_runs_the_pipeline_from_an_unrelated_folder(installed):
    def cmaclip(*args: str) -> dict:
        command = [str(installed["site"] / "bin" / "cmaclip"), *args]
        return json.loads(_run(command, env=installed["env"], cwd=installed["work"]).stdout)

    assert cmaclip("make-catalog", "--rows", str(ROWS), "--out", "catalog.parquet")["rows"] == ROWS
    ingested = cmaclip("ingest", "--catalog", "catalog.parquet", "--tasks", "color,pattern", "--out", "dataset",
                       "--min-class-count", "2", "--workers", "0")
    assert ingested["rows_kept"] == ROWS
    trained = cmaclip("train", "--config", "tiny", "--data", "dataset", "--out", "training", "--epochs", "1",
                      "--json")
    assert trained["stages"].keys() == {"warmup", "end_to_end", "tuning"}
    assert trained["registered"]["alias"] == "champion"
    scored = cmaclip("score", "--catalog", "catalog.parquet", "--model", "models:/cmaclip@champion",
                     "--out", "predictions", "--all", "--workers", "0", "--threads", "1")
    assert scored["predicted"] == ROWS

    written = sorted((installed["work"] / "predictions" / "predictions").rglob("*.parquet"))
    assert written and sum(pq.ParquetFile(p).metadata.num_rows for p in written) == ROWS
    # No CMACLIP_HOME: MLflow's store went to $XDG_DATA_HOME/cmaclip, not beside the installed code.
    assert (installed["xdg"] / "cmaclip" / "mlflow.db").is_file()
    assert not (installed["site"] / "data").exists()
