"""What an ingest was asked (`IngestParams`) and how its catalog is cut into groups (`IngestPlan`).

A group is a run of consecutive row groups of the catalog files, in file order, balanced by rows: the unit
that one process or one mapped Airflow task stages (pipeline.ingest.staging) and that a retry redoes. The
plan is plain JSON (an XCom) and deterministic: the same files, params and number of groups give the same
plan and id. Rows keep their catalog-wide number (`seq`) whatever the groups, so every decision taken
after staging, and so the dataset, is the same for any number of groups.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..io import storage
from ..io.catalog import CatalogFile, fingerprint, scan
from ..io.image_sources import ImageSources, for_catalog
from ..io.images import DEFAULT_LIMITS, ImageLimits

SPLITS = ("train", "validation", "test")
RESERVED = frozenset({"product_id", "title", "image", "image_uri", "split"})
GROUP_ID = "{:05d}"
ROWS_PER_PART = 8192     # a dataset part: one split's rows, small enough that parts are written on every process


# --- parameters -------------------------------------------------------------------------------------

def check_tasks(tasks: Sequence[str] | str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip())
    if not names:
        raise ValueError("at least one task (a label column) is needed")
    for name in names:
        if name in RESERVED or name.startswith("__") or not name.isidentifier():
            raise ValueError(f"task name {name!r} is not allowed (reserved, or not an identifier)")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    return names


def check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in splits)
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, validation, test) summing to 1; got {splits}")
    return values  # type: ignore[return-value]


def split_key(product_id: str) -> str:
    """The first 48 bits of md5(product_id) as 12 hex digits: u = int(key, 16) / 2^48 places the product in
    its split, and the key orders the rows of a split (in text order, which is numeric order here)."""
    return hashlib.md5(product_id.encode("utf-8")).hexdigest()[:12]


def split_of(product_id: str, splits: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split ingest gives `product_id`."""
    return split_for_key(split_key(product_id), check_splits(splits))


def split_for_key(key: str, splits: tuple[float, float, float]) -> str:
    """train if u < train, validation if u < train + validation, else test (u = int(key, 16) / 2^48). A split
    is a range of u, so rows in key order are in split order too."""
    u = int(key, 16) / 2**48
    return "train" if u < splits[0] else "validation" if u < splits[0] + splits[1] else "test"


