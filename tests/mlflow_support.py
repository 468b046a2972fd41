"""Shared by the MLflow tests: an isolated MLflow home, one tiny dataset and one trained tiny model per
test session (training is the expensive part, so test_tracking and test_registry share it), and the
helpers that log a deliberately untrained model and run code in a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Enough epochs for the tiny model to beat an untrained one clearly on the 40-product test split.
EPOCHS = {"warmup": 3, "end_to_end": 1, "tuning": 1}
ENV_KEYS = ("CMACLIP_HOME", "MLFLOW_TRACKING_URI", "CMACLIP_ARTIFACT_ROOT")
_shared: dict[str, Any] = {}  # one per process: pytest imports this module once


@contextmanager
def mlflow_home(home: Path, tracking_uri: str | None = None) -> Iterator[Path]:
    """Point the pipeline (and MLflow) at `home`: its SQLite store, or `tracking_uri` (a server)."""
    from pipeline import settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMACLIP_HOME", str(home))
        mp.delenv("CMACLIP_ARTIFACT_ROOT", raising=False)
        if tracking_uri:
            mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        else:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        settings.configure()
        yield home


def shared_training(tmp_path_factory: pytest.TempPathFactory, catalog: str) -> dict[str, Any]:
    """The session's trained tiny model: {"home", "dataset", "result"} (result = trainer.train's)."""
    if "training" not in _shared:
        from pipeline.ingest.dataset import ingest
        from pipeline.training import trainer

        root = tmp_path_factory.mktemp("mlflow-shared")
        dataset = str(root / "dataset")
        ingest(catalog, "color,pattern,style", dataset)
        # Sample system metrics every second: a tiny stage is over before MLflow's default 10 s.
        with mlflow_home(root / "home"), pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
            result = trainer.train("tiny", dataset, str(root / "training"), epochs=EPOCHS, print_fn=None)
        _shared["training"] = {"home": root / "home", "dataset": dataset, "result": result}
    return _shared["training"]


def log_untrained_model(checkpoint_like: str | Path, folder: Path, seed: int = 0) -> str:
    """Log a randomly initialised model with the same config and labels as `checkpoint_like` in a run of
    its own; returns the run id. The honest 'worse' model: identical, except it never trained."""
    import mlflow
    import torch

    from cmaclip.checkpoint import Checkpoint, read_checkpoint_meta, save_checkpoint
    from cmaclip.model import create_model
    from pipeline import settings
    from pipeline.tracking import pyfunc

    meta = read_checkpoint_meta(checkpoint_like)
    torch.manual_seed(seed)
    model = create_model(meta.config, load_pretrained=False)
    path = save_checkpoint(folder, model, Checkpoint(meta.config, meta.labels, {}, {"untrained": True}))
    with mlflow.start_run(experiment_id=settings.experiment_id("untrained"), run_name=f"untrained-{seed}") as run:
        pyfunc.log_model(path)
    return run.info.run_id


def fresh_process_predict(model_uri: str, frame_path: Path, out_path: Path, env: dict[str, str]) -> None:
    """`mlflow.pyfunc.load_model(model_uri).predict(frame)` in a new interpreter, outside the repo and
    without it on sys.path: the model must bring its own code (code_paths)."""
    code = ("import sys, mlflow, pandas as pd; "
            "model = mlflow.pyfunc.load_model(sys.argv[1]); "
            "model.predict(pd.read_pickle(sys.argv[2])).to_pickle(sys.argv[3]); "
            "import cmaclip; print(cmaclip.__file__)")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *ENV_KEYS)}
    done = subprocess.run([sys.executable, "-c", code, model_uri, str(frame_path), str(out_path)],
                          env={**clean, **env}, cwd=frame_path.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded_from = done.stdout.strip().splitlines()[-1]
    assert not loaded_from.startswith(str(REPO_ROOT)), f"fresh process imported the repo's code: {loaded_from}"


def sample_frame(dataset: str, rows: int = 6):
    """Raw rows of the test split plus one row whose image is not an image and one without a title."""
    import pandas as pd

    from pipeline.ingest.dataset import dataset_files
    from pipeline.io import storage

    part = dataset_files(dataset, "test")[0]["uri"]
    frame = storage.parquet_file(part).read(columns=["product_id", "title", "image"]).slice(0, rows).to_pandas()
    extra = pd.DataFrame([{"product_id": "broken-image", "title": "Acme Red Dress", "image": b"not an image"},
                          {"product_id": "no-title", "title": None, "image": frame.loc[0, "image"]}])
    return pd.concat([frame, extra], ignore_index=True)


# Fixtures shared by the MLflow test modules (imported there by name).
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tmp_catalog):
    return shared_training(tmp_path_factory, tmp_catalog)


@pytest.fixture
def home(trained):
    with mlflow_home(trained["home"]) as path:
        yield path
