"""Made-up edits to a catalog: the next night's snapshot, for the demo's second night and bench/nightly.py.
Some titles edited, some images swapped for another product's, products added (new ids, another product's
title and image) and deleted. Rows are picked at random, seeded by (seed, night): the same inputs give the
same snapshot, so a rerun of the demo writes what it wrote before."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

TITLE_EDIT = "New season {night}: "   # a prefix, so a model that reads only a title's first tokens sees it too
NEW_ID = "new-{night}-{index:06d}"


@dataclass(frozen=True)
class Edits:
    """How many rows of each kind a night changes."""
    titles: int = 0
    images: int = 0
    added: int = 0
    deleted: int = 0

    @classmethod
    def share(cls, rows: int, changed: float) -> "Edits":
        """`changed` of `rows` edited (half their title, half their image), half as many added and deleted:
        the catalog keeps its size."""
        edited, churn = max(1, round(rows * changed)), max(1, round(rows * changed / 2))
        return cls(titles=edited - edited // 2, images=edited // 2, added=churn, deleted=churn)


def next_snapshot(table: pa.Table, night: int, edits: Edits, seed: int = 0,
                  pool: Sequence[int] | None = None) -> tuple[pa.Table, dict[str, list]]:
    """`table` with `edits` made, each to other rows of `pool` (row indices; default: every row), added rows
    last; and the product_ids of each kind. An image comes from another row of the pool, so it changes
    unless two products share their bytes."""
    pool = np.arange(table.num_rows) if pool is None else np.asarray(pool, dtype=np.int64)
    wanted = edits.titles + edits.images + edits.deleted
    if wanted > len(pool) or (len(pool) < 2 and edits.images + edits.added):
        raise ValueError(f"{edits} needs more rows than the {len(pool)} to pick from")
    rng = np.random.default_rng([seed, night])
    at = rng.permutation(len(pool))[:wanted]
    titled, imaged, deleted = np.split(pool[at], [edits.titles, edits.titles + edits.images])
    image_from = pool[(at[edits.titles:edits.titles + edits.images] + rng.integers(1, len(pool), edits.images))
                      % len(pool)]
    donors = pool[rng.integers(0, len(pool), edits.added)]
    ids = table.column("product_id")
    changed = {"titles": ids.take(titled).to_pylist(), "images": ids.take(imaged).to_pylist(),
               "deleted": ids.take(deleted).to_pylist(),
               "added": [NEW_ID.format(night=night, index=i) for i in range(edits.added)]}
    rows = np.arange(table.num_rows)
    rows[imaged] = image_from
    edited = _set(table, "image", table.column("image").take(rows))
    edited = _set(edited, "title", _prefixed(table.column("title"), titled, TITLE_EDIT.format(night=night)))
    added = _set(table.take(donors), "product_id", pa.array(changed["added"], ids.type))
    keep = np.ones(table.num_rows, dtype=bool)
    keep[deleted] = False
    return pa.concat_tables([edited.filter(pa.array(keep)), added]), changed


def _set(table: pa.Table, name: str, column: pa.Array | pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)


def _prefixed(titles: pa.ChunkedArray, rows: np.ndarray, prefix: str) -> pa.Array:
    """The titles with `prefix` before those at `rows`; a text or binary column keeps its type."""
    values = titles.to_pylist()
    for row in rows:
        value = values[row]
        if isinstance(value, bytes):
            values[row] = prefix.encode() + value
        else:
            values[row] = prefix + (value or "")
    return pa.array(values, titles.type)
