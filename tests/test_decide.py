"""Ingest's streaming decisions (pipeline.ingest.decide) on the merge's edge cases: a product staged in every
group, more groups than the merge's fan-in (merged in passes), a group with no good row, no good row at all."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import reasons
from pipeline.ingest import staging
from pipeline.ingest.dataset import staged_groups
from pipeline.ingest.decide import ORDER_SCHEMA, Decisions, decide, write_quarantine
from pipeline.ingest.plan import make_params, plan_ingest
from pipeline.synthetic import make_catalog

TASKS = "color,pattern,style"
ROW_GROUP = 20
GROUPS = 9


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    path = tmp_path_factory.mktemp("decide") / "base.parquet"
    make_catalog(GROUPS * (ROW_GROUP - 1), str(path), seed=5)
    return pq.read_table(path)


def _catalog(table: pa.Table, path: Path) -> str:
    pq.write_table(table, path, row_group_size=ROW_GROUP)
    return str(path)


def _spread(base: pa.Table) -> pa.Table:
    """Each row group: its own products and one copy of the first product (retitled in every other group, one
    title for all: whichever title wins, some copies are exact), so that product is staged in every group; the fourth row group's images are all unreadable (no good row)."""
    chunks = []
    for g in range(GROUPS):
        chunk = base.slice(g * (ROW_GROUP - 1), ROW_GROUP - 1)
        copy = base.slice(0, 1)
        if g % 2:
            copy = copy.set_column(copy.schema.get_field_index("title"), "title", pa.array(["retitled copy"]))
        chunk = pa.concat_tables([chunk, copy]) if g else pa.concat_tables([chunk.slice(0, 1), copy, chunk.slice(1)])
        if g == 3:
            chunk = _unreadable(chunk)
        chunks.append(chunk)
    return pa.concat_tables(chunks)


def _unreadable(table: pa.Table) -> pa.Table:
    images = pa.array([b"not an image"] * table.num_rows, table.schema.field("image").type)
    return table.set_column(table.schema.get_field_index("image"), "image", images)


def _decided(catalog: str, folder: Path, fan_in: int) -> tuple[Decisions, pa.Table, pa.Table, list]:
    plan = plan_ingest(catalog, make_params(catalog, TASKS, min_class_count=1), groups=GROUPS)
    assert len(plan.group_ids) == GROUPS
    for group in plan.group_ids:
        staging.stage_group(plan, group, str(folder / "staging"))
    markers = staged_groups(plan, str(folder / "staging"))
    scratch = folder / f"scratch-{fan_in}"
    scratch.mkdir()
    order, quarantine = str(scratch / "order.parquet"), str(folder / f"quarantine-{fan_in}.parquet")
    decisions = decide(markers, plan.params, str(scratch), order, fan_in)
    write_quarantine(markers, str(scratch), quarantine)
    order_table = pq.read_table(order)
    os.remove(order)
    assert not os.listdir(scratch)  # the merge's passes and the spilled duplicates are removed once read
    return decisions, order_table, pq.read_table(quarantine), markers


def test_passes_of_two_decide_as_one_merge(base: pa.Table, tmp_path: Path) -> None:
    catalog = _catalog(_spread(base), tmp_path / "catalog.parquet")
    one = _decided(catalog, tmp_path, fan_in=64)
    passes = _decided(catalog, tmp_path, fan_in=2)
    assert one[0] == passes[0] and one[1].equals(passes[1]) and one[2].equals(passes[2])
    decisions, order, quarantine, markers = passes

    staged = pa.concat_tables(pq.read_table(m.rows).append_column("row", pa.array(range(m.staged), pa.int64()))
                              for m in markers)
    assert staged.num_rows == (GROUPS - 1) * ROW_GROUP and pq.read_table(markers[3].rows).num_rows == 0
    copies = staged.filter(pc.equal(staged["product_id"], base["product_id"][0])).to_pylist()
    assert len(copies) == GROUPS  # the original and a copy in each group but the unreadable one
    kept = min(copies, key=lambda r: (r["__content_hash"], r["__seq"]))
    lost = sorted((r for r in copies if r is not kept), key=lambda r: r["__seq"])
    assert decisions.duplicates == len(lost) and sum(decisions.by_split.values()) == staged.num_rows - len(lost)
    duplicates = quarantine.filter(pc.equal(quarantine["reason"], reasons.DUPLICATE_ID)).to_pylist()
    kept_as = f"another row with this id was kept (content hash {kept['__content_hash'][:12]}); this one differs in: "
    assert [r["detail"] for r in duplicates] == [kept_as + ("title" if r["title"] != kept["title"] else
                                                            "nothing (exact copy)") for r in lost]
    assert [r["product_id"] for r in duplicates] == [r["product_id"] for r in lost]
    assert {r["detail"].split(": ")[-1] for r in duplicates} == {"title", "nothing (exact copy)"}

    # the order file: every kept row once, split by split and in dataset order within each
    assert order.schema == ORDER_SCHEMA
    placed = [(g, r) for g, r in zip(order["grp"].to_pylist(), order["row"].to_pylist())]
    where = {(r["__group"], r["row"]): r for r in staged.to_pylist()}
    rows = [where[p] for p in placed]
    assert len(set(placed)) == len(placed) and (kept["__group"], kept["row"]) in placed
    assert [r["__key"] for r in rows] == sorted(r["__key"] for r in rows)
    assert order["split"].to_pylist() == [r["split"] for r in rows]
    assert quarantine.num_rows == ROW_GROUP + len(lost)  # the unreadable group and the duplicates


def test_nothing_kept(base: pa.Table, tmp_path: Path) -> None:
    catalog = _catalog(_unreadable(base), tmp_path / "catalog.parquet")
    decisions, order, quarantine, markers = _decided(catalog, tmp_path, fan_in=2)
    assert decisions.by_split == {"train": 0, "validation": 0, "test": 0} and decisions.duplicates == 0
    assert decisions.stats.vocabularies == {t: [] for t in TASKS.split(",")}
    assert order.num_rows == 0 and order.schema == ORDER_SCHEMA
    assert quarantine["product_id"].to_pylist() == base["product_id"].to_pylist()
    assert set(quarantine["reason"].to_pylist()) == {reasons.IMAGE_UNDECODABLE}
