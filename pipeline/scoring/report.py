"""What catalog teams act on, for one finalized run against the published state it would replace: the
products whose catalog value is missing and now get a confident prediction (fill), those whose catalog
value differs from one (disagreements), and per task the abstention rate, class distribution, mean λ and
drift (population stability index over classes; share of rescored products whose label changed).

Written under `_reports/run=<id>/` before the quality gate decides (`report.json` last; `summary.md`,
`fill.parquet`, `disagreements.parquet`), and linked from the version publish makes. Built again only when
the published state or the catalog it compared with has changed since.

The fill and disagreements files are streamed within a fixed memory (`reviews`). For the figures per task,
the states are wide (columns per task); the queries (queries/report_*.sql) read them long, one row per
(product, task), through views this module builds with DuckDB's relational API, so column names are
identifiers DuckDB quotes, never text formatted into SQL. DuckDB runs within a memory limit (`sql.connect`):
the join of the new state with the previous one (report_tasks.sql) is DuckDB's, bounded by that limit, not
streamed.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from tabulate import tabulate

from ..contracts import tasks_in
from ..io import storage
from ..io.sql import connect, load_sql, scratch_root
from ..manifests import RunManifest, RunReport, TaskReport
from . import reviews, versions
from .layout import published_uri, report_uri

PSI_EPSILON = 1e-4                        # the share a class empty on one side counts as: PSI stays finite
STATE_COLUMNS = ("product_id", "task", "label", "confidence", "image_weight", "rescored")
REVIEWS = reviews.SCHEMAS
TOP_CLASSES = 5                           # classes per task the summary names


def build(out: str, manifest: RunManifest, catalog: str | None = None) -> RunReport:
    """The report of the finalized run `manifest` under `out` against the current published state, and with
    `catalog`, its fill and disagreements; written under `layout.report_uri(out, run_id)`. An existing
    report made against the same state and catalog is returned as it is."""
    previous = published_uri(out, "latest")
    previous = previous if storage.exists(previous) else None
    baseline = (versions.current_number(out), _rows(previous), catalog)
    found = _existing(out, manifest.run_id, baseline)
    if found is not None:
        return found
    with connect() as con:
        for uri in (out, catalog):
            if uri is not None:
                storage.register_duckdb(con, uri)
        tasks = _state_view(con, "new_state", manifest.predictions, manifest.run_id)
        _state_view(con, "previous_state", [previous] if previous else [], "", tasks)
        reviewed = _write_reviews(con, out, manifest, catalog, tasks) if catalog else {}
        stats = [_task_report(row, reviewed) for row in _query(con, "report_tasks").to_pylist()]
        stats = _with_classes(con, stats, _vocabulary(manifest.predictions))
    report = RunReport(run_id=manifest.run_id, model_name=manifest.model_name, model_version=manifest.model_version,
                       products=max((t.products for t in stats), default=0), baseline_version=baseline[0],
                       baseline_products=baseline[1], catalog=catalog, tasks=stats,
                       files=_files(out, manifest.run_id, bool(catalog)),
                       created_at=datetime.now(timezone.utc).isoformat())
    storage.write_text(report.files["summary"], markdown(report))
    report.write(report_uri(out, manifest.run_id, "report.json"))
    return report


def _rows(uri: str | None) -> int:
    return 0 if uri is None else storage.parquet_file(uri).metadata.num_rows


def _existing(out: str, run_id: str, baseline: tuple) -> RunReport | None:
    uri = report_uri(out, run_id, "report.json")
    if not storage.exists(uri):
        return None
    report = RunReport.read(uri)
    same = (report.baseline_version, report.baseline_products, report.catalog) == baseline
    return report if same and all(storage.exists(f) for f in report.files.values()) else None


def _files(out: str, run_id: str, reviewed: bool) -> dict[str, str]:
    names = ("summary", *REVIEWS) if reviewed else ("summary",)
    return {n: report_uri(out, run_id, "summary.md" if n == "summary" else f"{n}.parquet") for n in names}


def _query(con: Any, name: str, params: dict[str, Any] | None = None) -> pa.Table:
    return con.sql(load_sql(name), params=params).to_arrow_table()


# --- the long views -----------------------------------------------------------------------------------

def _state_view(con: Any, name: str, files: Sequence[str], run_id: str,
                tasks: Sequence[str] | None = None) -> list[str]:
    """View `name` over a wide state (prediction files, or a published latest.parquet): one row per
    (product, task) in STATE_COLUMNS, `rescored` where the row's run_id is `run_id`. Its tasks (of `tasks`,
    when given) are returned; without files or tasks the view is empty."""
    from duckdb import ColumnExpression as column, ConstantExpression as constant

    relation = con.read_parquet(list(files), union_by_name=True, hive_partitioning=False) if files else None
    found = [t for t in tasks_in(relation.columns) if tasks is None or t in tasks] if relation else []
    parts = [relation.select(column("product_id"), constant(task).alias("task"), column(task).alias("label"),
                             column(f"{task}_confidence").alias("confidence"),
                             column(f"{task}_image_weight").alias("image_weight"),
                             (column("run_id") == constant(run_id)).alias("rescored")) for task in found]
    empty = pa.table({"product_id": pa.array([], pa.string()), "task": pa.array([], pa.string()),
                      "label": pa.array([], pa.string()), "confidence": pa.array([], pa.float32()),
                      "image_weight": pa.array([], pa.float32()), "rescored": pa.array([], pa.bool_())})
    if parts:
        functools.reduce(lambda a, b: a.union(b), parts).create_view(name)
    else:  # a table, not a view: a view would scan `empty` after it is gone
        con.from_arrow(empty).create(name)
    return found


# --- the outputs ----------------------------------------------------------------------------------------

def _write_reviews(con: Any, out: str, manifest: RunManifest, catalog: str, tasks: Sequence[str]) -> dict[str, dict]:
    """fill.parquet and disagreements.parquet (`reviews`); their rows per task, by review."""
    uris = {name: report_uri(out, manifest.run_id, f"{name}.parquet") for name in REVIEWS}
    with tempfile.TemporaryDirectory(prefix="cmaclip-report-", dir=scratch_root()) as folder:
        return reviews.write(con, manifest.predictions, catalog, tasks, uris, folder)


def _task_report(row: Mapping[str, Any], reviewed: Mapping[str, Mapping[str, int]]) -> TaskReport:
    task, products, compared = row["task"], row["products"], row["compared"]
    weight = row["mean_image_weight"]
    return TaskReport(
        task=task, products=products, abstained=row["abstained"],
        abstention_rate=row["abstained"] / products if products else 0.0, classes={},
        mean_image_weight=None if weight is None else float(weight), psi=None, rescored=row["rescored"],
        compared=compared, changed=row["changed"], changed_rate=row["changed"] / compared if compared else None,
        filled=reviewed["fill"].get(task, 0) if reviewed else None,
        disagreements=reviewed["disagreements"].get(task, 0) if reviewed else None)


def _with_classes(con: Any, stats: list[TaskReport], vocabulary: Mapping[str, list[str]]) -> list[TaskReport]:
    """Each task's class distribution (every class the model knows, 0 included) and its PSI against the
    previous state's, over the published values: each class, and abstention (None), so a task that starts
    abstaining on everything drifts too."""
    counts: dict[tuple[str, str], dict[str | None, int]] = {}
    for row in _query(con, "report_classes").to_pylist():
        counts.setdefault((row["state"], row["task"]), {})[row["label"]] = row["products"]
    out = []
    for task in stats:
        new, previous = counts.get(("new", task.task), {}), counts.get(("previous", task.task), {})
        known = vocabulary.get(task.task, [])
        names = known + sorted((set(new) | set(previous)) - set(known) - {None})
        out.append(dataclasses.replace(task, classes={c: new.get(c, 0) for c in names}, psi=psi(new, previous)))
    return out


def _vocabulary(files: Sequence[str]) -> dict[str, list[str]]:
    """The model's classes per task, from the lineage in a prediction file's metadata (writer.py)."""
    if not files:
        return {}
    meta = storage.parquet_file(files[0]).schema_arrow.metadata or {}
    return json.loads(meta.get(b"cmaclip", b"{}")).get("labels", {})


def psi(new: Mapping[Any, int], previous: Mapping[Any, int], epsilon: float = PSI_EPSILON) -> float | None:
    """Population stability index of counts per value: sum over values of (p - q) ln(p / q), shares p (new)
    and q (previous) raised to `epsilon` where a value is absent. None when either side is empty."""
    n, m = sum(new.values()), sum(previous.values())
    if not n or not m:
        return None
    total = 0.0
    for c in set(new) | set(previous):
        p, q = max(new.get(c, 0) / n, epsilon), max(previous.get(c, 0) / m, epsilon)
        total += (p - q) * math.log(p / q)
    return total


def markdown(report: RunReport) -> str:
    """The short summary: one line on the run, a table per task, the most common classes, the files."""
    rescored = report.tasks[0].rescored if report.tasks else 0
    if report.baseline_products:
        version = f"version {report.baseline_version}" if report.baseline_version is not None else "unversioned"
        against = f"Drift against the published state ({version}, {report.baseline_products} products)."
    else:
        against = "Nothing was published before: no drift to measure."
    rows = [[t.task, f"{t.abstention_rate:.1%}", _number(t.mean_image_weight, ".3f"), _number(t.psi, ".3f"),
             f"{t.changed} of {t.compared}" if t.compared else "-", _number(t.filled, "d"),
             _number(t.disagreements, "d")] for t in report.tasks]
    table = tabulate(rows, ["task", "abstained", "mean λ", "PSI", "changed", "fill", "disagreements"],
                     tablefmt="github", disable_numparse=True)
    lines = [f"# Scoring run `{report.run_id}`", "",
             f"Model {report.model_name} v{report.model_version}: {report.products} products, {rescored} "
             f"scored by this run, {report.products - rescored} carried over. {against}", "", table, ""]
    lines += [f"- {t.task}: {_top_classes(t)}" for t in report.tasks]
    if report.catalog:
        lines += ["", f"Fill and disagreements against `{report.catalog}`: `{report.files['fill']}`, "
                      f"`{report.files['disagreements']}` (most confident first)."]
    return "\n".join(lines) + "\n"


def _number(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _top_classes(task: TaskReport) -> str:
    total = sum(task.classes.values())
    top = sorted(task.classes.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CLASSES]
    return ", ".join(f"{c} {n / total:.0%}" for c, n in top if n) if total else "no label above the threshold"
