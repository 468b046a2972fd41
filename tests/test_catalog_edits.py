"""The made-up edits of a catalog's next snapshot (pipeline/catalog_edits.py): exactly the rows it says change
what the model reads, the rest stay as they were, and the same inputs give the same snapshot."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline import synthetic
from pipeline.catalog_edits import Edits, next_snapshot
from pipeline.io.content_hash import content_hashes

EDITS = Edits(titles=3, images=2, added=2, deleted=2)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Good rows, then the bad ones; titles binary, as the demo's catalog has them."""
    path = tmp_path_factory.mktemp("catalog") / "catalog.parquet"
    synthetic.make_catalog(30, str(path), seed=5, with_bad_rows=True)
    return pq.read_table(path)


def _good(table) -> list[int]:
    return [i for i, pid in enumerate(table.column("product_id").to_pylist()) if (pid or "").startswith("syn-")]


def _hashes(table) -> dict:
    ids = table.column("product_id").to_pylist()
    return dict(zip(ids, content_hashes(table.column("title"), table.column("image")).to_pylist()))


def test_only_the_edited_rows_change_what_the_model_reads(catalog):
    snapshot, changed = next_snapshot(catalog, 2, EDITS, seed=1, pool=_good(catalog))
    assert {k: len(v) for k, v in changed.items()} == {"titles": 3, "images": 2, "deleted": 2, "added": 2}
    assert snapshot.num_rows == catalog.num_rows and snapshot.schema == catalog.schema
    before, after = _hashes(catalog), _hashes(snapshot)
    assert set(after) == (set(before) - set(changed["deleted"])) | set(changed["added"])
    rescored = {pid for pid in before.keys() & after.keys() if before[pid] != after[pid]}
    assert rescored == set(changed["titles"]) | set(changed["images"])
    rows = {r["product_id"]: r for r in snapshot.to_pylist()}
    old = {r["product_id"]: r for r in catalog.to_pylist()}
    assert all(rows[p]["title"].startswith(b"New season 2: ") and rows[p]["image"] == old[p]["image"]
               for p in changed["titles"])
    assert all(rows[p]["title"] == old[p]["title"] for p in changed["images"])


def test_the_pool_bounds_which_rows_change(catalog):
    good = set(_good(catalog))
    _, changed = next_snapshot(catalog, 2, EDITS, seed=1, pool=sorted(good))
    ids = catalog.column("product_id").to_pylist()
    allowed = {ids[i] for i in good}
    assert set(changed["titles"] + changed["images"] + changed["deleted"]) <= allowed
    assert len(set(changed["titles"] + changed["images"] + changed["deleted"])) == 7  # no row edited twice


def test_the_same_night_gives_the_same_snapshot_and_another_night_another(catalog):
    first, _ = next_snapshot(catalog, 2, EDITS, seed=1, pool=_good(catalog))
    again, _ = next_snapshot(catalog, 2, EDITS, seed=1, pool=_good(catalog))
    later, _ = next_snapshot(catalog, 3, EDITS, seed=1, pool=_good(catalog))
    assert first.equals(again) and not first.equals(later)


def test_a_share_keeps_the_catalog_size():
    assert Edits.share(20_193, 0.01) == Edits(titles=101, images=101, added=101, deleted=101)
    assert Edits.share(100, 0.001) == Edits(titles=1, images=0, added=1, deleted=1)


def test_more_edits_than_rows_is_refused(catalog):
    with pytest.raises(ValueError, match="more rows"):
        next_snapshot(catalog, 2, Edits(titles=5, deleted=5), pool=range(8))
