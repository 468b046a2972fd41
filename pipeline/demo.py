"""`make demo`: the main job end to end on embedded defaults, then a summary.

1. prepares the embedded Airflow under `$CMACLIP_HOME/airflow` (SQLite, LocalExecutor, the `gpu` pool);
2. writes a synthetic catalog with a few bad rows (undecodable images, duplicates, ...) unless present;
3. runs `airflow dags test cmaclip_retrain`: ingest, the three training stages (MLflow runs), evaluate,
   register, compare with the champion, promote by the gate;
4. runs `airflow dags test cmaclip_nightly_scoring`: plan, score the shards, finalize, publish;
5. a second night: a snapshot of the catalog with a few titles and images changed, products added and
   deleted (written beside it once, the same on every rerun), scored by the same DAG: only the changed and
   new products are scored, the rest carry their published prediction over;
6. prints what happened, read back from where it landed (the MLflow registry and runs, the ingest and
   scoring manifests, the published Parquet), and how to open the MLflow and Airflow UIs.

The Airflow output of each DAG run goes to `$CMACLIP_HOME/demo/<dag>.log`. Running the demo again retrains
(a new registry version, compared with the champion); each night then scores what differs from the
published state (everything if the champion changed). Sized for a 2-core CPU machine: a few minutes for
the DAGs with the `tiny` config.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from tabulate import tabulate

from . import settings
from .catalog_edits import Edits, next_snapshot
from .io import storage
from .io.parquet_writer import AtomicParquetWriter
from .orchestration import airflow_home, airflow_tasks
from .scoring.layout import published_uri
from .tracking import links

ROWS = 1200
EPOCHS = {"warmup": 3, "end_to_end": 1, "tuning": 2}
ROWS_PER_SHARD = 400
SEED = 7
SECOND_NIGHT = Edits(titles=3, images=2, added=2, deleted=2)
GOOD_ROW = "syn-"                     # the synthetic catalog's good rows; the second night changes only those


# --- running -----------------------------------------------------------------------------------------

def make_catalog(uri: str, rows: int) -> dict[str, Any]:
    from .synthetic import make_catalog as write
    return write(rows, uri, seed=SEED, with_bad_rows=True)


def second_night_catalog(first_uri: str) -> dict[str, Any]:
    """The second night's snapshot, beside the first: SECOND_NIGHT's edits to its good rows. Written once;
    the edits are seeded, so a rerun finds the same snapshot (the same file, so the same plan)."""
    uri = first_uri.removesuffix(".parquet") + "-night-2.parquet"
    first = storage.parquet_file(first_uri)
    table = first.read()
    pool = [i for i, pid in enumerate(table.column("product_id").to_pylist()) if (pid or "").startswith(GOOD_ROW)]
    snapshot, changed = next_snapshot(table, 2, SECOND_NIGHT, seed=SEED, pool=pool)
    if not storage.exists(uri):
        with AtomicParquetWriter(uri, snapshot.schema, first.metadata.row_group(0).num_rows) as writer:
            writer.write(snapshot)
    return {"uri": uri, "rows": snapshot.num_rows, "changed": {kind: len(ids) for kind, ids in changed.items()}}


def run_dag(dag_id: str, conf: Mapping[str, Any], env: Mapping[str, str], log_path: Path) -> float:
    """`airflow dags test <dag_id> -c <conf>` with its output in `log_path`; the seconds it took.
    Raises with the log's tail when the DAG run fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(airflow_home.airflow_command(["dags", "test", dag_id, "-c", json.dumps(conf)]),
                              env=dict(env), stdout=log, stderr=subprocess.STDOUT, cwd=settings.IMPORT_ROOT).returncode
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-60:])
        raise RuntimeError(f"{dag_id} failed (exit code {code}); the end of {log_path}:\n{tail}")
    return time.perf_counter() - started


# --- reading back what happened --------------------------------------------------------------------------

