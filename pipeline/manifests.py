"""The JSON documents the pipeline writes and reads back, as typed records: a staged group's done marker
and the dataset manifest (ingest), a shard's done marker and the run manifest (scoring), a run's report and
a published version (publish).

Writers build the record and `write` it; readers `read` it, which checks every field the record declares
(present, of its type) and fails naming the file and the field: a malformed marker is a `ManifestError`,
never a KeyError three calls later. Keys the record does not declare are ignored, and a field added after
stores were first written has a default, so files from earlier versions still read. The JSON keys are the
field names: the on-disk format is the records' `to_dict`.
"""
from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from .io import storage
from .io.catalog import CatalogFile

R = TypeVar("R", bound="Record")
_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


class ManifestError(ValueError):
    """A JSON document that does not match its record; `source` is the file, `field` the dotted path."""

    def __init__(self, source: str, field: str, problem: str):
        super().__init__(f"{source}: field {field!r} {problem}" if field else f"{source}: {problem}")
        self.source, self.field = source, field


class Record:
    """Base of the records below (dataclasses): JSON in and out, checked on the way in."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[R], data: Any, source: str = "<dict>") -> R:
        return _record(cls, data, source, "")

    @classmethod
    def read(cls: type[R], uri: str) -> R:
        try:
            data = json.loads(storage.read_bytes(uri))
        except json.JSONDecodeError as exc:
            raise ManifestError(uri, "", f"is not JSON ({exc})") from exc
        return cls.from_dict(data, uri)

    def write(self, uri: str) -> None:
        storage.write_json(uri, self.to_dict())


def _record(cls: type[R], data: Any, source: str, where: str) -> R:
    if not isinstance(data, dict):
        raise ManifestError(source, where, f"is {_kind(data)}, expected an object")
    hints, values = get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], source, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(source, path, "is missing")
    return cls(**values)


def _value(hint: Any, value: Any, source: str, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _record(hint, value, source, where)
    if origin in (Union, types.UnionType):  # only `X | None`
        return None if value is None else _value(next(a for a in args if a is not type(None)), value, source, where)
    if origin is list:
        _expect(isinstance(value, list), value, "a list", source, where)
        return [_value(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _expect(isinstance(value, dict), value, "an object", source, where)
        return {k: _value(args[1], v, source, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    allowed = (int, float) if hint is float else hint  # JSON writes 2.0 as 2
    _expect(isinstance(value, allowed) and (hint is bool or not isinstance(value, bool)), value, _KINDS[hint],
            source, where)
    return value


def _expect(ok: bool, value: Any, expected: str, source: str, where: str) -> None:
    if not ok:
        raise ManifestError(source, where, f"is {_kind(value)}, expected {expected}")


def _kind(value: Any) -> str:
    names = {**_KINDS, type(None): "null", bool: "a boolean", dict: "an object", list: "a list"}
    return names.get(type(value), type(value).__name__)


# --- ingest: the dataset manifest (pipeline.ingest.dataset) -------------------------------------------------

@dataclass(frozen=True)
class DatasetPart(Record):
    path: str            # relative to the dataset folder
    rows: int


@dataclass(frozen=True)
class DatasetInput(Record):
    fingerprint: str     # sha256 of the files' names, sizes and content versions (pipeline.io.catalog)
    files: list[CatalogFile]


@dataclass(frozen=True)
class DatasetCounts(Record):
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    quarantined_by_reason: dict[str, int]
    rows_by_split: dict[str, int]
    images_converted: int
    labels_missing: dict[str, int]
    labels_masked_rare: dict[str, dict[str, int]]


@dataclass(frozen=True)
class DatasetFiles(Record):
    dataset: dict[str, list[DatasetPart]]   # split -> parts
    labels: str
    quarantine: str


@dataclass(frozen=True)
class IngestRun(Record):
    """The only part that differs between two identical ingests."""
    created_at: str
    seconds: float
    rows_per_s: float
    workers: int


@dataclass(frozen=True, kw_only=True)
class StagedGroup(Record):
    """A staged group of an ingest plan's row pass (pipeline.ingest.staging), written last: the group counts as
    staged only once this exists, and a retry redoes only the groups without one. rows_in = staged +
    quarantined."""
    plan_id: str
    group: str
    rows_in: int
    staged: int                      # rows that passed validation (duplicates are decided later)
    quarantined: int
    reasons: dict[str, int]          # quarantine reason code -> rows
    images_converted: int
    rows: str                        # URI: the staged rows, in dataset order
    quarantine: str                  # URI: the quarantined rows, in catalog order
    seconds: float


@dataclass(frozen=True)
class DatasetManifest(Record):
    format: str
    catalog_uri: str
    input: DatasetInput
    params: dict[str, Any]                  # what ingest was asked (tasks, splits, limits, ...): a record
    counts: DatasetCounts
    vocabularies: dict[str, list[str]]      # task -> class names; the index is the class id
    files: DatasetFiles
    image_policy: str
    run: IngestRun


# --- scoring: a shard's done marker and the run manifest (pipeline.scoring) -------------------------------

@dataclass(frozen=True, kw_only=True)
class ShardLineage(Record):
    """Which model scored which shard of which plan, in which run: in the shard's marker and, with the
    labels and thresholds, in its Parquet files' metadata."""
    model_name: str
    model_version: str
    model_source: str = ""
    run_id: str
    plan_id: str
    shard: str
    input_fingerprint: str
    precision: str | None = None
    explain: bool = False

    def work(self) -> tuple:
        """What a committed shard must match to be reused: plan, shard, model and columns."""
        return self.plan_id, self.shard, self.model_name, self.model_version, self.explain


