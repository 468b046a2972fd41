"""The training stages over an ingested dataset, each an MLflow run; what the CLI and the DAG call. By
default the config's stages: the optional catalog pre-training `align` when the config gives it epochs, then
Algorithm 1's warmup, end_to_end and tuning.

Airflow runs it as separate tasks that pass small JSON dicts along:

    training = start_training(config, dataset_uri, out_uri)        # parent run, training.json
    results  = [run_stage(training, s) for s in training["stages"]] # one task per stage, retryable
    final    = finish_training(training, results)                  # pyfunc model, registry version

`train(...)` does the same in one process (the CLI). A stage starts from the previous stage's best
checkpoint (the first from the config's weights) and is resumable: a retry continues after its last
completed epoch (cmaclip.train keeps `last/` in the stage folder) inside the same MLflow stage run.

Checkpoints: `out_uri/stages/<stage>/{best,last}` when out_uri is local. For a remote out_uri (s3://...)
training runs in a local work folder under `<home>/work/` and every epoch publishes a snapshot to
`out_uri/stages/<stage>/snapshots/<n>/` and then the pointer `latest.json` (written last, one object), so a
retry on another worker downloads the newest complete snapshot and resumes from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from tabulate import tabulate

from cmaclip.checkpoint import load_checkpoint
from cmaclip.config import ALIGN, ALL_STAGES, STAGES, CMACLIPConfig, load_config
from cmaclip.evaluate import predict
from cmaclip.model import CMACLIP, create_model
from cmaclip.precision import resolve_device
from cmaclip.pretrained import is_uri
from cmaclip.train import SUMMARY_KEYS, Callback, PrintCallback, StageResult, train_stage

from .. import settings
from ..ingest.dataset import dataset_files, read_manifest, vocabularies
from ..io import storage
from ..tracking import stage_logging, tracker
from .data import dist_rank_world, set_epoch, split_batches

TRAINING_FILE = "training.json"


# --- config and data ---------------------------------------------------------------------------------

def as_config(config: CMACLIPConfig | Mapping[str, Any] | str) -> CMACLIPConfig:
    """A config object, its dict, or a name/path for `load_config`."""
    if isinstance(config, CMACLIPConfig):
        return config
    return CMACLIPConfig.from_dict(dict(config)) if isinstance(config, Mapping) else load_config(config)


def with_epochs(config: CMACLIPConfig, epochs: int | Mapping[str, int] | None,
                stages: Sequence[str] = STAGES) -> CMACLIPConfig:
    """Override epochs: one number for every stage in `stages`, or {stage: epochs}."""
    if epochs is None:
        return config
    wanted = dict(epochs) if isinstance(epochs, Mapping) else {s: int(epochs) for s in stages}
    d = config.to_dict()
    for stage, n in wanted.items():
        d["train"]["stages"][stage]["epochs"] = int(n)
    return CMACLIPConfig.from_dict(d)


def _epoch_batches(loader) -> Callable[[int], Any]:
    """cmaclip.train's loader factory: the same loader, reshuffled for each epoch."""
    def for_epoch(epoch: int):
        set_epoch(loader, epoch)
        return loader
    return for_epoch


def _titles(dataset_uri: str, split: str) -> dict[str, str | None]:
    parts = [storage.parquet_file(f["uri"]).read(columns=["product_id", "title"])
             for f in dataset_files(dataset_uri, split)]
    return {pid: title for t in parts for pid, title in zip(t.column("product_id").to_pylist(),
                                                            t.column("title").to_pylist())}


def example_rows(dataset_uri: str, rows: int = 2) -> pd.DataFrame | None:
    """A few raw test rows (product_id, title, image) for the pyfunc's input example."""
    for split in ("test", "validation", "train"):
        for f in dataset_files(dataset_uri, split):
            table = storage.parquet_file(f["uri"]).read(columns=["product_id", "title", "image"])
            if table.num_rows:
                return table.slice(0, rows).to_pandas()
    return None


# --- where a stage's checkpoints live ----------------------------------------------------------------

def _remote(training: Mapping[str, Any]) -> bool:
    return not storage.is_local(storage.filesystem(training["out_uri"])[0])


