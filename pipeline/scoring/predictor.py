"""A cmaclip checkpoint ready to predict: weights in the fastest safe precision, label vocabularies and
calibrated thresholds, and the conversion of logits into the predictions contract.

Two ways in. Scoring uses the tensor path (`Preprocessor` builds pixels and trimmed token ids, possibly in
DataLoader workers; `Predictor.predict` runs the forward pass). `predict_frame` takes a pandas frame of raw
rows and returns predictions plus the rows it had to quarantine; the MLflow pyfunc checks rows the same way
(`check_row`) and answers one row per input row.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from cmaclip.checkpoint import WEIGHTS, Checkpoint, load_checkpoint, read_checkpoint_meta
from cmaclip.config import CMACLIPConfig
from cmaclip.explain import MODALITIES, contributions, withheld_inputs
from cmaclip.int8 import quantize_model
from cmaclip.model import CMACLIP
from cmaclip.precision import DTYPES, resolve_device, resolve_precision
from cmaclip.transforms import image_batch_transform, image_size, tokenizer, trim_tokens

from .. import reasons
from ..contracts import CONFIDENCE, CONTRIBUTIONS, IMAGE_WEIGHT, KEY, LABEL, QUARANTINE_COLUMNS, TOP, task_columns
from ..io.images import decode_image
from ..io.text import NotText, normalize_product_id, normalize_title

# A task without a stored threshold (an uncalibrated checkpoint) never abstains.
DEFAULT_THRESHOLD = 0.0


def checkpoint_version(path: str | os.PathLike) -> str:
    """The version of a model that has no registry version: a hash of what it computes, not of its files.

    Covered: every tensor (name, dtype, shape, bytes; in name order) and the config, labels and thresholds
    as canonical JSON. Not covered: the file bytes, because safetensors writes its header metadata in an
    order that varies between saves of identical weights, and `extra` (epoch, metrics), which describes
    the training, not the model. Identical weights therefore keep one version, and with it one run id
    and one output path."""
    digest = hashlib.sha256()
    ckpt = read_checkpoint_meta(path)
    meaning = {"config": ckpt.config.to_dict(), "labels": ckpt.labels, "thresholds": ckpt.thresholds}
    digest.update(json.dumps(meaning, sort_keys=True, separators=(",", ":"), default=float).encode())
    with safe_open(Path(path) / WEIGHTS, framework="pt") as f:  # one tensor in memory at a time
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name)
            digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


def _cast(model: CMACLIP, precision: str, device: torch.device) -> CMACLIP:
    """The CLIP towers and the sequence attention (~all the FLOPs) in `precision` (int8: their matmuls, the
    rest fp32); the per-task modality attention and heads stay fp32: they cost nothing, they make the
    decision, and in fp32 they keep top-1 a little closer to the fp32 model's where the top two classes are
    close."""
    dtype = DTYPES[precision]
    model = model.to(dtype)
    model.modality_attention.float()
    model.heads.float()
    if precision == "int8":
        quantize_model(model)
    if model.sequence_attention is not None:
        # Measured on CPU: sequence-first is 1.3x faster in bf16 and slower in fp32 (SequenceAttention).
        model.sequence_attention.set_sequence_first(dtype == torch.bfloat16 and device.type == "cpu")
    return model


class Preprocessor:
    """(PIL image, title) -> model inputs. Holds no weights, pickles as its config and dtype, and builds the
    tokenizer lazily, so DataLoader workers get a copy cheaply.

    Pixels come out in `dtype`, the model's weight dtype: a bf16 model gets bf16 pixels from the workers,
    half the bytes to pass between processes and no cast left for the process that runs the forward."""

    def __init__(self, config: CMACLIPConfig, dtype: torch.dtype = torch.float32):
        self.config, self.dtype = config, dtype

    def __getstate__(self) -> dict:
        return {"config": self.config.to_dict(), "dtype": str(self.dtype).removeprefix("torch.")}

    def __setstate__(self, state: dict) -> None:
        self.config = CMACLIPConfig.from_dict(state["config"])
        self.dtype = getattr(torch, state.get("dtype", "float32"))

    @functools.cached_property
    def _image(self):
        return image_batch_transform(self.config)

    @functools.cached_property
    def _tokenize(self):
        return tokenizer(self.config)

    def build(self) -> "Preprocessor":
        """Build the transform and tokenizer now (loading the BPE vocabulary takes a moment), so forked
        DataLoader workers inherit them instead of each building its own."""
        _ = self._image, self._tokenize
        return self

    @property
    def draft(self) -> tuple[int, int]:
        """The model's input size, for `decode_image(draft=...)`: images decode straight to what the model
        sees of them, so a batch holds batch-size small images whatever the sizes of the originals. The
        training loader decodes with the same one."""
        size = image_size(self.config)
        return (size, size)

    def images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL RGB images -> [B, 3, H, W] in `dtype`."""
        return self._image(images).to(self.dtype)

    def texts(self, titles: Sequence[str | None]) -> torch.Tensor:
        """Titles -> [B, L] token ids, L cut to the batch's longest title (exact under the causal mask)."""
        return trim_tokens(self._tokenize(list(titles)))


