"""Cut a catalog into shards: the plan. Deterministic: the same files give the same plan, shard ids and
fingerprint. A shard is small and self-contained (JSON), so any worker can score it; the plan stores the
file layout and derives the shards, so its JSON stays one line per file however many shards there are."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator

from ..io import catalog as catalog_files
from ..io import storage
from ..io.image_sources import ImageSources, for_catalog
from . import duplicate_ids
from .layout import duplicates_uri

SHARD_ID = "{:05d}"                # a shard's id: its index in plan order (queries/score_duplicates.sql uses it too)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one file."""
    file: str
    row_group: int
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    """What one task scores. Self-contained and small, so Airflow can map over `plan.shards` as JSON."""
    id: str
    plan_id: str
    input_fingerprint: str
    image_column: str
    pieces: tuple[Piece, ...]
    sources: ImageSources
    duplicates: int                  # the plan's rows of duplicated ids (any shard): nonzero, read its own

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sources": self.sources.as_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Shard":
        return cls(d["id"], d["plan_id"], d["input_fingerprint"], d["image_column"],
                   tuple(Piece(**p) for p in d["pieces"]), ImageSources.from_dict(d["sources"]), d["duplicates"])


@dataclass(frozen=True)
class CatalogLayout:
    uri: str
    image_column: str
    row_groups: tuple[int, ...]   # rows per row group


@dataclass(frozen=True)
class Plan:
    """The shards of one input snapshot. Stores the file layout, not the shards: shards are derived from
    it, which keeps the JSON small (one line per file) however many shards there are."""
    catalog: str
    fingerprint: str
    rows_per_shard: int
    files: tuple[CatalogLayout, ...]
    sources: ImageSources            # what `image_uri` rows may read (pipeline.io.image_sources)
    duplicates: int = 0              # rows whose product_id is on another row too (pipeline.scoring.duplicate_ids)

    @property
    def id(self) -> str:
        return digest(self.fingerprint, self.rows_per_shard)[:16]

    @property
    def rows(self) -> int:
        return sum(sum(f.row_groups) for f in self.files)

    @functools.cached_property
    def _by_id(self) -> dict[str, Shard]:
        return {s.id: s for s in _cut(self)}

    @property
    def shards(self) -> list[Shard]:
        return list(self._by_id.values())

    @property
    def shard_ids(self) -> list[str]:
        return list(self._by_id)

    def shard(self, shard_id: str) -> Shard:
        if shard_id not in self._by_id:  # a user's --shard: a plain error, not a lookup traceback
            ids = self.shard_ids
            raise ValueError(f"no shard {shard_id!r} in plan {self.id}: its {len(ids)} shards of "
                             f"{self.rows_per_shard} rows are {ids[0]}..{ids[-1]}")
        return self._by_id[shard_id]

    def to_dict(self) -> dict[str, Any]:
        return {"catalog": self.catalog, "fingerprint": self.fingerprint, "rows_per_shard": self.rows_per_shard,
                "files": [[f.uri, f.image_column, list(f.row_groups)] for f in self.files],
                "sources": self.sources.as_dict(), "duplicates": self.duplicates, "plan_id": self.id,
                "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        files = tuple(CatalogLayout(uri, column, tuple(groups)) for uri, column, groups in d["files"])
        return cls(d["catalog"], d["fingerprint"], int(d["rows_per_shard"]), files,
                   ImageSources.from_dict(d["sources"]), int(d["duplicates"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def plan_shards(catalog: str, rows_per_shard: int = 10_000, image_roots: list[str] | None = None,
                image_hosts: list[str] | None = None, out: str | None = None) -> Plan:
    """Cut the catalog into shards of `rows_per_shard` rows (the last may be shorter), following file and
    row-group order. Deterministic: the same files give the same plan, shard ids and fingerprint. Reads
    footers, content versions and the product_id column (to find duplicated ids); a file-level problem raises
    `catalog.CatalogError` here, before any shard runs. `image_roots`, `image_hosts`: what `image_uri` rows
    may read besides the catalog's own folder (default: `CMACLIP_IMAGE_ROOTS`, `CMACLIP_IMAGE_HOSTS`).
    `out`: the scoring output, where the rows of duplicated ids are written for the shards to read; a
    catalog with such rows cannot be scored from a plan made without it."""
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be at least 1")
    scanned = catalog_files.scan(catalog, tasks=())
    layouts = []
    for f in scanned:
        meta = storage.parquet_file(f.uri).metadata
        layouts.append(CatalogLayout(f.uri, f.image_column,
                                     tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))))
    if len({f.image_column for f in layouts}) > 1:
        # A batch may span files, and one batch has one image column.
        raise catalog_files.CatalogError(catalog, "some files have 'image' and others 'image_uri'; use one")
    plan = Plan(catalog, catalog_files.fingerprint(scanned), rows_per_shard, tuple(layouts),
                for_catalog(catalog, image_roots, image_hosts))
    return dataclasses.replace(plan, duplicates=_find_duplicates(plan, [f.name for f in scanned], out))


def _find_duplicates(plan: Plan, names: list[str], out: str | None) -> int:
    """The rows of duplicated product_ids, written under `out` for the shards; a plan whose rows are already
    written there (same snapshot, same shards) is not scanned again."""
    target = duplicates_uri(out, plan.id) if out is not None else None
    if target is not None and storage.exists(target):
        return storage.parquet_file(target).metadata.num_rows
    files = [(f.uri, name) for f, name in zip(plan.files, names)]
    return duplicate_ids.find(files, plan.rows_per_shard, SHARD_ID, target)


def _piece_groups(plan: Plan) -> Iterator[list[Piece]]:
    """Consecutive row ranges, `rows_per_shard` rows per group, in file and row-group order."""
    pieces, taken = [], 0
    for f in plan.files:
        for group, rows in enumerate(f.row_groups):
            start = 0
            while start < rows:
                stop = min(rows, start + plan.rows_per_shard - taken)
                pieces.append(Piece(f.uri, group, start, stop))
                taken, start = taken + stop - start, stop
                if taken == plan.rows_per_shard:
                    yield pieces
                    pieces, taken = [], 0
    if pieces:
        yield pieces


def _cut(plan: Plan) -> Iterator[Shard]:
    column = plan.files[0].image_column if plan.files else "image"
    for index, pieces in enumerate(_piece_groups(plan)):
        yield Shard(SHARD_ID.format(index), plan.id, plan.fingerprint, column, tuple(pieces), plan.sources,
                    plan.duplicates)
