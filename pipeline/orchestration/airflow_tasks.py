"""What each Airflow task does: one function per task of the two DAGs, JSON in and JSON out.

The DAG files in dags/ own the orchestration (schedules, params, retries, pools, mapping, assets) and
call exactly one function here per task; these functions compose the public calls of ingest, training,
registry and scoring, and reduce their results to what XCom should carry: URIs and small JSON. Keeping
the composition here, not in the DAG files, means the DAG processor never imports torch or mlflow (every
heavy import is inside a function), and the tests can drive the same steps without Airflow.

Where a run writes is a function of (DAG, run id) (`run_uri`), so a retried task finds what its failed
attempt left: a training stage resumes after its last completed epoch, scoring skips committed shards.

Whoever triggers a DAG chooses its params, so every param that names storage (catalog, work folder,
predictions folder, a config file, a checkpoint folder) is checked by `check_storage_uri`
against `CMACLIP_STORAGE_PREFIXES` before anything is read or written. Each DAG's first task checks all
its params at once (`validate_retrain`, `validate_scoring`), and an error retrying cannot fix fails a task
at once, in any task (`fail_fast`).
"""
from __future__ import annotations

import difflib
import functools
import logging
import math
import os
import re
import sys
from datetime import timedelta
from typing import Any, Callable, Collection, Mapping, Sequence, TypeVar

# torch-free (cmaclip/__init__ loads torch lazily); the DAG files read the stage names from here
from cmaclip.config import ALIGN, CONFIG_DIR, STAGES, load_config

from .. import settings

log = logging.getLogger(__name__)

# --- what the DAGs default to (environment overrides, read when the DAG file is parsed) ---------------

MODEL_NAME = os.environ.get("CMACLIP_MODEL_NAME", "cmaclip")
TASKS = ("color", "pattern", "style")
SCORING_SCHEDULE = os.environ.get("CMACLIP_SCORING_SCHEDULE", "0 2 * * *")
# A mapped task per group of shards: far below Airflow's max_map_length (1024), and few enough that the
# per-task start-up (interpreter, model load) stays small next to the scoring itself.
MAX_SCORING_TASKS = int(os.environ.get("CMACLIP_MAX_SCORING_TASKS", "64"))
SCORING_PARALLELISM = int(os.environ.get("CMACLIP_SCORING_PARALLELISM", "2"))
# The retrain DAG's ingest stages the catalog in at most this many groups of row groups, one mapped task each.
INGEST_GROUPS = int(os.environ.get("CMACLIP_INGEST_GROUPS", "4"))
# Celery/Kubernetes queue of the training tasks: "gpu" where a GPU worker listens on it (docker-compose's
# `gpu` profile); the default queue otherwise. LocalExecutor ignores queues.
TRAINING_QUEUE = os.environ.get("CMACLIP_TRAINING_QUEUE", "default")
# Assets are logical names, not storage paths: a champion changes in the registry, predictions may be
# published to any URI; each event's `extra` says which version, or where.
PREDICTIONS_ASSET_URI = "cmaclip://predictions/published"


def champion_asset_uri(model_name: str = MODEL_NAME) -> str:
    return f"cmaclip://models/{model_name}/champion"