def stage_dir(training: Mapping[str, Any], stage: str) -> Path:
    """The local folder cmaclip.train writes the stage into."""
    if not _remote(training):
        return Path(training["out_uri"]) / "stages" / stage
    key = hashlib.sha256(training["out_uri"].encode()).hexdigest()[:12]
    return settings.home() / "work" / key / stage


def _remote_stage(training: Mapping[str, Any], stage: str) -> str:
    return storage.join(training["out_uri"], "stages", stage)


# Trailing slashes on both sides: fsspec copies the folder's contents into the target, whether or not the
# target exists yet (a retried upload lands in the same place).

def _put_dir(local: Path, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.put(f"{local}/", f"{path.rstrip('/')}/", recursive=True)


def _get_dir(uri: str, local: Path) -> None:
    fs, path = storage.filesystem(uri)
    tmp = local.with_name(local.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    fs.get(f"{path.rstrip('/')}/", f"{tmp}/", recursive=True)
    shutil.rmtree(local, ignore_errors=True)
    tmp.rename(local)


def _publish_snapshot(local: Path, remote: str, epochs: int, improved: bool) -> None:
    """Upload last/ (and best/ when it changed) as snapshot `epochs`, then move the pointer to it."""
    pointer_uri = storage.join(remote, "latest.json")
    old = storage.read_json(pointer_uri) if storage.exists(pointer_uri) else {}
    snapshot = f"snapshots/{epochs}"
    _put_dir(local / "last", storage.join(remote, snapshot, "last"))
    best = old.get("best")
    if improved or best is None:
        _put_dir(local / "best", storage.join(remote, snapshot, "best"))
        best = f"{snapshot}/best"
    storage.write_json(pointer_uri, {"epochs": epochs, "last": f"{snapshot}/last", "best": best})
    for stale in {old.get("last", "").rsplit("/", 1)[0], (old.get("best") or "").rsplit("/", 1)[0]}:
        if stale and stale not in (snapshot, best.rsplit("/", 1)[0]):
            storage.remove(storage.join(remote, stale), recursive=True)


def _fetch_snapshot(remote: str, local: Path) -> None:
    """Make the local stage folder the newest published snapshot, unless it is already as new."""
    pointer_uri = storage.join(remote, "latest.json")
    if not storage.exists(pointer_uri):
        return
    pointer = storage.read_json(pointer_uri)
    state = local / "last" / "state.json"
    done = storage.read_json(str(state))["state"]["epoch"] if state.exists() else -1
    if done >= pointer["epochs"]:
        return
    local.mkdir(parents=True, exist_ok=True)
    _get_dir(storage.join(remote, pointer["last"]), local / "last")
    _get_dir(storage.join(remote, pointer["best"]), local / "best")


class _SnapshotCallback(Callback):
    def __init__(self, local: Path, remote: str):
        self.local, self.remote = local, remote

    def on_epoch_end(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        _publish_snapshot(self.local, self.remote, epoch + 1, bool(metrics.get("improved")))


def best_checkpoint(training: Mapping[str, Any], stage: str) -> Path:
    """The stage's best checkpoint as a local folder (downloaded from a remote out_uri if needed)."""
    local = stage_dir(training, stage)
    if _remote(training):
        _fetch_snapshot(_remote_stage(training, stage), local)
    best = local / "best"
    if not (best / "cmaclip.json").exists():
        raise FileNotFoundError(f"stage {stage} of {training['out_uri']} has no best checkpoint; run it first")
    return best


def _checkpoint_uri(training: Mapping[str, Any], stage: str) -> str:
    if not _remote(training):
        return str(stage_dir(training, stage) / "best")
    pointer = storage.read_json(storage.join(_remote_stage(training, stage), "latest.json"))
    return storage.join(_remote_stage(training, stage), pointer["best"])


# --- the three calls ---------------------------------------------------------------------------------

def check_stages(stages: Sequence[str]) -> list[str]:
    """A training's stages: known, in order, and ending with a stage that trains the classifier."""
    stages = list(stages)
    known = all(s in ALL_STAGES for s in stages)
    ordered = known and all(ALL_STAGES.index(a) < ALL_STAGES.index(b) for a, b in zip(stages, stages[1:]))
    if not (stages and ordered) or stages[-1] == ALIGN:
        raise ValueError(f"stages must be a non-empty subsequence of {ALL_STAGES} that does not end with "
                         f"{ALIGN} (it trains no classifier); got {stages}")
    return stages


def start_training(config: CMACLIPConfig | Mapping[str, Any] | str, dataset_uri: str, out_uri: str, *,
                   stages: Sequence[str] | None = None, epochs: int | Mapping[str, int] | None = None,
                   model_name: str = "cmaclip", run_name: str | None = None,
                   experiment: str = tracker.TRAINING_EXPERIMENT, device: str = "auto",
                   cache: str | None = "memory", workers: int = 0,
                   tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Create the parent MLflow run and `out_uri/training.json`; returns that small dict (the handle every
    later call takes). `stages`: by default the config's after the `epochs` overrides (align runs when it
    has epochs). Calling it again for the same out_uri, config and dataset returns the same training while
    it is unfinished (a retried Airflow task), so there is never a second parent run."""
    config = as_config(config)
    config = with_epochs(config, epochs, stages or config.train.stage_order())
    stages = check_stages(config.train.stage_order() if stages is None else stages)
    vocab = vocabularies(dataset_uri)
    config = config.with_tasks({t: len(v) for t, v in vocab.items()})
    manifest = read_manifest(dataset_uri).to_dict()  # checked on read; tracking logs it as JSON
    handle_uri = storage.join(out_uri, TRAINING_FILE)
    wanted = {"config": config.to_dict(), "dataset_uri": dataset_uri, "stages": list(stages)}
    if storage.exists(handle_uri):
        return _existing(storage.read_json(handle_uri), wanted, out_uri)
    settings.configure()
    run_id = tracker.start_training_run(config, dataset_uri, manifest, experiment=experiment,
                                        run_name=run_name, tags=tags)
    training = {**wanted, "run_id": run_id, "out_uri": out_uri, "model_name": model_name,
                "tracking_uri": settings.tracking_uri(), "dataset_fingerprint": tracker.dataset_fingerprint(manifest),
                "device": device, "cache": cache, "workers": workers}
    storage.write_json(handle_uri, training)
    return training


def _existing(training: dict[str, Any], wanted: Mapping[str, Any], out_uri: str) -> dict[str, Any]:
    stored = {**training, "config": as_config(training["config"]).to_dict()}  # config fields added since: defaults
    same = all(stored.get(k) == v for k, v in wanted.items())
    status = tracker.client().get_run(training["run_id"]).info.status if same else None
    if not same or status == "FINISHED":
        why = "holds a finished training" if same else "holds a training with another config, dataset or stages"
        raise ValueError(f"{out_uri} {why} (run {training['run_id']}); choose another out_uri")
    return training


def _check_tracking(training: Mapping[str, Any]) -> None:
    if training["tracking_uri"] != settings.tracking_uri():
        raise RuntimeError(f"training {training['run_id']} logs to {training['tracking_uri']}, this process to "
                           f"{settings.tracking_uri()}: give every task the same MLFLOW_TRACKING_URI / CMACLIP_HOME")
    settings.configure()


def run_stage(training: Mapping[str, Any], stage: str, epochs: int | None = None,
              callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one stage (resuming it if a previous attempt got partway) in its nested MLflow run, then log
    its artifacts; returns {"stage", "run_id", "checkpoint", "metrics", "epochs_run", "best_epoch"}."""
    import mlflow

    _check_tracking(training)
    stages = training["stages"]
    if stage not in stages:
        raise ValueError(f"stage {stage!r} is not part of this training's stages {stages}")
    config = as_config(training["config"])
    config = with_epochs(config, {stage: epochs}) if epochs is not None else config
    device, folder = resolve_device(training["device"]), stage_dir(training, stage)
    rank, world = dist_rank_world()
    hooks = list(callbacks)
    if _remote(training):
        if rank == 0:
            _fetch_snapshot(_remote_stage(training, stage), folder)
        hooks.append(_SnapshotCallback(folder, _remote_stage(training, stage)))
    if world > 1:
        # Under torchrun (pipeline.training.launch): rank 0 alone downloads, owns the MLflow run and logs artifacts;
        # every rank trains in lockstep (cmaclip.train calls callbacks on rank 0 only).
        if rank == 0 and stages.index(stage):
            best_checkpoint(training, stages[stages.index(stage) - 1])  # once, not once per rank
        torch.distributed.barrier()
        if rank > 0:
            result = _train(training, stage, config, folder, device, hooks)
            return {"stage": stage, "rank": rank, "epochs_run": result.epochs_run}
    run_id = tracker.stage_run(training["run_id"], stage)
    logger = stage_logging.MLflowCallback(run_id, parent_run_id=training["run_id"],
                                          first_epoch=first_epoch(training, stage))
    with mlflow.start_run(run_id=run_id, log_system_metrics=tracker.system_metrics_available()):
        result = _train(training, stage, config, folder, device, [logger, *hooks])
        _log_stage(training, run_id, result, config, device)
    return {"stage": stage, "run_id": run_id, "checkpoint": _checkpoint_uri(training, stage),
            "metrics": _finite(result.best_metrics), "epochs_run": result.epochs_run, "best_epoch": result.best_epoch}


def first_epoch(training: Mapping[str, Any], stage: str) -> int:
    """Where `stage` starts on the training's epoch count across stages: the configured epochs of the
    stages before it (fixed, so a retried stage logs at the same steps)."""
    stages, config = training["stages"], as_config(training["config"])
    return sum(config.train.stages[s].epochs for s in stages[:stages.index(stage)])


def _train(training: Mapping[str, Any], stage: str, config: CMACLIPConfig, folder: Path, device: str,
           callbacks: Sequence[Callback]) -> StageResult:
    stages = training["stages"]
    previous = stages[stages.index(stage) - 1] if stages.index(stage) else None
    model = (load_checkpoint(best_checkpoint(training, previous), device=device)[0] if previous
             else _initial_model(config))
    labels = vocabularies(training["dataset_uri"])
    workers, micro = training.get("workers", 0), config.train.micro_batch_size
    train_loader = split_batches(training["dataset_uri"], "train", config, micro, shuffle=True, workers=workers,
                                 stage=stage)
    val_loader = split_batches(training["dataset_uri"], "validation", config, 2 * micro, workers=workers)
    return train_stage(model, stage, config, _epoch_batches(train_loader), val_loader, folder,
                       callbacks=callbacks, cache=training.get("cache"), device=device, labels=labels)


def _initial_model(config: CMACLIPConfig) -> CMACLIP:
    """The first stage's starting weights come from the config's seed, as the rest of the run does: the
    same config and data train the same model, whatever ran before in this process."""
    config = with_local_weights(config)
    torch.manual_seed(config.train.seed)
    return create_model(config)


def with_local_weights(config: CMACLIPConfig) -> CMACLIPConfig:
    """`clip.pretrained` given as a URI -> the same config naming the local copy in the cache, fetched
    once per version of the object. The training's own config keeps the URI (what was asked for)."""
    ref = config.clip.pretrained
    if not ref or not is_uri(ref):
        return config
    local = storage.fetch_to_cache(ref, settings.home() / "cache" / "pretrained")
    return dataclasses.replace(config, clip=dataclasses.replace(config.clip, pretrained=local))


def _log_stage(training: Mapping[str, Any], run_id: str, result: StageResult, config: CMACLIPConfig,
               device: str) -> None:
    """Artifacts of the stage, from its best checkpoint's predictions on the validation split."""
    if result.stage == ALIGN:  # no classifier trained yet: its predictions would say nothing
        stage_logging.log_stage_artifacts(run_id, result, None, {}, {}, config.train.target_precision)
        return
    model, ckpt = load_checkpoint(result.best_checkpoint, device=device)
    loader = split_batches(training["dataset_uri"], "validation", ckpt.config, 2 * config.train.micro_batch_size,
                           rank=0, world_size=1)  # the whole split, also on rank 0 of a DDP run
    predictions = predict(model, loader, device=device, precision="fp32")
    stage_logging.log_stage_artifacts(run_id, result, predictions, _titles(training["dataset_uri"], "validation"),
                                ckpt.labels, config.train.target_precision)


def _finite(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """JSON-safe metrics for XCom: an abstaining threshold (inf) becomes None."""
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}


def finish_training(training: Mapping[str, Any], stage_results: Sequence[Mapping[str, Any]] | Mapping[str, Any],
                    *, register: bool = True) -> dict[str, Any]:
    """Log the last stage's best checkpoint as the training's pyfunc model (once, also on a retry), the
    per-stage summary, end the parent run, and register the model (alias challenger, or champion if it is
    the first version). Returns {"run_id", "model_uri" (models:/<logged model id>), "checkpoint", "stages"
    (best validation metrics per stage), "registered" ({"name", "version", "alias", "run_id"} or None)}."""
    import mlflow

    from ..tracking import pyfunc, registry

    _check_tracking(training)
    results = _by_stage(stage_results)
    last = training["stages"][-1]
    if last not in results:
        raise ValueError(f"no result for the last stage {last!r}; have {sorted(results)}")
    run_id, checkpoint = training["run_id"], best_checkpoint(training, last)
    c = tracker.client()
    with mlflow.start_run(run_id=run_id):
        if pyfunc.logged_model_uri(run_id) is None:
            pyfunc.log_model(checkpoint, model_name=training["model_name"],
                             example=example_rows(training["dataset_uri"]))
        tracker.log_metrics(c, run_id, {f"final/val/{k}": v for k, v in results[last]["metrics"].items()
                                        if v is not None}, step=0)
        mlflow.log_text(stage_table(results), "stages.txt")
        mlflow.log_dict({s: dict(r) for s, r in results.items()}, "stages.json")
        tracker.log_learning_curve(c, run_id, [(s, first_epoch(training, s), results[s]["epochs_run"])
                                               for s in training["stages"] if s in results])
    registered = registry.register(run_id, training["model_name"]) if register else None
    return {"run_id": run_id, "model_uri": pyfunc.logged_model_uri(run_id), "checkpoint": str(checkpoint),
            "stages": {s: results[s]["metrics"] for s in training["stages"] if s in results},
            "registered": registered}


def _by_stage(stage_results) -> dict[str, Mapping[str, Any]]:
    if isinstance(stage_results, Mapping):
        return dict(stage_results)
    return {r["stage"]: r for r in stage_results}


def fail_training(training: Mapping[str, Any]) -> None:
    """Mark the parent run FAILED (an Airflow on_failure_callback); a later retry reopens it."""
    settings.configure()
    tracker.end_run(training["run_id"], "FAILED")


# --- everything in one process (the CLI) -------------------------------------------------------------

def train(config: CMACLIPConfig | Mapping[str, Any] | str, dataset_uri: str, out_uri: str, *,
          stages: Sequence[str] | None = None, epochs: int | Mapping[str, int] | None = None,
          model_name: str = "cmaclip", register: bool = True, print_fn: Callable[[str], None] | None = print,
          **options: Any) -> dict[str, Any]:
    """start_training, run_stage for each stage, finish_training; prints epoch lines and a stage table
    through `print_fn` (None: silent). `options` go to start_training (device, cache, workers, ...)."""
    training = start_training(config, dataset_uri, out_uri, stages=stages, epochs=epochs,
                              model_name=model_name, **options)
    hooks = [PrintCallback(print_fn)] if print_fn else []
    try:
        results = [run_stage(training, stage, callbacks=hooks) for stage in training["stages"]]
    except BaseException:
        fail_training(training)
        raise
    final = finish_training(training, results, register=register)
    if print_fn:
        print_fn(stage_table(_by_stage(results)))
    return {**final, "training": training}


def stage_table(results: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = SUMMARY_KEYS) -> str:
    """Per stage: epochs run, best epoch and its validation metrics (the columns some stage has)."""
    keys = [k for k in keys if any(r["metrics"].get(k) is not None for r in results.values())]
    header = ["stage", "epochs", "best_epoch", *keys, "run_id"]
    rows = [[s, r["epochs_run"], r["best_epoch"], *(r["metrics"].get(k) for k in keys), r["run_id"]]
            for s, r in results.items()]
    # The run id is a name: an all-digit one must not be read as a number.
    return tabulate(rows, header, floatfmt=".4f", missingval="-", disable_numparse=[len(header) - 1])