@dataclass(frozen=True)
class Lineage:
    """Which model made a prediction; goes into every row and the Parquet metadata."""
    name: str
    version: str
    source: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"model_name": self.name, "model_version": self.version, "model_source": self.source}


class Predictor:
    """A CMACLIP model in inference form, with its labels and calibrated thresholds. The model becomes the
    predictor's: cast, and with int8 its linear layers replaced, in place."""

    def __init__(self, model: CMACLIP, checkpoint: Checkpoint, lineage: Lineage, *,
                 device: str | torch.device = "cpu", precision: str = "auto", compile: bool = False):
        self.device = torch.device(resolve_device(str(device)))
        self.precision = resolve_precision(precision, self.device, inference=True)
        self.dtype = DTYPES[self.precision]
        self.checkpoint = checkpoint
        self.lineage = lineage
        self.tasks = list(checkpoint.config.tasks)
        self.labels = {t: list(checkpoint.labels[t]) for t in self.tasks}
        self.thresholds = {t: float(checkpoint.thresholds.get(t, DEFAULT_THRESHOLD)) for t in self.tasks}
        self.preprocessor = Preprocessor(checkpoint.config, self.dtype)
        self._check_vocabularies()
        self.model = _cast(model.eval().to(self.device), self.precision, self.device)
        self._run = torch.compile(self._logits, dynamic=True) if compile else self._logits

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, name: str | None = None, version: str | None = None,
                        **kwargs) -> "Predictor":
        """Load a checkpoint folder. Without a registry, name defaults to the config name and the version
        to `checkpoint_version`, so identical weights always get the same output paths."""
        model, ckpt = load_checkpoint(path)
        lineage = Lineage(name or ckpt.config.name, version or checkpoint_version(path), str(path))
        return cls(model, ckpt, lineage, **kwargs)

    def predictor(self) -> "Predictor":
        """A Predictor is its own model reference (see `pipeline.scoring.runner.load_predictor`)."""
        return self

    def _check_vocabularies(self) -> None:
        for task, classes in self.checkpoint.config.tasks.items():
            if len(self.labels[task]) != classes:
                raise ValueError(f"task {task!r}: the model has {classes} classes, "
                                 f"the checkpoint's vocabulary {len(self.labels[task])}")

    def columns(self, explain: bool = False) -> list[tuple[str, str]]:
        """(name, type) of the per-task prediction columns, in contract order (`task_columns`)."""
        return task_columns(self.tasks, explain)

    @property
    def output_columns(self) -> list[str]:
        """The per-task prediction columns, in contract order."""
        return [name for name, _ in self.columns()]

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, explain: bool = False) -> dict[str, np.ndarray]:
        """Model inputs -> per task top-1 class id, its confidence and lambda, and with `explain` each
        modality's contribution (two more forward passes; float32 numpy)."""
        non_blocking = self.device.type == "cuda"
        pixels = pixels.to(self.device, self.dtype, non_blocking=non_blocking)
        tokens = tokens.to(self.device, non_blocking=non_blocking)
        out = self._run(pixels, tokens)
        result = {}
        for task in self.tasks:
            conf, top = torch.softmax(out.logits[task], dim=-1).max(dim=-1)  # fp32: the heads are fp32
            result[f"{task}_top_id"] = top.cpu().numpy()
            result[CONFIDENCE.named(task)] = conf.cpu().numpy().astype(np.float32)
            result[IMAGE_WEIGHT.named(task)] = out.image_weight[task].float().cpu().numpy()
        if explain:
            inputs = withheld_inputs(self.model, pixels, tokens)
            withheld = {modality: self._run(*x).logits for modality, x in inputs.items()}
            for task, parts in contributions(out.logits, withheld).items():
                for modality in MODALITIES:
                    result[CONTRIBUTIONS[modality].named(task)] = parts[modality].cpu().numpy()
        return result

    def _logits(self, pixels: torch.Tensor, tokens: torch.Tensor):
        image, text = self.model.fuse(self.model.encode_tokens(pixels, tokens))
        as_fp32 = lambda x: None if x is None else x.float()
        return self.model.classify(as_fp32(image), as_fp32(text))

    def decode(self, raw: dict[str, np.ndarray], explain: bool = False) -> dict[str, Any]:
        """`forward`'s output -> the contract's columns (`columns(explain)`): the labels of the class ids,
        `<task>` None below the task's threshold; the float columns as computed."""
        labels: dict[str, np.ndarray] = {}
        for task in self.tasks:
            top = np.asarray(self.labels[task], dtype=object)[raw[f"{task}_top_id"]]
            keep = raw[CONFIDENCE.named(task)] >= self.thresholds[task]
            labels[LABEL.named(task)], labels[TOP.named(task)] = np.where(keep, top, None), top
        return {name: labels[name] if kind == "string" else raw[name] for name, kind in self.columns(explain)}

    def predict(self, pixels: torch.Tensor, tokens: torch.Tensor, explain: bool = False) -> dict[str, Any]:
        """The fast path: prepared tensors -> contract columns (in `columns(explain)` order)."""
        if pixels.shape[0] == 0:
            return self.decode(self._empty_raw(explain), explain)
        return self.decode(self.forward(pixels, tokens, explain), explain)

    def _empty_raw(self, explain: bool = False) -> dict[str, np.ndarray]:
        raw = {f"{task}_top_id": np.zeros(0, dtype=np.int64) for task in self.tasks}
        raw.update({name: np.zeros(0, dtype=np.float32) for name, kind in self.columns(explain) if kind != "string"})
        return raw

    def predict_batch(self, product_ids: Sequence[str], titles: Sequence[str | None],
                      images: Sequence[Any]) -> pd.DataFrame:
        """Decoded PIL images and titles -> one contract row per product."""
        pixels = self.preprocessor.images(images)
        tokens = self.preprocessor.texts(titles)
        frame = pd.DataFrame(self.predict(pixels, tokens))
        frame.insert(0, KEY.name, list(product_ids))
        return frame

    def predict_frame(self, df: pd.DataFrame, batch_size: int = 64) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Raw rows (`product_id`, `title`, `image` bytes) -> (predictions, quarantine).

        Rows that cannot be scored (image missing, undecodable or out of limits; no product_id; a title
        that is not text) go to the quarantine frame (stage 'score', a `pipeline.reasons` code) instead of
        failing the call: len(df) == len(predictions) + len(quarantine). Predictions are keyed by product_id,
        so a product_id on several rows is quarantined on all of them, as batch scoring does it
        (pipeline/scoring/duplicate_ids.py)."""
        missing = {"product_id", "image"} - set(df.columns)
        if missing:
            raise ValueError(f"predict_frame needs columns product_id, image (and title); missing {sorted(missing)}")
        titles = df["title"] if "title" in df.columns else [None] * len(df)
        records, quarantined = _without_duplicates(zip(df["product_id"], titles, df["image"]))
        parts = []
        for chunk in _chunks(records, batch_size):
            good, bad = decode_rows(chunk, draft=self.preprocessor.draft)
            quarantined.extend(bad)
            if good.product_ids:
                parts.append(self.predict_batch(good.product_ids, good.titles, good.images))
        predictions = pd.concat(parts, ignore_index=True) if parts else self._empty_frame()
        return predictions, pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS)

    def _empty_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.decode(self._empty_raw()))
        frame.insert(0, KEY.name, pd.Series([], dtype=object))
        return frame


@dataclass
class DecodedRows:
    """The rows of a batch that can be scored, in input order."""
    product_ids: list[str]
    titles: list[str]
    images: list[Any]  # PIL RGB


def _without_duplicates(records: Iterable[tuple]) -> tuple[list[tuple], list[tuple]]:
    """Rows whose product_id no other row has, and the quarantine rows of the others."""
    records = list(records)
    ids = [check_product_id(r[0])[0] for r in records]
    counts = Counter(pid for pid in ids if pid is not None)
    shared = [i for i, pid in enumerate(ids) if counts[pid] > 1]
    detail = "{} rows have this product_id; none is scored, so none shows another row's prediction"
    quarantine = [(ids[i], "score", reasons.DUPLICATE_ID, detail.format(counts[ids[i]])) for i in shared]
    return [r for i, r in enumerate(records) if counts[ids[i]] <= 1], quarantine


def _missing(value: Any) -> bool:
    # pandas turns a null cell into NaN (or pd.NA) on the way through a frame.
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def check_product_id(value: Any) -> tuple[str | None, tuple | None]:
    """(the product_id normalised as ingest does it, None), or (None, quarantine row) when there is none."""
    try:
        product_id = None if _missing(value) else normalize_product_id(value)
    except NotText as exc:
        return None, (None, "score", reasons.PRODUCT_ID_MISSING, str(exc))
    if product_id is None:
        return None, (None, "score", reasons.PRODUCT_ID_MISSING, "null or blank product_id")
    return product_id, None


def check_row(product_id: Any, title: Any, image: bytes | None, draft: tuple[int, int] | None = None):
    """One raw row -> ((product_id, title, PIL RGB image), None) or (None, quarantine row) where a quarantine
    row is (product_id, stage, reason, detail).

    The product_id is normalised and the title cut and cleaned exactly as ingest does it (`pipeline.io.text`), so
    a prediction's key is the dataset's key and the model reads the title it was trained on. An empty or null
    title is fine (the model learned to ignore it); a missing id or a bad image is not.
    """
    product_id, refused = check_product_id(product_id)
    if refused is not None:
        return None, refused
    try:
        title = normalize_title(None if _missing(title) else title) or ""
    except NotText as exc:
        return None, (product_id, "score", reasons.TITLE_NOT_TEXT, str(exc))
    decoded = decode_image(None if _missing(image) else image, draft=draft)
    if not decoded.ok:
        return None, (product_id, "score", decoded.reason, decoded.detail)
    return (product_id, title, decoded.image), None


def decode_rows(rows: Iterable[tuple[Any, Any, bytes | None]],
                draft: tuple[int, int] | None = None) -> tuple[DecodedRows, list[tuple]]:
    """Raw (product_id, title, image bytes) rows -> the scorable rows and the quarantine rows."""
    good, bad = DecodedRows([], [], []), []
    for product_id, title, image in rows:
        row, refused = check_row(product_id, title, image, draft)
        if refused is not None:
            bad.append(refused)
            continue
        good.product_ids.append(row[0])
        good.titles.append(row[1])
        good.images.append(row[2])
    return good, bad


def _chunks(items: Iterable, size: int) -> Iterable[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