def config_names() -> list[str]:
    """The configs shipped in cmaclip/configs/ (what the trigger form proposes)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def default_catalog_uri() -> str:
    return os.environ.get("CMACLIP_CATALOG_URI") or str(settings.home() / "catalog" / "catalog.parquet")


def default_work_uri() -> str:
    """Root of the per-run folders (datasets, training checkpoints)."""
    return os.environ.get("CMACLIP_WORK_URI") or str(settings.home() / "runs")


def default_predictions_uri() -> str:
    return os.environ.get("CMACLIP_PREDICTIONS_URI") or str(settings.home() / "predictions")


def retry_policy() -> dict[str, Any]:
    """Task retry arguments: exponential backoff from `CMACLIP_RETRY_DELAY_S` (default 60 s), doubling per
    try, capped at 30 minutes. A transient failure (a preempted worker, a storage hiccup) gets a second
    chance soon; a persistent one does not hammer the shared services."""
    delay = float(os.environ.get("CMACLIP_RETRY_DELAY_S", "60"))
    return {"retries": int(os.environ.get("CMACLIP_TASK_RETRIES", "2")),
            "retry_delay": timedelta(seconds=delay), "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(minutes=30)}


def run_uri(root: str, dag_id: str, run_id: str) -> str:
    """The folder of one DAG run under `root` (the `work_uri` param): the same for every attempt of every
    task of that run."""
    from ..io import storage
    check_storage_uri(root, "work_uri")
    return storage.join(root, dag_id, re.sub(r"[^A-Za-z0-9._-]+", "_", run_id))


# --- the storage a DAG param may name -----------------------------------------------------------------

def check_storage_uri(uri: str, what: str) -> str:
    """`uri` when it lies under one of `settings.storage_prefixes()`, else a ValueError that names `what` and
    the prefixes. The rule is the one `image_uri` values obey (`pipeline.io.image_sources`): a prefix matches on
    path boundaries after `..` is folded (`s3://cmaclip/` does not admit `s3://cmaclip-evil/`, nor `/data/`
    admit `/data/../etc`), a local path also after its links are resolved, `file://` and plain paths
    alike; fsspec chains and other schemes are refused."""
    from ..io.image_sources import ImageSources, Refused  # fsspec and pyarrow: loaded when a task checks

    allowed = settings.storage_prefixes()
    absolute = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
    try:
        ImageSources(tuple(allowed)).resolve(absolute, catalog_file="")
    except Refused as exc:
        raise ValueError(f"{what} {uri!r} is outside the storage the DAGs may use: {', '.join(allowed)} "
                         f"(CMACLIP_STORAGE_PREFIXES): {exc}") from None
    return uri


def _checked_config(config: str) -> str:
    """A config shipped in cmaclip/configs/ by name, or a config file (a path with a suffix, which
    `load_config` reads as given) within the allowed storage. A name that is not shipped is refused:
    `load_config` would look for it under cmaclip/configs/, where `..` could leave the folder."""
    if config in config_names():
        return config
    if not os.path.splitext(config)[1]:
        raise ValueError(f"config {config!r} is neither a config in cmaclip/configs/ "
                         f"({', '.join(config_names())}) nor the path of a config file")
    return check_storage_uri(config, "config")


def _checked_model(model_ref: str) -> str:
    """A registry or run URI as is; anything else is a checkpoint folder, which must be allowed storage."""
    if model_ref.startswith(("models:/", "runs:/")):
        return model_ref
    return check_storage_uri(model_ref, "model")


# --- failing at once on what retrying cannot fix ----------------------------------------------------------

Task = TypeVar("Task", bound=Callable[..., Any])
# MLflow's codes for a reference to nothing: a registered model, version, alias or run that does not exist.
_MLFLOW_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def retrying_cannot_fix(exc: BaseException) -> bool:
    """Whether `exc` is a mistake in what the task was given rather than an accident while it ran: a bad
    config, a missing or malformed catalog, a refused storage URI (ValueError, CatalogError among them,
    FileNotFoundError), a model that does not exist (MLflow's not-found codes). Other storage and network
    errors (OSError, timeouts) and crashes may pass on a second try: they keep their retries."""
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return True
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # loaded if anything could have raised one
    return (mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException)
            and exc.error_code in _MLFLOW_NOT_FOUND)


def fail_fast(task: Task, fail: Callable[[str], BaseException]) -> Task:
    """`task` (a DAG's task function) raising an error `retrying_cannot_fix` as `fail(message)` instead: the
    DAG files pass Airflow's AirflowFailException, which fails the task without its retries (pipeline/
    never imports airflow). The signature and docstring stay the task's, which Airflow reads."""
    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            if not retrying_cannot_fix(exc):
                raise
            raise fail(f"{type(exc).__name__}: {exc} (not retried: a retry would fail the same way)") from exc
    return run  # type: ignore[return-value]


# --- the first task of each DAG: every param checked in seconds, before anything runs -------------------

def check_param_names(params: Collection[str], known: Collection[str]) -> None:
    """A ValueError naming every param the DAG does not take (Airflow accepts any key in a run's conf and
    would silently run on the defaults of the one that was meant), with the closest known name."""
    unknown = sorted(set(params) - set(known))
    if not unknown:
        return
    named = [f"{name!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(name, known, 1))
             for name in unknown]
    raise ValueError(f"unknown param{'s' if len(named) > 1 else ''} {', '.join(named)}: "
                     f"this DAG takes {', '.join(sorted(known))}")


def _checked_catalog(catalog_uri: str, tasks: Sequence[str]) -> dict[str, Any]:
    """The catalog's files listed and their footers checked against the columns a run needs (no data
    read): {"catalog_files", "catalog_rows", "image_column"}; CatalogError otherwise."""
    from ..io import catalog

    check_storage_uri(catalog_uri, "catalog_uri")
    checked = catalog.check(catalog_uri, tuple(tasks))
    return {"catalog_files": len(checked), "catalog_rows": sum(rows for _, rows, _ in checked),
            "image_column": ", ".join(sorted({column for _, _, column in checked}))}


def _loaded_config(config: str, epochs: Mapping[str, int]) -> dict[str, Any]:
    """The epochs per stage the training will run, once the config is found and loads (torch-free)."""
    chosen = _checked_config(config)
    try:
        stages = load_config(chosen).train.stages
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"config {config!r} does not load: {type(exc).__name__}: {exc}") from exc
    wanted = {stage: int(epochs.get(stage, stages[stage].epochs)) for stage in stages}
    return {"config": config, "epochs": {stage: n for stage, n in wanted.items() if n > 0}}


