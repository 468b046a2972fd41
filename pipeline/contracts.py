"""The columns of the Parquet files others read, each defined once here.

Predictions: the key, the content hash, per task the columns below, the lineage. From this spec come the
Arrow schema scoring writes (`prediction_schema`), the Predictor's output columns (`task_columns`), the MLflow signature of the
pyfunc (pipeline.tracking.pyfunc) and the tables in docs/contracts.md (`python -m pipeline.contracts` prints them; a
test checks the page holds them). Quarantine: four string columns, written by ingest and scoring alike.
Report: the fill and disagreements files catalog teams act on (pipeline.scoring.report).

No torch here (cmaclip.config is torch-free): whatever only needs the contract reads it cheaply.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pyarrow as pa
from tabulate import tabulate

from cmaclip.config import MODALITIES

CONTRACT = "cmaclip.predictions/v1"
TASK = "<task>"  # in a per-task column's name, stands for the task's name
ARROW_TYPES = {"string": pa.string(), "float32": pa.float32(), "timestamp[us, UTC]": pa.timestamp("us", tz="UTC")}


@dataclass(frozen=True)
class Column:
    name: str
    type: str          # a key of ARROW_TYPES
    meaning: str       # the docs table's text
    nullable: bool = True

    def named(self, task: str) -> str:
        return self.name.replace(TASK, task)

    def field(self) -> pa.Field:
        return pa.field(self.name, ARROW_TYPES[self.type], self.nullable)


KEY = Column("product_id", "string", "the catalog key", nullable=False)
CONTENT_HASH = Column("content_hash", "string",
                      "what the model read: a hash of the title and the image bytes (for `image_uri`, the fetched "
                      "content), `pipeline.io.content_hash`; a row is scored again only when it changes (or the model "
                      "does)", nullable=False)
LABEL = Column(TASK, "string", "the top-1 label; null when its confidence is below the task's threshold")
TOP = Column(f"{TASK}_top", "string", "the top-1 label, always")
CONFIDENCE = Column(f"{TASK}_confidence", "float32", "softmax probability of the top-1 label")
IMAGE_WEIGHT = Column(f"{TASK}_image_weight", "float32",
                      "λ, the weight the model gave the image for this task; not input attribution "
                      "([model.md](model.md#what-λ-means-and-what-it-does-not))")
TASK_COLUMNS = (LABEL, TOP, CONFIDENCE, IMAGE_WEIGHT)
# Asked for (`explain`): what each modality contributes to the top-1 label (cmaclip.explain).
CONTRIBUTIONS = {modality: Column(
    f"{TASK}_{modality}_contribution", "float32",
    "only with `--explain` (DAG param `explain`): the top-1 label's probability minus its probability without "
    "the title (empty title) or without the image (blank image), in [-1, 1]; 3 forward passes per batch "
    "instead of 1") for modality in MODALITIES}
# A prediction carried over from the published state keeps its lineage (pipeline/scoring/carry_over.py): its
# run_id and scored_at say which run made it.
_MADE_BY = "lineage: the model and the run that scored the row (a row carried over keeps its own)"
LINEAGE = (Column("model_name", "string", _MADE_BY), Column("model_version", "string", _MADE_BY),
           Column("run_id", "string", _MADE_BY),
           Column("scored_at", "timestamp[us, UTC]", "when the shard that scored the row started"))

QUARANTINE = (Column("product_id", "string", "as normalised; null when the row has none"),
              Column("stage", "string", "`ingest` or `score`"),
              Column("reason", "string", "a code of the table below (`pipeline.reasons`)"),
              Column("detail", "string", "free text: what was wrong"))
QUARANTINE_COLUMNS = [c.name for c in QUARANTINE]
QUARANTINE_SCHEMA = pa.schema([c.field() for c in QUARANTINE])

# What catalog teams act on (pipeline.scoring.report): one row per product and task.
_REVIEWED = (Column("product_id", "string", "the catalog key (normalised)", nullable=False),
             Column("task", "string", "the attribute, a prediction column's name (`color`)", nullable=False))
_CATALOG_VALUE = Column("catalog_value", "string", "the catalog's value in the column named like the task, "
                        "cleaned as ingest cleans labels")
_PREDICTED = Column("predicted", "string", "the prediction: above the task's threshold (`<task>` is not null)")
_CONFIDENCE = Column("confidence", "float32", "its softmax probability (`<task>_confidence`)")
FILL = (*_REVIEWED, _PREDICTED, _CONFIDENCE)
DISAGREEMENTS = (*_REVIEWED, _CATALOG_VALUE, _PREDICTED, _CONFIDENCE)


def per_task(explain: bool = False) -> tuple[Column, ...]:
    return TASK_COLUMNS + (tuple(CONTRIBUTIONS.values()) if explain else ())


def prediction_columns(tasks: Sequence[str], explain: bool = False) -> list[Column]:
    """Every column of a predictions file, named for `tasks`, in file order."""
    named = [dataclasses.replace(c, name=c.named(t)) for t in tasks for c in per_task(explain)]
    return [KEY, CONTENT_HASH, *named, *LINEAGE]


def tasks_in(names: Sequence[str]) -> list[str]:
    """The tasks of a predictions or published file, from its column names: the names that have every
    per-task column of the contract next to them."""
    present = set(names)
    return [n for n in names if all(c.named(n) in present for c in TASK_COLUMNS)]


def schema_of(columns: Sequence[Column]) -> pa.Schema:
    return pa.schema([c.field() for c in columns])


def task_columns(tasks: Sequence[str], explain: bool = False) -> list[tuple[str, str]]:
    """(name, type) of every per-task prediction column, in contract order."""
    return [(c.named(t), c.type) for t in tasks for c in per_task(explain)]


def prediction_schema(tasks: Sequence[str], explain: bool = False) -> pa.Schema:
    return pa.schema([c.field() for c in prediction_columns(tasks, explain)])


def lineage_values(model_name: str, model_version: str, run_id: str, scored_at: Any) -> dict[str, Any]:
    """The lineage columns' values, the same on every row of a file."""
    return dict(zip([c.name for c in LINEAGE], (model_name, model_version, run_id, scored_at), strict=True))