def training_report(since: float, model_name: str) -> dict[str, Any]:
    """The newest training started after `since` (epoch seconds): per-stage validation metrics, the
    registry version it became, the champion, and the ingest counts of its dataset."""
    import mlflow

    from .ingest import dataset
    from .tracking import registry, tracker

    settings.configure()
    c = tracker.client()
    experiment = c.get_experiment_by_name(tracker.TRAINING_EXPERIMENT)
    wanted = tracker.search_filter({f"tags.`{tracker.KIND_TAG}`": "training",
                                    f"tags.`{tracker.AIRFLOW_DAG_TAG}`": "cmaclip_retrain"})
    runs = c.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                         filter_string=f"{wanted} and attributes.start_time >= {int(since * 1000)}")
    if not runs:
        raise RuntimeError(f"no training run in MLflow experiment {tracker.TRAINING_EXPERIMENT} since the demo started")
    run = runs[0]
    stages = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/stages.json")
    found = c.search_model_versions(tracker.search_filter({"name": model_name, "run_id": run.info.run_id}))
    versions = [v for v in found if v.name == model_name]
    aliases = c.get_registered_model(model_name).aliases
    version = versions[0] if versions else None
    tags = version.tags if version else {}
    compared = tags.get(f"{registry.TAG}comparison_run")
    comparison = mlflow.artifacts.load_dict(f"runs:/{compared}/comparison.json") if compared else {}
    dataset_uri = run.data.params.get("dataset.uri", "")
    return {"run_id": run.info.run_id, "experiment_id": experiment.experiment_id,
            "stages": {s: r["metrics"] for s, r in stages.items()},
            "target_precision": float(run.data.params.get("config.train.target_precision", 0.9)),
            "version": version.version if version else None, "verdict": tags.get(registry.VERDICT, ""),
            "gate": comparison.get("gate"), "compared_with": comparison.get("champion"),
            "champion": aliases.get("champion"), "dataset_uri": dataset_uri,
            "ingest": dataset.read_manifest(dataset_uri).counts.to_dict() if dataset_uri else {}}


def scoring_report(predictions_uri: str) -> dict[str, Any]:
    """The most recently finalized scoring run under `predictions_uri` and what is published."""
    from .manifests import RunManifest

    manifests = [RunManifest.read(u) for u in storage.list_files(storage.join(predictions_uri, "_manifests"), ".json")]
    if not manifests:
        raise RuntimeError(f"no finalized scoring run under {predictions_uri}")
    latest = max(manifests, key=lambda m: m.finalized_at).to_dict()
    published = {name: published_uri(predictions_uri, name) for name in ("latest", "catalog")}
    rows = {name: storage.parquet_file(uri).metadata.num_rows for name, uri in published.items() if storage.exists(uri)}
    return {**{k: latest[k] for k in ("run_id", "shards", "rows_in", "predicted", "scored", "carried", "quarantined",
                                     "reasons", "model_name", "model_version", "scoring_seconds")},
            "shard_files": latest["predictions"], "published": published, "published_rows": rows,
            "verdict": gate_verdict(predictions_uri, latest["run_id"])}


def gate_verdict(predictions_uri: str, run_id: str) -> dict[str, Any] | None:
    """The quality gate's verdict on run `run_id` as publish recorded it in the version it published,
    {"passed": bool, "exceeded": [what, ...], "forced": bool}; None when no kept version came from it."""
    from .scoring import versions

    for number in reversed(versions.numbers(predictions_uri)):
        record = versions.read(predictions_uri, number)
        if record.run_id == run_id and record.gate_passed is not None:
            return {"passed": record.gate_passed, "exceeded": list(record.gate_exceeded), "forced": record.forced}
    return None


# --- the summary -------------------------------------------------------------------------------------

def metrics_table(stages: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], precision: float) -> str:
    header = ["stage", "task", "accuracy", f"recall@{precision:.0%}P"]
    rows = [[stage, task, m.get(f"{task}/accuracy"), m.get(f"{task}/recall_at_precision")]
            for stage, m in stages.items() for task in tasks]
    rows += [[stage, "mean", m.get("mean_accuracy"), m.get("mean_recall_at_precision")] for stage, m in stages.items()]
    rows.sort(key=lambda r: list(stages).index(r[0]))
    # Task names come from the catalog: one that looks like a number stays a name.
    table = tabulate(rows, header, floatfmt=".3f", missingval="-", disable_numparse=[0, 1])
    return "\n".join("    " + line for line in table.splitlines())


