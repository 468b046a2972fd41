"""The published tables as streams (pipeline/scoring/published_tables.py): sorted runs so small and tables so
short that every sort merges several runs and every run of one id, and every match with the state, spans
tables. No model: the prediction files are written directly (tests/publish_support.py)."""
from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.sql import connect, load_sql
from pipeline.scoring import publish, published_tables, report
from publish_support import START, catalog, finalized_run, prediction


@pytest.fixture(autouse=True)
def small_sorts(monkeypatch):
    monkeypatch.setattr(published_tables, "RUN_BYTES", 600)
    monkeypatch.setattr(published_tables, "CHUNK_ROWS", 3)


def _latest(files: list[str], folder: str) -> pa.Table:
    with connect() as con:
        reader = con.sql(load_sql("publish_predictions"), params={"predictions": files}).to_arrow_reader(4)
        return published_tables.latest(reader, folder).read_all()


def test_the_state_is_sorted_and_keeps_the_newest_prediction_of_a_product(tmp_path):
    ids = [f"p{i:02d}" for i in range(40)][::-1]
    rows = [prediction(p, "night-1") for p in ids]
    rows += [prediction("p07", "night-1", color="red") | {"scored_at": START + timedelta(hours=1)},
             prediction("p07", "night-1", color="green"), prediction("p20", "night-1", color="green")]
    manifest = finalized_run(tmp_path / "out", "night-1", rows, shards=3)
    state = _latest(manifest.predictions, str(tmp_path))
    assert state.column("product_id").to_pylist() == sorted(ids)
    colors = dict(zip(state.column("product_id").to_pylist(), state.column("color").to_pylist()))
    assert colors["p07"] == "red"                                # the newest scored_at
    # A tie of scored_at: the later file wins, shard 1's first p20 (row 19 of 43) over shard 0's green (row 42).
    assert colors["p20"] == "blue"
    assert not {n for n in state.column_names if n.startswith("__cmaclip")}
    # Publish refuses such a run: two predictions of a product are not published.
    with pytest.raises(RuntimeError, match="hold 43 rows but 40 products"):
        publish.publish(str(tmp_path / "out"))


def test_an_empty_run_publishes_an_empty_state_and_a_catalog_without_predictions(tmp_path):
    out = tmp_path / "out"
    finalized_run(out, "night-1", [], quarantined=3)
    latest = pq.read_table(publish.publish(str(out))["latest"])
    assert latest.num_rows == 0 and "color_confidence" in latest.column_names
    products = catalog(tmp_path / "catalog.parquet", [{"product_id": p, "color": "blue"} for p in "cab"])
    view = str(tmp_path / "view.parquet")
    with connect() as con:  # the view alone: the report of an empty run against a catalog is another matter
        publish._publish_catalog(con, products, str(out / "published/latest.parquet"), view, {}, str(tmp_path))
    view = pq.read_table(view)
    assert view.column("product_id").to_pylist() == ["a", "b", "c"]
    assert view.column("predicted_color").null_count == 3 and "predicted_product_id" not in view.column_names


