"""Cut a catalog into shards: the plan. Deterministic: the same files give the same plan, shard ids and
fingerprint. A shard is small and self-contained (JSON), so any worker can score it; the plan stores the
file layout and derives the shards, so its JSON stays one line per file (and a number per shard, when
predictions are carried over) however many shards there are."""
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
from . import carry_over, duplicate_ids
from .catalog_scan import scan
from .layout import carry_uri, duplicates_uri

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
    carry: int = 0                   # its rows to carry over (image_uri: candidates); nonzero, read them

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sources": self.sources.as_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Shard":
        return cls(d["id"], d["plan_id"], d["input_fingerprint"], d["image_column"],
                   tuple(Piece(**p) for p in d["pieces"]), ImageSources.from_dict(d["sources"]), d["duplicates"],
                   d.get("carry", 0))


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
    carry_basis: str = ""            # the state and model predictions are carried over from; "": none
    carry: tuple[int, ...] = ()      # per shard, rows carried over (pipeline.scoring.carry_over); (): none

    @property
    def id(self) -> str:
        """The snapshot and shard size; with predictions carried over, also where from: a plan that carries
        nothing keeps the id it had before carrying existed."""
        return digest(self.fingerprint, self.rows_per_shard, *([self.carry_basis] if self.carry_basis else []))[:16]

    @property
    def rows(self) -> int:
        return sum(sum(f.row_groups) for f in self.files)

    @property
    def image_column(self) -> str:
        return self.files[0].image_column if self.files else "image"

    def counts(self) -> dict[str, Any]:
        """What the shards will do: rows to carry over and to score (the rest; some may be quarantined), and
        whether the plan decided which (`plan`) or the shards will, after fetching images (`read`: `to_carry`
        is then an upper bound); None when nothing is carried over."""
        carry = sum(self.carry)
        decided = ("plan" if carry_over.decided_at_plan(self.image_column) else "read") if carry else None
        return {"rows": self.rows, "to_carry": carry, "to_score": self.rows - carry, "carry_decided": decided}

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
                "sources": self.sources.as_dict(), "duplicates": self.duplicates, "carry_basis": self.carry_basis,
                "carry": list(self.carry), "plan_id": self.id, **self.counts()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        files = tuple(CatalogLayout(uri, column, tuple(groups)) for uri, column, groups in d["files"])
        return cls(d["catalog"], d["fingerprint"], int(d["rows_per_shard"]), files,
                   ImageSources.from_dict(d["sources"]), int(d["duplicates"]), d.get("carry_basis", ""),
                   tuple(int(n) for n in d.get("carry", ())))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def plan_shards(catalog: str, rows_per_shard: int = 10_000, image_roots: list[str] | None = None,
                image_hosts: list[str] | None = None, out: str | None = None,
                carry_from: carry_over.Source | None = None) -> Plan:
    """Cut the catalog into shards of `rows_per_shard` rows (the last may be shorter), following file and
    row-group order. Deterministic: the same files give the same plan, shard ids and fingerprint. Reads
    footers, content versions and the product_id column (to find duplicated ids); a file-level problem raises
    `catalog.CatalogError` here, before any shard runs. `image_roots`, `image_hosts`: what `image_uri` rows
    may read besides the catalog's own folder (default: `CMACLIP_IMAGE_ROOTS`, `CMACLIP_IMAGE_HOSTS`).
    `out`: the scoring output, where the rows of duplicated ids are written for the shards to read; a
    catalog with such rows cannot be scored from a plan made without it. `carry_from`: the published state
    to carry predictions over from (`carry_over.source`; None: score every row); needs `out`."""
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be at least 1")
    if carry_from is not None and out is None:
        raise ValueError("carrying predictions over needs `out`: the shards read the rows to carry from there")
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
                for_catalog(catalog, image_roots, image_hosts),
                carry_basis=digest(*carry_from.key())[:16] if carry_from is not None else "")
    return _side_files(plan, [f.name for f in scanned], out, carry_from)


def _side_files(plan: Plan, names: list[str], out: str | None, carry_from: carry_over.Source | None) -> Plan:
    """The plan with its counts of duplicated rows and of rows to carry over, whose rows are written under
    `out` for the shards; a plan whose side files are already there (same snapshot, shards, state and model)
    is not scanned again."""
    duplicates = duplicates_uri(out, plan.id) if out is not None else None
    carried = carry_uri(out, plan.id) if carry_from is not None else None
    if duplicates is not None and all(storage.exists(u) for u in (duplicates, carried) if u is not None):
        per_shard = carry_over.counts(carried) if carried else {}
        return _counted(plan, storage.parquet_file(duplicates).metadata.num_rows, per_shard)
    at_plan = carry_over.decided_at_plan(plan.image_column)
    files = [(f.uri, name) for f, name in zip(plan.files, names)]
    with scan(files, plan.rows_per_shard, SHARD_ID, plan.image_column if carried and at_plan else None) as rows:
        per_shard = carry_over.find(rows, carry_from, at_plan, carried) if carried else {}
        return _counted(plan, duplicate_ids.find(rows, duplicates), per_shard)


def _counted(plan: Plan, duplicates: int, carry: dict[str, int]) -> Plan:
    per_shard = tuple(carry.get(shard_id, 0) for shard_id in plan.shard_ids) if carry else ()
    return dataclasses.replace(plan, duplicates=duplicates, carry=per_shard)


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
    for index, pieces in enumerate(_piece_groups(plan)):
        yield Shard(SHARD_ID.format(index), plan.id, plan.fingerprint, plan.image_column, tuple(pieces),
                    plan.sources, plan.duplicates, plan.carry[index] if plan.carry else 0)