def _reasons(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"


def registry_outcome(training: Mapping[str, Any]) -> str:
    """What the registry made of the new version: its promotion, else the gate's verdict."""
    gate = training["gate"]
    if training["verdict"].startswith("promoted"):
        outcome = training["verdict"]
    elif gate is None:
        outcome = "not compared"
    elif gate["passed"]:
        outcome = f"passed the gate against v{training['compared_with']}, not promoted (promote was off)"
    else:
        failures = gate["failures"]
        outcome = (f"failed the gate against v{training['compared_with']}: " + "; ".join(failures[:2])
                   + (f" (+{len(failures) - 2} more)" if len(failures) > 2 else ""))
    return f"{airflow_tasks.MODEL_NAME} v{training['version']}: {outcome}. Champion: v{training['champion']}"


def gate_line(verdict: Mapping[str, Any] | None) -> str:
    """A verdict as `gate_verdict` reads it, in words."""
    if verdict is None:
        return "no verdict (not published)"
    if verdict["passed"]:
        return "passed"
    return ("failed, published anyway: " if verdict.get("forced") else "failed: ") + "; ".join(verdict["exceeded"])


def night_lines(nights: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per night: its catalog, then its run's rows: scored, carried over, quarantined."""
    lines = []
    for number, night in enumerate(nights, start=1):
        run, catalog = night["scoring"], night["catalog"]
        lines += [f"{'Scoring' if number == 1 else '':15s}night {number}: {catalog['uri']} "
                  f"({catalog['rows']} rows, {catalog['note']})",
                  f"{'':17s}run {run['run_id']} with v{run['model_version']}, {run['shards']} shards: "
                  f"{run['rows_in']} rows in = {run['scored']} scored + {run['carried']} carried over + "
                  f"{run['quarantined']} quarantined ({_reasons(run['reasons'])})"]
    verdicts = [night["scoring"]["verdict"] for night in nights]
    if all(v is None for v in verdicts):
        return lines + ["Quality gate   " + gate_line(None)]
    each = [f"night {n}: {gate_line(v)}" for n, v in enumerate(verdicts, start=1)]
    return lines + ["Quality gate   " + "; ".join(each)]


def summary(training: Mapping[str, Any], nights: Sequence[Mapping[str, Any]], env: Mapping[str, str],
            timings: Mapping[str, float], tasks: Sequence[str], logs: Sequence[Path]) -> str:
    ingest, catalog, scoring = training["ingest"], nights[0]["catalog"], nights[-1]["scoring"]
    shard_folder = str(Path(scoring["shard_files"][0]).parent) if scoring["shard_files"] else "-"
    lines = [
        "",
        f"cmaclip demo: done in {timings['total']:.0f} s (retrain DAG {timings['retrain']:.0f} s, scoring DAG "
        + ", ".join(f"night {n} {night['seconds']:.0f} s" for n, night in enumerate(nights, start=1)) + ")",
        "",
        f"Catalog        {catalog['uri']}: {catalog['rows']} rows ({catalog['note']})",
        f"Ingest         {ingest.get('rows_in')} rows in = {ingest.get('rows_kept')} kept + "
        f"{ingest.get('rows_quarantined')} quarantined ({_reasons(ingest.get('quarantined_by_reason', {}))})",
        f"Training       MLflow run {training['run_id']}: best epoch of each stage on the validation split",
        metrics_table(training["stages"], tasks, training["target_precision"]),
        f"Registry       {registry_outcome(training)}",
        *night_lines(nights),
        f"Predictions    {scoring['published']['latest']} ({scoring['published_rows'].get('latest', 0)} products, "
        "latest attributes per product)",
        f"               {scoring['published']['catalog']} (the catalog joined with its predicted attributes)",
        f"               per-shard files: {shard_folder}/",
        "",
        "MLflow UI      " + f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {settings.tracking_uri()} "
        f"--port 5000   -> http://127.0.0.1:5000/#/experiments/{training['experiment_id']}?{links.MODEL_TRAINING_VIEW}",
        "               (MLflow 3 opens experiments in its GenAI view unless the link or the sidebar switch says "
        "model training)",
        "Airflow UI     " + airflow_home.ui_hint(env) + "   -> http://127.0.0.1:8080",
        f"               (user admin; password in {Path(env['AIRFLOW_HOME']) / 'simple_auth_manager_passwords.json.generated'})",
        "Airflow logs   " + ", ".join(str(p) for p in logs),
    ]
    return "\n".join(lines)


def score_night(number: int, catalog: Mapping[str, Any], predictions_uri: str, rows_per_shard: int,
                env: Mapping[str, str], log_path: Path) -> dict[str, Any]:
    """The scoring DAG over one night's catalog; its run's counts and the seconds it took."""
    print(f"  scoring DAG, night {number}: plan -> score (mapped) -> finalize -> publish ...", flush=True)
    seconds = run_dag("cmaclip_nightly_scoring", {"catalog_uri": catalog["uri"], "predictions_uri": predictions_uri,
                                                  "rows_per_shard": rows_per_shard}, env, log_path)
    scoring = scoring_report(predictions_uri)
    print(f"  scoring DAG succeeded in {seconds:.0f} s: {scoring['scored']} rows scored, {scoring['carried']} "
          "carried over", flush=True)
    return {"catalog": catalog, "scoring": scoring, "seconds": seconds}


# --- the command -------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=ROWS, help="good products in the synthetic catalog")
    p.add_argument("--epochs", type=json.loads, default=EPOCHS, help='JSON, e.g. \'{"warmup": 3}\'')
    p.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD)
    p.add_argument("--config", default="tiny")
    args = p.parse_args(argv)
    # Quiet MLflow in this process and in the DAG runs: the summary and the logs are what to read.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    started = time.time()
    home = settings.home()
    print(f"cmaclip demo: state under {home}", flush=True)
    env = airflow_home.prepare()
    print(f"  Airflow ready ({env['AIRFLOW_HOME']})", flush=True)

    catalog_uri = airflow_tasks.default_catalog_uri()
    if storage.exists(catalog_uri):  # a rerun keeps the snapshot: unchanged products are not rescored
        catalog = {"uri": catalog_uri, "rows": storage.parquet_file(catalog_uri).metadata.num_rows,
                   "note": "from an earlier run"}
    else:
        made = make_catalog(catalog_uri, args.rows)
        catalog = {"uri": catalog_uri, "rows": made["rows"], "note": f"{made['bad_rows']} of them deliberately bad"}
    print(f"  catalog: {catalog_uri} ({catalog['rows']} rows)", flush=True)

    tasks = list(airflow_tasks.TASKS)
    logs = [home / "demo" / "retrain.log", home / "demo" / "scoring.log", home / "demo" / "scoring-night-2.log"]
    timings = {}
    # These are `dags test` runs: the scoring DAG stays paused through them, so the champion event of the
    # retrain run starts no scoring run when a scheduler starts later.
    with airflow_home.paused("cmaclip_nightly_scoring", env):
        print("  retrain DAG: ingest -> warmup -> end_to_end -> tuning -> evaluate -> register -> compare -> "
              "promote ...", flush=True)
        timings["retrain"] = run_dag("cmaclip_retrain", {"catalog_uri": catalog_uri, "tasks": tasks,
                                                         "config": args.config, "epochs": args.epochs}, env, logs[0])
        print(f"  retrain DAG succeeded in {timings['retrain']:.0f} s", flush=True)
        predictions_uri = airflow_tasks.default_predictions_uri()
        nights = [score_night(1, catalog, predictions_uri, args.rows_per_shard, env, logs[1])]
        second = second_night_catalog(catalog_uri)
        changed = second["changed"]
        second["note"] = (f"{changed['titles']} titles and {changed['images']} images changed, "
                          f"{changed['added']} products added, {changed['deleted']} deleted")
        nights.append(score_night(2, second, predictions_uri, args.rows_per_shard, env, logs[2]))

    training = training_report(started, airflow_tasks.MODEL_NAME)
    timings["total"] = time.time() - started
    print(summary(training, nights, env, timings, tasks, logs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