def validate_retrain(params: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    """The retrain DAG's params, checked before ingest: no unknown name, storage within the prefixes, the
    config found and loading, the catalog's files readable with every column of the `tasks` param."""
    check_param_names(params, known)
    check_storage_uri(params["work_uri"], "work_uri")
    checked = {**_loaded_config(params["config"], params["epochs"]),
               **_checked_catalog(params["catalog_uri"], params["tasks"])}
    log.info("params checked: %s", checked)
    return checked


def _found_model(model_ref: str) -> str:
    """What `model_ref` names, looked up without downloading anything: `models:/<name>/<version>`, the run
    or the checkpoint folder; ValueError when it names nothing."""
    _checked_model(model_ref)
    if not model_ref.startswith(("models:/", "runs:/")):
        from ..io import storage
        if not storage.exists(model_ref):
            raise ValueError(f"model {model_ref!r}: no checkpoint folder there")
        return model_ref
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from ..tracking import tracker

    client = tracker.client()
    try:
        if model_ref.startswith("runs:/"):
            return f"run {client.get_run(model_ref.removeprefix('runs:/').split('/', 1)[0]).info.run_id}"
        resolved = get_model_name_and_version(client, model_ref)
        if len(resolved) != 2:  # a logged model's id: scoring takes a registered version
            raise ValueError(f"model {model_ref!r}: expected models:/name@alias or models:/name/<version>")
        return f"models:/{resolved[0]}/{client.get_model_version(*resolved).version}"
    except MlflowException as exc:
        if exc.error_code not in _MLFLOW_NOT_FOUND:
            raise
        raise ValueError(f"model {model_ref!r} names nothing in {settings.tracking_uri()}: {exc.message}") from exc


def validate_scoring(params: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    """The scoring DAG's params, checked before plan: no unknown name, storage within the prefixes, the
    model reference resolving (a registry lookup, no download), the catalog's files readable with
    product_id, title and image (or image_uri)."""
    check_param_names(params, known)
    check_storage_uri(params["predictions_uri"], "predictions_uri")
    checked = {"model": _found_model(params["model"]), **_checked_catalog(params["catalog_uri"], ())}
    log.info("params checked: %s", checked)
    return checked


# --- retrain -----------------------------------------------------------------------------------------

def _ingest_folders(run_folder: str) -> tuple[str, str]:
    """The run's dataset and the staging its ingest groups are committed to (removed once it is written)."""
    from ..io import storage

    check_storage_uri(run_folder, "run folder (work_uri)")
    return storage.join(run_folder, "dataset"), storage.join(run_folder, "ingest-staging")


def _ingest_plan(plan: Mapping[str, Any]):
    from ..ingest.plan import IngestPlan

    checked = IngestPlan.from_dict(dict(plan))
    for uri in (checked.catalog_uri, *(f.uri for f in checked.files)):
        check_storage_uri(uri, "catalog_uri")
    return checked


def plan_ingest(catalog_uri: str, tasks: Sequence[str], run_folder: str,
                groups: int = INGEST_GROUPS) -> dict[str, Any]:
    """Check the catalog's files and cut its row groups into at most `groups` groups: {"plan", "groups"
    (their ids: what the staging task maps over)}."""
    from ..ingest import plan as ingest_plan

    check_storage_uri(catalog_uri, "catalog_uri")
    check_storage_uri(run_folder, "run folder (work_uri)")  # before the plan reads the catalog
    planned = ingest_plan.plan_ingest(catalog_uri, ingest_plan.make_params(catalog_uri, list(tasks)), groups)
    log.info("ingest plan %s: %d rows in %d groups", planned.id, planned.rows, len(planned.group_ids))
    return {"plan": planned.to_dict(), "groups": planned.group_ids}


def stage_ingest_group(plan: Mapping[str, Any], group: str, run_folder: str) -> dict[str, Any]:
    """Stage one group of the plan (skipped when this plan committed it already); its counts."""
    from ..ingest import staging

    marker = staging.stage_group(_ingest_plan(plan), group, _ingest_folders(run_folder)[1])
    return {k: v for k, v in marker.to_dict().items() if k not in ("rows", "quarantine")}


def finish_ingest(plan: Mapping[str, Any], run_folder: str) -> dict[str, Any]:
    """Decide over the staged groups and write the dataset under `run_folder/dataset`, then remove the staging;
    the dataset URI and the manifest's counts. Run again once written, it returns the written dataset."""
    from ..ingest import dataset
    from ..io import storage

    checked = _ingest_plan(plan)
    dataset_uri, staged = _ingest_folders(run_folder)
    done = storage.exists(storage.join(dataset_uri, dataset.MANIFEST)) and not storage.exists(staged)
    manifest = dataset.read_manifest(dataset_uri) if done else None
    if manifest is None or manifest.input.fingerprint != checked.fingerprint:
        manifest = dataset.finish(checked, staged, dataset_uri)
        storage.remove(staged, recursive=True)  # a copy of the catalog's images: not kept once the dataset is
    return {"dataset_uri": dataset_uri, "input_fingerprint": manifest.input.fingerprint,
            **manifest.counts.to_dict()}


def ingest_catalog(catalog_uri: str, tasks: Sequence[str], run_folder: str) -> dict[str, Any]:
    """Catalog -> dataset under `run_folder/dataset` in one call (plan, every group, finish), as the DAG's
    three ingest tasks do it; the dataset URI and the manifest's counts."""
    planned = plan_ingest(catalog_uri, tasks, run_folder)
    for group in planned["groups"]:
        stage_ingest_group(planned["plan"], group, run_folder)
    return finish_ingest(planned["plan"], run_folder)


def open_training(dataset: Mapping[str, Any], run_folder: str, config: str, *,
                  epochs: Mapping[str, int] | None = None, target_precision: float | None = None,
                  model_name: str = MODEL_NAME, dag_id: str = "", run_id: str = "") -> dict[str, Any]:
    """Start (or, on a retry, find again) the training of this run: its MLflow parent run and handle,
    tagged with the Airflow run it belongs to. Its stages are the config's after the `epochs` overrides
    (align only when it has epochs). Returns the state the stage tasks pass along:
    {"training": handle, "results": []}."""
    from ..io import storage
    from ..tracking import tracker
    from ..training import trainer

    check_storage_uri(run_folder, "run folder (work_uri)")
    chosen = trainer.as_config(_checked_config(config)).to_dict()
    if target_precision is not None:
        chosen["train"]["target_precision"] = float(target_precision)
    handle = trainer.start_training(chosen, dataset["dataset_uri"], storage.join(run_folder, "training"),
                                    epochs={s: int(n) for s, n in (epochs or {}).items()} or None,
                                    model_name=model_name, run_name=tracker.timestamped_name("retrain"),
                                    tags={tracker.AIRFLOW_DAG_TAG: dag_id, tracker.AIRFLOW_RUN_TAG: run_id})
    return {"training": handle, "results": []}


def train_stage(state: Mapping[str, Any], stage: str, processes: int | str = 1) -> dict[str, Any]:
    """Train `stage` on `processes` processes (torchrun when more than one), resuming it after the last
    completed epoch on a retry; returns the state with the stage's result appended. A stage the training
    does not include (align, unless its config gives it epochs) passes the state on unchanged. The task log
    gets a line per epoch and, at the end, the table of the stages trained so far."""
    from cmaclip.train import PrintCallback

    from ..training import launch, trainer

    if stage not in state["training"]["stages"]:
        log.info("stage %s is not in this training's stages %s: nothing to train", stage, state["training"]["stages"])
        return {"training": state["training"], "results": list(state["results"])}

    result = launch.run_stage_distributed(state["training"], stage, processes, callbacks=[PrintCallback(log.info)])
    results = [*state["results"], result]
    log.info("stage %s done (MLflow run %s); best validation epoch of each stage so far:\n%s",
             stage, result["run_id"], trainer.stage_table({r["stage"]: r for r in results}))
    return {"training": state["training"], "results": results}


def mark_training_failed(run_folder: str) -> None:
    """A training task gave up: mark the MLflow parent run FAILED (a later retry reopens it)."""
    from ..io import storage
    from ..training import trainer

    check_storage_uri(run_folder, "run folder (work_uri)")
    handle_uri = storage.join(run_folder, "training", trainer.TRAINING_FILE)
    if storage.exists(handle_uri):
        trainer.fail_training(storage.read_json(handle_uri))


def evaluate(state: Mapping[str, Any]) -> dict[str, Any]:
    """Log the last stage's best checkpoint as the training's model, with per-stage validation metrics."""
    from ..training import trainer

    final = trainer.finish_training(state["training"], state["results"], register=False)
    log.info("training run %s: model %s from %s", final["run_id"], final["model_uri"], final["checkpoint"])
    return {**{k: final[k] for k in ("run_id", "model_uri", "checkpoint", "stages")},
            "model_name": state["training"]["model_name"], "dataset_uri": state["training"]["dataset_uri"]}


def register(evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """A new registry version; `new_champion` when it is the first version (champion without comparison)."""
    from ..tracking import registry

    registered = registry.register(evaluated["run_id"], evaluated["model_name"])
    return {**registered, "dataset_uri": evaluated["dataset_uri"],
            "new_champion": registered["alias"] == registry.CHAMPION}


def compare(registered: Mapping[str, Any]) -> dict[str, Any]:
    """Champion vs the new challenger on the dataset's test split. {"compared", "passed", "comparison",
    "reason"}; nothing to compare when the new version already is the champion."""
    from ..tracking import registry

    if registered["new_champion"]:
        return {"compared": False, "passed": False, "comparison": None,
                "reason": f"v{registered['version']} is the first version: champion without a comparison"}
    comparison = registry.compare(registered["name"], registered["dataset_uri"])
    log.info("%s", comparison.table)
    return {"compared": True, "passed": bool(comparison.gate["passed"]), "comparison": comparison.as_dict(),
            "reason": "gate passes" if comparison.gate["passed"] else "; ".join(comparison.gate["failures"])}


def promote(registered: Mapping[str, Any], decision: Mapping[str, Any]) -> dict[str, Any]:
    """Move `champion` to the challenger (the registry re-checks the gate and refuses a stale comparison)."""
    from ..tracking import registry

    return registry.promote(registered["name"], decision["comparison"])


# --- nightly scoring ---------------------------------------------------------------------------------

def group_shards(shard_ids: Sequence[str], max_groups: int) -> list[dict[str, Any]]:
    """Consecutive shards in at most `max_groups` groups of near-equal size: one mapped task per group,
    labelled with its shard range in the Airflow UI ("shards 00000-00003", or "shard 00004")."""
    size = max(1, math.ceil(len(shard_ids) / max(1, max_groups)))
    chunks = [list(shard_ids[i:i + size]) for i in range(0, len(shard_ids), size)]
    return [{"label": f"shard {c[0]}" if len(c) == 1 else f"shards {c[0]}-{c[-1]}", "shards": c} for c in chunks]


def _predictor(model_ref: str, device: str = "cpu"):
    from ..scoring import runner
    from ..tracking import registry

    if model_ref.startswith(("models:/", "runs:/")):
        return registry.load_predictor(model_ref, device=device)
    return runner.load_predictor(model_ref, device=device)


def _pin(model_ref: str) -> str:
    """An alias moves; a run must score every shard with one version: `models:/n@alias` -> `models:/n/<v>`."""
    from ..tracking import registry

    if not model_ref.startswith("models:/"):
        return model_ref
    resolved = registry.resolve_checkpoint(model_ref)
    return f"models:/{resolved.name}/{resolved.version}"


def plan_scoring(catalog_uri: str, model_ref: str, rows_per_shard: int, out_uri: str,
                 max_groups: int = MAX_SCORING_TASKS, explain: bool = False, full: bool = False) -> dict[str, Any]:
    """Pin the model version, plan the shards and name the run: {"run": {"plan", "model", "run_id",
    "explain"}, "groups": [{"label", "shards"}]}. The run id is a function of (input snapshot, model
    version, explain, and the published state predictions are carried over from), so a rerun of the DAG
    resumes the same run and skips committed shards. Incremental unless `full`: products whose content and
    model did not change carry their published prediction over (pipeline/scoring/carry_over.py). The rows
    of duplicated product_ids and those carried over go to side files under `out_uri` (the predictions
    folder), not into the XCom."""
    from ..scoring import carry_over, planner, runner

    check_storage_uri(catalog_uri, "catalog_uri")
    check_storage_uri(out_uri, "predictions_uri")
    _checked_model(model_ref)
    pinned = _pin(model_ref)
    predictor = _predictor(pinned)
    lineage = predictor.lineage
    carry_from = None if full else carry_over.source(out_uri, lineage.name, lineage.version, predictor.tasks, explain)
    plan = planner.plan_shards(catalog_uri, rows_per_shard, out=out_uri, carry_from=carry_from)
    log.info("plan %s: %s", plan.id, plan.counts())
    run_id = runner.default_run_id(plan.id, predictor, explain)
    groups = group_shards(plan.shard_ids, max_groups)
    log.info("scoring run %s with %s: %d shards in %d mapped tasks", run_id, pinned, len(plan.shard_ids), len(groups))
    return {"run": {"plan": plan.to_dict(), "model": pinned, "run_id": run_id, "explain": explain},
            "groups": groups}


def score_group(run: Mapping[str, Any], group: Mapping[str, Any], out_uri: str) -> dict[str, Any]:
    """Score the group's shards with one model load, on the GPU where the worker has one (device 'auto', as
    training); committed shards are skipped. Summed counts. (`plan_scoring` loads the model on the CPU: it
    needs only its lineage and tasks.)"""
    from ..scoring import planner, runner

    check_storage_uri(out_uri, "predictions_uri")
    plan = planner.Plan.from_dict(run["plan"])
    predictor = _predictor(run["model"], device="auto")
    markers = [runner.score_shard(plan.shard(shard_id), predictor, out_uri, run_id=run["run_id"],
                                  explain=run.get("explain", False))
                                  for shard_id in group["shards"]]
    total = lambda key: sum(m[key] for m in markers)  # noqa: E731
    return {"shards": [m["shard"] for m in markers], "skipped": [m["shard"] for m in markers if m["skipped"]],
            "rows_in": total("rows_in"), "predicted": total("predicted"), "scored": total("scored"),
            "carried": total("carried"), "quarantined": total("quarantined")}


def finalize_scoring(run: Mapping[str, Any], out_uri: str) -> dict[str, Any]:
    """Check every shard is committed and rows reconcile; the run manifest's figures (not its file list)."""
    from ..scoring import finalize, layout

    check_storage_uri(out_uri, "predictions_uri")
    manifest = finalize.finalize(run["plan"], out_uri, run["run_id"])
    return {"manifest": layout.manifest_uri(out_uri, run["run_id"]),
            **{k: manifest[k] for k in ("run_id", "plan_id", "shards", "model_name", "model_version", "rows_in",
                                        "predicted", "scored", "carried", "quarantined", "reasons",
                                        "scoring_seconds")}}


def report_run(finalized: Mapping[str, Any], out_uri: str, catalog_uri: str) -> dict[str, Any]:
    """The run's report against the published state (fill, disagreements, per-task drift), its Markdown
    summary logged here for the task log: {"run_id", "report", "summary"} (URIs)."""
    from ..io import storage
    from ..scoring import publish, report
    from ..scoring.layout import report_uri

    check_storage_uri(out_uri, "predictions_uri")
    check_storage_uri(catalog_uri, "catalog_uri")
    made = report.build(out_uri, publish.run_manifest(out_uri, finalized["run_id"]), catalog_uri)
    log.info("report of scoring run %s:\n%s", made.run_id, storage.read_text(made.files["summary"]))
    return {"run_id": made.run_id, "report": report_uri(out_uri, made.run_id, "report.json"),
            "summary": made.files["summary"]}


def gate_params() -> dict[str, tuple[float, str]]:
    """The quality gate's limits as DAG params: name -> (default, meaning). Import-light (gate.py is)."""
    from ..scoring.gate import Limits

    return {name: (default, Limits.meanings()[name]) for name, default in Limits().to_dict().items()}


def check_gate(reported: Mapping[str, Any], out_uri: str, limits: Mapping[str, Any]) -> dict[str, Any]:
    """The quality gate's verdict on the reported run: {"passed", "exceeded"} (logged either way)."""
    from ..manifests import RunReport
    from ..scoring import gate, publish
    from ..scoring.layout import report_uri

    check_storage_uri(out_uri, "predictions_uri")
    manifest = publish.run_manifest(out_uri, reported["run_id"])
    run_id = manifest.run_id
    made = RunReport.read(report_uri(out_uri, run_id, "report.json"))
    verdict = gate.check(made, manifest, gate.Limits.from_mapping(limits))
    log.info("quality gate on run %s: %s", run_id, "passed" if verdict.passed else "; ".join(verdict.exceeded))
    return verdict.to_dict()


def publish_predictions(out_uri: str, catalog_uri: str, run_id: str | None = None,
                        limits: Mapping[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Publish the run as the new version of `out_uri/published/` (the gate checked again, unless `force`),
    then retention; the version, its files and what was removed."""
    from ..scoring import publish
    from ..scoring.gate import Limits

    check_storage_uri(out_uri, "predictions_uri")
    check_storage_uri(catalog_uri, "catalog_uri")
    return publish.publish(out_uri, catalog_uri, run_id=run_id, limits=Limits.from_mapping(limits or {}),
                           force=force)
