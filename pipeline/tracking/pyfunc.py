"""The MLflow pyfunc model: a cmaclip checkpoint folder as a model artifact, rebuilt by code on load.

Nothing is pickled. The model is logged "from code": MLflow stores `pyfunc_model.py`, which builds a
`CMACLIPPyfunc` on load; `load_context` then rebuilds the network from the checkpoint's JSON config and
loads its safetensors weights through `pipeline.scoring.predictor.Predictor`. The `cmaclip` and `pipeline`
packages ride along as `code_paths`, so the model loads in any environment that has the pinned
third-party packages, with the code it was trained with.

Input: `product_id`, `title` (nullable), `image` (encoded bytes). Output: one row per input row, in input
order: the predictions contract (`pipeline.contracts.prediction_columns`) plus `quarantine_reason`, set
(and the prediction columns null) where a row could not be scored, e.g. an undecodable image.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import cmaclip
import pipeline
from cmaclip.checkpoint import read_checkpoint_meta

from ..contracts import CONTENT_HASH, KEY, LINEAGE, lineage_values, prediction_columns
from ..io.content_hash import content_hash
from ..scoring.predictor import Predictor, check_row

ARTIFACT = "checkpoint"           # key of the checkpoint folder in the model's artifacts
MODEL_NAME = "model"              # name of the logged model inside its run
INPUT_COLUMNS = ("product_id", "title", "image")
# The two packages as installed (source checkout or wheel), with their package data (configs, SQL).
CODE_PATHS = [str(Path(package.__file__).resolve().parent) for package in (cmaclip, pipeline)]
ENTRY_POINT = Path(__file__).with_name("pyfunc_model.py")  # models from code: builds CMACLIPPyfunc
# What the model needs at load time; pinned to what it was trained and tested with.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pandas", "pillow")
# The contract's column types (pipeline.contracts.ARROW_TYPES) in MLflow's names.
MLFLOW_TYPES = {"string": "string", "float32": "float", "timestamp[us, UTC]": "datetime"}
QUARANTINE_REASON = "quarantine_reason"  # the pyfunc's own column: why a row has no prediction


def pip_requirements() -> list[str]:
    """Explicit pins: MLflow's own inference of requirements loads the model in a subprocess (slow)."""
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in REQUIREMENTS]


class CMACLIPPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a cmaclip checkpoint. `model_config` (set at log time, overridable in `load_model`) carries
    lineage (`model_name`, `model_version`, `run_id`), `precision` and `batch_size`."""

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.batch_size = int(config.get("batch_size", 64))
        self.predictor = Predictor.from_checkpoint(
            context.artifacts[ARTIFACT], name=config.get("model_name"), version=config.get("model_version"),
            precision=config.get("precision", "auto"))
        self.run_id = config.get("run_id") or ""

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_rows(self.predictor, model_input, self.run_id, self.batch_size)


def predict_rows(predictor: Predictor, frame: pd.DataFrame, run_id: str = "", batch_size: int = 64) -> pd.DataFrame:
    """Raw rows -> one output row per input row (see the module docstring), in input order. Rows are
    checked and decoded exactly as `Predictor.predict_frame` does it (same cleaning, same decode to the model's size),
    one batch at a time, so memory follows the batch size, not the frame."""
    frame = frame.reset_index(drop=True)
    titles = frame["title"] if "title" in frame else [None] * len(frame)
    records = list(zip(frame["product_id"], titles, frame["image"]))
    draft = predictor.preprocessor.draft
    parts, ids, reasons = [], [], []
    for start in range(0, len(records), batch_size):
        checked = [check_row(*record, draft=draft) for record in records[start:start + batch_size]]
        ids += [row[0] if row is not None else refused[0] for row, refused in checked]
        reasons += [None if refused is None else refused[2] for _, refused in checked]
        good = [(start + i, row) for i, (row, _) in enumerate(checked) if row is not None]
        if good:
            positions, (pids, texts, images) = [p for p, _ in good], zip(*(row for _, row in good))
            parts.append(predictor.predict_batch(list(pids), list(texts), list(images)).set_axis(positions))
    columns = [KEY.name, *predictor.output_columns]
    out = (pd.concat(parts) if parts else pd.DataFrame(columns=columns)).reindex(range(len(records)))
    out[KEY.name] = ids
    # What batch scoring would record for the row (a title that is not text or bytes is a missing one).
    hashes = [None if reason else content_hash(title if isinstance(title, (str, bytes)) else None, image)
              for (_, title, image), reason in zip(records, reasons)]
    out.insert(1, CONTENT_HASH.name, hashes)
    lineage = predictor.lineage
    out = out.assign(**lineage_values(lineage.name, lineage.version, run_id, pd.Timestamp.now(tz="UTC")))
    out[QUARANTINE_REASON] = reasons
    return out


def signature(tasks: list[str]) -> ModelSignature:
    inputs = Schema([ColSpec("string", "product_id"), ColSpec("string", "title", required=False),
                     ColSpec("binary", "image")])
    # A refused row has no prediction and maybe no product_id: only the lineage is on every row.
    outputs = [ColSpec(MLFLOW_TYPES[c.type], c.name, required=c in LINEAGE) for c in prediction_columns(tasks)]
    outputs.append(ColSpec("string", QUARANTINE_REASON, required=False))
    return ModelSignature(inputs, Schema(outputs))


def input_example(rows: int = 2) -> pd.DataFrame:
    """Synthetic products, used when the caller has no rows of its own to show."""
    from ..synthetic import make_row

    return pd.DataFrame([{k: make_row(0, i)[k] for k in INPUT_COLUMNS} for i in range(rows)])


def log_model(checkpoint_dir: str | Path, *, model_name: str = "cmaclip", example: pd.DataFrame | None = None,
              name: str = MODEL_NAME) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint as a pyfunc model under the active run; returns MLflow's ModelInfo."""
    tasks = list(read_checkpoint_meta(checkpoint_dir).config.tasks)
    run = mlflow.active_run()
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(ENTRY_POINT), artifacts={ARTIFACT: str(checkpoint_dir)},
        code_paths=CODE_PATHS, pip_requirements=pip_requirements(), signature=signature(tasks),
        input_example=input_example() if example is None else example[list(INPUT_COLUMNS)],
        model_config={"model_name": model_name, "run_id": run.info.run_id if run else ""},
    )


def logged_model_uri(run_id: str, name: str = MODEL_NAME) -> str | None:
    """`models:/<model_id>` of the model logged as `name` by run `run_id`, or None. MLflow 3 keeps logged
    models apart from run artifacts; `runs:/<run_id>/<name>` still resolves, with a warning."""
    from .tracker import search_filter

    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([experiment], filter_string=search_filter({"source_run_id": run_id}))
    named = sorted((m for m in found if m.name == name and m.source_run_id == run_id),
                   key=lambda m: m.creation_timestamp)
    return f"models:/{named[-1].model_id}" if named else None