def test_the_catalog_view_matches_by_key_nulls_duplicates_and_orders_by_the_catalogs_id(tmp_path):
    out = tmp_path / "out"
    scored = [f"id {i:02d}" for i in range(30)]                # ids with an inner space
    finalized_run(out, "night-1", [prediction(p, "night-1", color="green", color_confidence=0.5 + i / 100)
                                   for i, p in enumerate(scored)], shards=2)
    rows = [{"product_id": f" {p}\u3000" if i % 3 == 0 else p, "predicted_color": f"mine-{i}"}
            for i, p in enumerate(scored) if i % 4]               # a subset; some ids padded
    rows += [{"product_id": "id 04", "predicted_color": "copy"}, {"product_id": " id 04", "predicted_color": "copy"},
             {"product_id": "twice", "predicted_color": "x"}, {"product_id": "twice", "predicted_color": "y"},
             {"product_id": None, "predicted_color": "no id"}, {"product_id": "  ", "predicted_color": "blank"},
             {"product_id": "never scored", "predicted_color": "z"}]
    products = catalog(tmp_path / "catalog.parquet", rows[::-1])

    summary = publish.publish(str(out), products)
    assert summary["renamed"] == {"predicted_color": "catalog_predicted_color"}
    view = pq.read_table(summary["catalog"])
    assert view.num_rows == len(rows) and len(set(view.column_names)) == len(view.column_names)
    raw = view.column("product_id").to_pylist()
    assert raw == sorted(r for r in raw if r is not None) + [None]            # the catalog's ids; nulls last
    confidence = {p: 0.5 + i / 100 for i, p in enumerate(scored)}
    for row in view.to_pylist():
        key = None if row["product_id"] is None else row["product_id"].strip()
        if key in confidence and key != "id 04":                 # the only row of its id, scored
            assert (row["predicted_color"], row["predicted_run_id"]) == ("green", "night-1"), row
            assert row["predicted_color_confidence"] == pytest.approx(confidence[key])
        else:                    # a duplicated id, no id, a blank one, or one the run did not score
            assert row["predicted_color"] is None and row["predicted_run_id"] is None, row
    mine = {r["catalog_predicted_color"] for r in view.to_pylist()}
    assert {"copy", "x", "y", "no id", "blank", "z"} <= mine          # the catalog's column, renamed


def test_fill_and_disagreements_span_sorted_runs_in_their_order(tmp_path):
    """The report's files for review (pipeline/scoring/reviews.py) from sorts of many runs: the rows and the
    order a whole-table sort gives."""
    out = tmp_path / "out"
    colors = ["blue", "green", "red"]
    rows = [prediction(f"p{i:02d}", "night-1", color=colors[i % 3], color_confidence=round(0.5 + (i * 7 % 40) / 100, 2),
                       style=None if i % 5 == 0 else "formal", style_confidence=0.6) for i in range(40)]
    finalized_run(out, "night-1", rows, shards=3)
    values = [{"product_id": f" p{i:02d}", "color": [None, "blue", "red", " "][i % 4]} for i in range(40)]
    values += [{"product_id": "p39", "color": None}]             # p39 twice: left out
    products = catalog(tmp_path / "catalog.parquet", values[::-1])
    made = report.build(str(out), publish.run_manifest(str(out)), products)

    catalog_color = {f"p{i:02d}": [None, "blue", "red", None][i % 4] for i in range(39)}
    by_id = {r["product_id"]: r for r in rows if r["product_id"] in catalog_color}
    fill = [(p, "color", r["color"], r["color_confidence"]) for p, r in by_id.items() if catalog_color[p] is None]
    fill += [(p, "style", r["style"], 0.6) for p, r in by_id.items() if r["style"] is not None]
    fill.sort(key=lambda f: (f[1], -f[3], f[0]))
    differ = [(p, "color", catalog_color[p], r["color"], r["color_confidence"]) for p, r in by_id.items()
              if catalog_color[p] not in (None, r["color"])]
    differ.sort(key=lambda d: (-d[4], d[1], d[0]))
    got = pq.read_table(made.files["fill"]).to_pylist()
    assert [(r["product_id"], r["task"], r["predicted"]) for r in got] == [f[:3] for f in fill]
    assert [r["confidence"] for r in got] == pytest.approx([f[3] for f in fill])
    got = pq.read_table(made.files["disagreements"]).to_pylist()
    assert [(r["product_id"], r["task"], r["catalog_value"], r["predicted"]) for r in got] == [d[:4] for d in differ]
    tasks = {t.task: t for t in made.tasks}
    assert (tasks["color"].filled, tasks["color"].disagreements) == (sum(f[1] == "color" for f in fill), len(differ))


def test_publish_allocates_from_a_pool_that_returns_freed_memory_and_restores_the_default():
    from pipeline.io.allocator import returning_freed_memory

    before = pa.default_memory_pool().backend_name
    with pytest.raises(RuntimeError, match="inside"):
        with returning_freed_memory():
            assert pa.default_memory_pool().backend_name in ("jemalloc", "system")
            raise RuntimeError("inside")
    assert pa.default_memory_pool().backend_name == before