def quarantine_table(rows: Iterable[tuple], metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """(product_id, stage, reason, detail) rows -> a table in QUARANTINE_SCHEMA."""
    columns = list(zip(*rows)) or [[] for _ in QUARANTINE]
    return pa.table([pa.array(c, pa.string()) for c in columns], schema=QUARANTINE_SCHEMA.with_metadata(metadata))


# --- the docs tables ------------------------------------------------------------------------------------

def _type_text(column: Column) -> str:
    return column.type if column.nullable else f"{column.type}, not null"


def markdown_table(header: str, columns: Sequence[Column]) -> str:
    """One row per column; consecutive columns of one type and meaning share a row."""
    rows: list[tuple[list[str], str, str]] = []
    for c in columns:
        if rows and rows[-1][1:] == (_type_text(c), c.meaning):
            rows[-1][0].append(c.name)
        else:
            rows.append(([c.name], _type_text(c), c.meaning))
    body = [[", ".join(f"`{n}`" for n in names), kind, meaning] for names, kind, meaning in rows]
    return tabulate(body, [header, "type", "meaning"], tablefmt="github", disable_numparse=True)


def docs_tables() -> dict[str, str]:
    """The contract tables of docs/contracts.md, by name."""
    predictions = [KEY, CONTENT_HASH, *per_task(explain=True), *LINEAGE]
    return {"predictions": markdown_table("column (`pipeline.contracts`)", predictions),
            "quarantine": markdown_table("column (`pipeline.contracts.QUARANTINE`)", QUARANTINE),
            "fill": markdown_table("`fill.parquet` (`pipeline.contracts.FILL`)", FILL),
            "disagreements": markdown_table("`disagreements.parquet` (`pipeline.contracts.DISAGREEMENTS`)",
                                            DISAGREEMENTS)}


if __name__ == "__main__":
    print("\n\n".join(docs_tables().values()))