@dataclass(frozen=True, kw_only=True)
class ShardTimings(Record):
    total_s: float
    forward_s: float
    wait_s: float
    rows_per_s: float


@dataclass(frozen=True, kw_only=True)
class ShardMarker(ShardLineage):
    """Written last: the shard counts as done only once this exists. predicted = scored + carried (over from the
    published state); `scored` is None in markers from before carrying existed, when every row was scored."""
    rows_in: int
    predicted: int
    scored: int | None = None
    carried: int = 0
    quarantined: int
    reasons: dict[str, int]          # quarantine reason code -> rows
    predictions: str                 # URI
    quarantine: str | None = None    # URI; None when no row was quarantined
    batch_size: int
    workers: int
    scored_at: str
    timings: ShardTimings


@dataclass(frozen=True, kw_only=True)
class RunManifest(Record):
    """Written by finalize once every shard reconciles: only runs with one are published. predicted = scored +
    carried, as in the markers."""
    contract: str
    run_id: str
    plan_id: str
    catalog: str
    input_fingerprint: str
    rows_per_shard: int
    shards: int
    model_name: str
    model_version: str
    model_source: str = ""
    precision: str | None = None
    explain: bool = False
    rows_in: int
    predicted: int
    scored: int | None = None
    carried: int = 0
    quarantined: int
    reasons: dict[str, int]
    predictions: list[str]
    quarantine: list[str]
    scoring_seconds: float
    finalized_at: str


# --- publish: a run's report and a published version (pipeline.scoring.report, .publish, .versions) -------

@dataclass(frozen=True, kw_only=True)
class TaskReport(Record):
    """One task of a run's report: what the new state says and how far it moved from the published one."""
    task: str
    products: int                    # products of the new state
    abstained: int                   # of which the label is null (top-1 below the task's threshold)
    abstention_rate: float
    classes: dict[str, int]          # label -> products; every class the model knows, 0 included
    mean_image_weight: float | None  # mean λ (`<task>_image_weight`)
    psi: float | None                # population stability index of the values (classes, abstention) against
                                     # the previous state's; None when either state is empty
    rescored: int                    # products this run scored (the others were carried over)
    compared: int                    # rescored products the previous state has too
    changed: int                     # of which the label differs from the previous state's
    changed_rate: float | None       # changed / compared
    filled: int | None               # fill rows; None without a catalog
    disagreements: int | None        # disagreement rows; None without a catalog


@dataclass(frozen=True, kw_only=True)
class RunReport(Record):
    """Written before the gate decides: a run against the published state it would replace."""
    run_id: str
    model_name: str
    model_version: str
    products: int
    baseline_version: int | None     # the published version compared against (None: none, or unversioned)
    baseline_products: int           # rows of that previous state (0: nothing was published)
    catalog: str | None              # the catalog fill and disagreements read; None when not given
    tasks: list[TaskReport]
    files: dict[str, str]            # summary, fill, disagreements -> URI
    created_at: str


@dataclass(frozen=True, kw_only=True)
class PublishedVersion(Record):
    """`published/versions/v=<n>/version.json`, written last: the version exists once this does."""
    version: int
    run_id: str
    model_name: str
    model_version: str
    rows: int                        # products in latest.parquet
    files: list[str]                 # the published tables this version has: latest, and catalog when given
    catalog: str | None              # the catalog catalog.parquet joined
    catalog_rows: int | None
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # catalog columns renamed in catalog.parquet
    previous: int | None             # the version that was current when this one was published
    report: str                      # the run's report.json
    gate_passed: bool | None         # None: published without the gate
    gate_exceeded: list[str]
    forced: bool                     # published although the gate failed
    created_at: str