@dataclass(frozen=True)
class IngestParams:
    tasks: tuple[str, ...]
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_class_count: int = 5
    label_map: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    limits: ImageLimits = DEFAULT_LIMITS
    batch_rows: int = 512
    row_group_rows: int = 1024
    rows_per_part: int = ROWS_PER_PART
    sources: ImageSources | None = None   # what `image_uri` rows may read; set from the catalog's root

    @property
    def part_rows(self) -> int:
        """Rows per dataset part: whole row groups, at most `rows_per_part` (at least one group)."""
        groups = max(1, self.row_group_rows)
        return max(1, self.rows_per_part // groups) * groups

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tasks": list(self.tasks), "splits": list(self.splits),
                "sources": self.sources.as_dict() if self.sources else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IngestParams":
        return cls(tuple(d["tasks"]), tuple(d["splits"]), int(d["min_class_count"]), d["label_map"],
                   ImageLimits(**d["limits"]), int(d["batch_rows"]), int(d["row_group_rows"]),
                   int(d["rows_per_part"]), ImageSources.from_dict(d["sources"]) if d["sources"] else None)


def make_params(catalog_uri: str, tasks: Sequence[str] | str, *, splits: Sequence[float] = (0.8, 0.1, 0.1),
                min_class_count: int = 5, label_map: dict[str, dict[str, str]] | None = None,
                limits: ImageLimits = DEFAULT_LIMITS, batch_rows: int = 512, row_group_rows: int = 1024,
                rows_per_part: int = ROWS_PER_PART, image_roots: Sequence[str] | None = None,
                image_hosts: Sequence[str] | None = None) -> IngestParams:
    """Checked params; `image_roots`, `image_hosts`: what `image_uri` rows may read besides the catalog's own
    folder (default: `CMACLIP_IMAGE_ROOTS`, `CMACLIP_IMAGE_HOSTS`; see pipeline.io.image_sources)."""
    params = IngestParams(check_tasks(tasks), check_splits(splits), int(min_class_count),
                          {k: dict(v) for k, v in (label_map or {}).items()}, limits, batch_rows, row_group_rows,
                          rows_per_part, for_catalog(catalog_uri, image_roots, image_hosts, limits.max_bytes))
    unknown = set(params.label_map) - set(params.tasks)
    if unknown:
        raise ValueError(f"label_map names tasks {sorted(unknown)} that are not in {params.tasks}")
    return params


# --- the plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One row group of one catalog file, and the catalog-wide number of its first row."""
    file: int
    row_group: int
    seq: int
    rows: int


@dataclass(frozen=True)
class IngestPlan:
    catalog_uri: str
    files: tuple[CatalogFile, ...]
    row_groups: tuple[tuple[int, ...], ...]   # per file, rows per row group
    params: IngestParams
    bounds: tuple[int, ...]                   # group g holds units [bounds[g], bounds[g + 1])

    @property
    def id(self) -> str:
        text = json.dumps([self.fingerprint, self.params.to_dict(), self.bounds], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        return fingerprint(list(self.files))

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def group_ids(self) -> list[str]:
        return [GROUP_ID.format(g) for g in range(len(self.bounds) - 1)]

    def units(self) -> list[Unit]:
        return list(self._units)

    @functools.cached_property
    def _units(self) -> tuple[Unit, ...]:
        # Once per plan: a catalog has as many units as row groups, and every group is asked for its own.
        sizes = [(f, g, n) for f, groups in enumerate(self.row_groups) for g, n in enumerate(groups)]
        starts = itertools.accumulate((n for _, _, n in sizes), initial=0)
        return tuple(Unit(f, g, seq, n) for (f, g, n), seq in zip(sizes, starts))

    def group(self, group_id: str) -> list[Unit]:
        g = int(group_id) if group_id.isdigit() else -1
        if not 0 <= g < len(self.bounds) - 1 or group_id != GROUP_ID.format(g):
            raise ValueError(f"no group {group_id!r} in ingest plan {self.id} (groups {self.group_ids})")
        return list(self._units[self.bounds[g]:self.bounds[g + 1]])

    def group_rows(self, group_id: str) -> int:
        return sum(u.rows for u in self.group(group_id))

    def regrouped(self, groups: int) -> "IngestPlan":
        """The same catalog and params cut into at most `groups` groups."""
        sizes = [n for layout in self.row_groups for n in layout]
        return dataclasses.replace(self, bounds=balanced_bounds(sizes, groups))

    def to_dict(self) -> dict[str, Any]:
        return {"catalog_uri": self.catalog_uri, "files": [dataclasses.asdict(f) for f in self.files],
                "row_groups": [list(g) for g in self.row_groups], "params": self.params.to_dict(),
                "bounds": list(self.bounds), "plan_id": self.id, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IngestPlan":
        return cls(d["catalog_uri"], tuple(CatalogFile(**f) for f in d["files"]),
                   tuple(tuple(g) for g in d["row_groups"]), IngestParams.from_dict(d["params"]), tuple(d["bounds"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "IngestPlan":
        return cls.from_dict(json.loads(text))


def balanced_bounds(rows: Sequence[int], groups: int) -> tuple[int, ...]:
    """Cut units of `rows` rows into at most `groups` consecutive, non-empty runs of near-equal rows: each
    cut at the unit boundary closest to its share of the total."""
    n = min(max(1, groups), len(rows))
    cumulative = list(itertools.accumulate(rows, initial=0))
    bounds = [0]
    for k in range(1, n):
        target = cumulative[-1] * k / n
        low, high = bounds[-1] + 1, len(rows) - (n - k)
        bounds.append(min(range(low, high + 1), key=lambda i: (abs(cumulative[i] - target), i)))
    return (*bounds, len(rows))


def plan_ingest(catalog_uri: str, params: IngestParams, groups: int = 1) -> IngestPlan:
    """Check every catalog file (footers only; `CatalogError` before anything is staged) and cut its row groups
    into at most `groups` groups."""
    files = scan(catalog_uri, params.tasks)
    layouts = []
    for f in files:
        meta = storage.parquet_file(f.uri).metadata
        layouts.append(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    return IngestPlan(catalog_uri, tuple(files), tuple(layouts), params, (0,)).regrouped(groups)
