"""Incremental scoring (pipeline/scoring/carry_over.py): a night scores only the products that are new, whose
title or image changed, or whose model changed; every other product carries its published prediction over,
and the run equals a full rescore row for row."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import contracts, reasons, synthetic
from pipeline.io.content_hash import content_hash, content_hashes
from pipeline.manifests import ShardMarker
from pipeline.scoring import carry_over, distributor, finalize, planner, publish
from pipeline.scoring.predictor import Predictor

TASKS = {"color": list(synthetic.COLORS), "pattern": list(synthetic.PATTERNS), "style": list(synthetic.STYLES)}
SHARD_ROWS, BATCH = 25, 8
LINEAGE = ["run_id", "scored_at"]   # what differs between two runs that predicted the same


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _score(catalog, model, out, **kw) -> dict:
    # fp32: only it is batch-invariant on a CPU. `auto` picks int8 where bf16 is not native (AVX2-only) and bf16
    # where it is; both move a row's outputs with the rows batched beside it, up to 1e-3 here.
    kw.setdefault("precision", "fp32")
    return distributor.score(str(catalog), model, str(out), rows_per_shard=SHARD_ROWS, batch_size=BATCH, workers=0,
                             progress=False, **kw)


def _predictions(summary: dict) -> pa.Table:
    manifest = json.loads(Path(summary["manifest"]).read_text())
    return pq.read_table(manifest["predictions"], partitioning=None).sort_by("product_id")


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {r["product_id"]: r for r in table.to_pylist()}


def _next_night(first: Path, second: Path) -> dict[str, str]:
    """The first night's catalog with a title changed, an image changed, a product deleted, one added, and an
    unchanged product put on a second row (its id is now duplicated); which product got which."""
    rows = pq.read_table(first).to_pylist()
    good = [r for r in rows if r["product_id"] and r["product_id"].startswith("syn-")]
    changes = {"title": good[3]["product_id"], "image": good[30]["product_id"], "deleted": good[10]["product_id"],
               "duplicated": good[40]["product_id"], "added": "new-0"}
    for r in rows:
        if r["product_id"] == changes["title"]:
            r["title"] = r["title"] + b" (new season)"
        if r["product_id"] == changes["image"]:
            r["image"] = synthetic.make_row(99, 0)["image"]
    rows = [r for r in rows if r["product_id"] != changes["deleted"]]
    rows.insert(20, dict(next(r for r in rows if r["product_id"] == changes["duplicated"])))
    added = {k: v.encode() if isinstance(v, str) else v for k, v in synthetic.make_row(77, 0).items()}
    rows.append(added | {"product_id": "new-0"})
    second.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(first)), second, row_group_size=16)
    return changes


@pytest.fixture(scope="module")
def nights(checkpoint, tmp_path_factory) -> dict:
    """Night 1: a full run over good and bad rows, published. Night 2: the changed catalog, incrementally."""
    root = tmp_path_factory.mktemp("nights")
    first, second, out = root / "n1" / "catalog.parquet", root / "n2" / "catalog.parquet", root / "out"
    synthetic.make_catalog(60, str(first), seed=3, with_bad_rows=True)
    night1 = _score(first, checkpoint, out)
    publish.publish(str(out))
    changes = _next_night(first, second)
    night2 = _score(second, checkpoint, out)
    return {"first": first, "second": second, "out": out, "night1": night1, "night2": night2, "changes": changes}


def _copy(nights, folder: Path) -> Path:
    """The nights' output folder, for a test that adds runs or publishes: the others see only the two nights."""
    shutil.copytree(nights["out"], folder)
    return folder


@pytest.fixture(scope="module")
def full_rescore(nights, checkpoint, tmp_path_factory) -> dict:
    """`cmaclip score --full` over the second night's catalog, beside the nights' state; its printed summary."""
    import contextlib
    import io

    from pipeline import cli

    out, printed = _copy(nights, tmp_path_factory.mktemp("full") / "out"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["score", "--catalog", str(nights["second"]), "--model", checkpoint, "--out", str(out),
                         "--rows-per-shard", str(SHARD_ROWS), "--batch-size", str(BATCH), "--workers", "0",
                         "--precision", "fp32", "--full", "--all"]) == 0
    return json.loads(printed.getvalue())


# --- which rows are scored ---------------------------------------------------------------------------------

def test_only_new_and_changed_products_are_scored(nights):
    night1, night2, changes = nights["night1"], nights["night2"], nights["changes"]
    rows = pq.read_metadata(nights["second"]).num_rows
    assert night2["run_id"] != night1["run_id"] and night2["rows_in"] == rows
    # Rescored: the changed title, the changed image, the new product. Quarantined as before, plus both rows
    # of the id that is now on two rows; carried over: every other product of night 1.
    assert night2["scored"] == 3 and night2["quarantined"] == night1["quarantined"] + 2
    assert night2["carried"] == night1["predicted"] - 4 == night2["predicted"] - 3
    assert night2["plan"] == {"rows": rows, "to_carry": night2["carried"], "to_score": rows - night2["carried"],
                              "carry_decided": "plan"}
    before, after = _by_id(_predictions(night1)), _by_id(_predictions(night2))
    rescored = {changes["title"], changes["image"], changes["added"]}
    assert set(after) == set(before) - {changes["deleted"], changes["duplicated"]} | {changes["added"]}
    for product_id, row in after.items():
        if product_id in rescored:
            assert row["run_id"] == night2["run_id"], product_id
        else:  # carried over as it was, lineage included
            assert row == before[product_id], product_id
    for what in ("title", "image"):
        assert after[changes[what]]["content_hash"] != before[changes[what]]["content_hash"]
    quarantine = pq.read_table(json.loads(Path(night2["manifest"]).read_text())["quarantine"], partitioning=None)
    duplicated = [q for q in quarantine.to_pylist() if q["product_id"] == changes["duplicated"]]
    assert [q["reason"] for q in duplicated] == [reasons.DUPLICATE_ID] * 2


@pytest.mark.parametrize("workers", [0, 2])
def test_rows_to_score_are_forwarded_in_full_batches_across_carried_rows(checkpoint, tmp_path, workers):
    """A night's few rows to score lie one or two per read slice among carried ones; they are gathered into
    batches of `batch_size` (a forward call costs the same for 1 row as for many), and every row still
    comes out once: scored, carried or quarantined. Each worker re-batches its own slices: its last batch
    may be short."""
    from pipeline.scoring import duplicate_ids, layout, reader

    catalog, out, batch = str(tmp_path / "catalog.parquet"), str(tmp_path / "out"), 4
    synthetic.make_catalog(60, catalog, seed=3, with_bad_rows=True)
    shard = planner.plan_shards(catalog, 1000, out=out).shards[0]
    table = pq.read_table(catalog)
    ids = table.column("product_id").to_pylist()
    good = [i for i, p in enumerate(ids) if p and p.startswith("syn-")]
    scorable_bad = {f"bad-{k}" for k, r in synthetic.BAD_ROWS.items() if r in (None, reasons.LABEL_NOT_TEXT)}
    to_score = sorted(good[::3] + [i for i, p in enumerate(ids) if p in scorable_bad])
    carry = {(shard.pieces[0].file, i): content_hash(table["title"][i].as_py(), table["image"][i].as_py())
             for i in set(good) - set(to_score)}
    duplicates = duplicate_ids.for_shard(layout.duplicates_uri(out, shard.plan_id), shard.id)
    pre = Predictor.from_checkpoint(checkpoint).preprocessor
    batches = list(reader.batch_loader(shard, pre, batch, workers, duplicates=duplicates, carry=carry))
    sizes = [b.pixels.shape[0] for b in batches]
    assert len(to_score) > 2 * batch * max(workers, 1) and sum(sizes) == len(to_score)
    assert sum(n not in (0, batch) for n in sizes) <= max(workers, 1)
    assert sizes.count(batch) >= len(to_score) // batch - (max(workers, 1) - 1)  # as if nothing lay between
    scored = [p for b in batches for p in b.product_ids]
    assert sorted(scored) == sorted(ids[i] for i in to_score)
    if not workers:  # one worker: in catalog order
        assert scored == [ids[i] for i in to_score]
    assert sorted(p for b in batches for p in b.carried) == sorted(ids[row] for _, row in carry)
    quarantined = sum(len(b.quarantine) for b in batches)
    assert quarantined == shard.rows - len(good) - len(scorable_bad) > 0
    assert sum(b.rows_in for b in batches) == shard.rows == len(scored) + len(carry) + quarantined


def test_markers_and_manifest_count_scored_and_carried_rows_as_planned(nights, checkpoint, tmp_path):
    night2 = nights["night2"]
    manifest = json.loads(Path(night2["manifest"]).read_text())
    assert (manifest["scored"], manifest["carried"]) == (night2["scored"], night2["carried"])
    assert manifest["rows_in"] == manifest["scored"] + manifest["carried"] + manifest["quarantined"]
    plan = _plan(nights, checkpoint)
    assert plan.id == night2["plan_id"] and planner.Plan.from_json(plan.to_json()) == plan
    assert sum(plan.carry) == night2["carried"] and len(plan.carry) == len(plan.shards)
    markers = {s.id: ShardMarker.read(str(p)) for s, p in zip(plan.shards, _markers(nights["out"], night2))}
    assert {i: m.carried for i, m in markers.items()} == {s.id: s.carry for s in plan.shards}
    assert all(m.predicted == m.scored + m.carried for m in markers.values())
    # finalize holds a shard to the plan's carried rows.
    out = _copy(nights, tmp_path / "out")
    (out / "_manifests" / f"run={night2['run_id']}.json").unlink()
    marker = _markers(out, night2)[0]
    doc = json.loads(marker.read_text())
    marker.write_text(json.dumps(doc | {"carried": doc["carried"] - 1, "scored": doc["scored"] + 1}))
    with pytest.raises(finalize.RunIncomplete, match=r"shard 00000: \d+ rows carried over, the plan has \d+"):
        finalize.finalize(plan, str(out), night2["run_id"])


def _plan(nights, checkpoint: str) -> planner.Plan:
    """Night 2's plan, made again (its side files exist: nothing is scanned)."""
    predictor = Predictor.from_checkpoint(checkpoint)
    source = carry_over.source(str(nights["out"]), predictor.lineage.name, predictor.lineage.version, predictor.tasks)
    return planner.plan_shards(str(nights["second"]), SHARD_ROWS, out=str(nights["out"]), carry_from=source)


def _markers(out: Path, summary: dict) -> list[Path]:
    return sorted(Path(out, "_markers", f"run={summary['run_id']}").glob("shard-*.json"))


def test_the_full_rescore_scores_everything(nights, full_rescore):
    assert full_rescore["carried"] == 0 and full_rescore["plan"]["to_carry"] == 0
    assert full_rescore["scored"] == full_rescore["predicted"] == nights["night2"]["predicted"]
    assert full_rescore["plan_id"] == planner.plan_shards(str(nights["second"]), SHARD_ROWS).id  # as before carrying
    assert full_rescore["run_id"] not in (nights["night1"]["run_id"], nights["night2"]["run_id"])


def test_incremental_run_equals_a_full_rescore_row_for_row(nights, full_rescore):
    incremental, full = _predictions(nights["night2"]), _predictions(full_rescore)
    assert incremental.column_names == full.column_names
    assert incremental.column("product_id").equals(full.column("product_id"))
    for name in incremental.column_names:
        if name in LINEAGE:
            continue
        if incremental.schema.field(name).type == pa.float32():
            # Other batches around a row (other sizes, other trimmed title lengths) move the last bits.
            np.testing.assert_allclose(incremental.column(name).to_numpy(), full.column(name).to_numpy(), atol=1e-6)
        else:
            assert incremental.column(name).equals(full.column(name)), name


def test_a_new_model_version_rescores_everything(nights, checkpoint, tmp_path):
    newer = Predictor.from_checkpoint(checkpoint, version="2")
    summary = _score(nights["second"], newer, _copy(nights, tmp_path / "out"))
    assert summary["carried"] == 0 and summary["scored"] == nights["night2"]["predicted"]
    assert summary["plan_id"] == planner.plan_shards(str(nights["second"]), SHARD_ROWS).id
    assert {r["model_version"] for r in _predictions(summary).to_pylist()} == {"2"}


def test_a_rerun_resumes_and_the_next_night_carries_from_the_new_state(nights, checkpoint, tmp_path):
    again = _score(nights["second"], checkpoint, nights["out"])
    assert again["run_id"] == nights["night2"]["run_id"] and again["skipped"] == again["shards"]
    out = _copy(nights, tmp_path / "out")
    published = publish.publish(str(out))
    # A published state is another plan: the same catalog is now carried over whole, from the new state.
    night3 = _score(nights["second"], checkpoint, out)
    assert night3["run_id"] != nights["night2"]["run_id"]
    assert (night3["scored"], night3["carried"]) == (0, nights["night2"]["predicted"])
    state = _by_id(pq.read_table(published["latest"]))
    assert all(row == state[pid] for pid, row in _by_id(_predictions(night3)).items())


# --- image_uri catalogs: the shard decides, after fetching ---------------------------------------------------

def _uri_catalog(folder: Path, rows: list[dict]) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for r in rows:
        (folder / "img" / f"{r['product_id']}.jpg").write_bytes(r["image"])
    table = pa.table({"product_id": [r["product_id"] for r in rows], "title": [r["title"] for r in rows],
                      "image_uri": [f"img/{r['product_id']}.jpg" for r in rows]})
    pq.write_table(table, folder / "catalog.parquet")
    return folder / "catalog.parquet"


def test_image_uri_rows_carry_over_when_their_fetched_content_is_unchanged(checkpoint, tmp_path):
    rows = [synthetic.make_row(5, i) for i in range(30)]
    catalog, out = _uri_catalog(tmp_path / "cat", rows), tmp_path / "out"
    first = _score(catalog, checkpoint, out)
    publish.publish(str(out))
    # Same URIs: one now names other bytes; one title changed; one image file is gone.
    rows[7]["title"] += " v2"
    _uri_catalog(tmp_path / "cat", rows)
    (tmp_path / "cat" / "img" / f"{rows[4]['product_id']}.jpg").write_bytes(synthetic.make_row(6, 0)["image"])
    (tmp_path / "cat" / "img" / f"{rows[9]['product_id']}.jpg").unlink()
    second = _score(catalog, checkpoint, out)
    # The plan cannot see behind the URIs: every product of the state is a candidate, the shards decide.
    assert second["plan"] == {"rows": 30, "to_carry": 30, "to_score": 0, "carry_decided": "read"}
    assert (second["scored"], second["carried"], second["quarantined"]) == (2, 27, 1)
    after = _by_id(_predictions(second))
    rescored = {pid for pid, r in after.items() if r["run_id"] == second["run_id"]}
    assert rescored == {rows[4]["product_id"], rows[7]["product_id"]}
    before = _by_id(_predictions(first))
    assert all(after[pid] == before[pid] for pid in set(after) - rescored)


# --- what may be carried ---------------------------------------------------------------------------------------

def test_an_explain_run_carries_only_predictions_with_contributions(nights, checkpoint, tmp_path):
    out = _copy(nights, tmp_path / "out")
    predictor = Predictor.from_checkpoint(checkpoint)
    lineage = predictor.lineage
    assert carry_over.source(str(out), lineage.name, lineage.version, predictor.tasks) is not None
    # The state was scored without contributions: an explain run has nothing to carry.
    assert carry_over.source(str(out), lineage.name, lineage.version, predictor.tasks, explain=True) is None
    explained = _score(nights["second"], checkpoint, out, explain=True)
    assert explained["carried"] == 0
    publish.publish(str(out))
    # Now the state has them: explain and plain runs both carry every product over, each with its columns.
    for explain in (True, False):
        night = _score(nights["second"], checkpoint, out, explain=explain)
        assert (night["scored"], night["carried"]) == (0, explained["predicted"]), explain
        table = _predictions(night)
        assert table.schema.remove_metadata() == contracts.prediction_schema(list(TASKS), explain)
        assert table.column("run_id").unique().to_pylist() == [explained["run_id"]]


def test_a_state_from_before_content_hashes_carries_nothing(nights, checkpoint, tmp_path):
    out = _copy(nights, tmp_path / "out")
    latest = out / "published" / "latest.parquet"
    pq.write_table(pq.read_table(latest).drop_columns(["content_hash"]), latest)
    summary = _score(nights["second"], checkpoint, out)
    assert summary["carried"] == 0 and summary["plan_id"] == planner.plan_shards(str(nights["second"]), SHARD_ROWS).id


# --- the content hash ------------------------------------------------------------------------------------------

def test_the_content_hash_separates_its_parts_and_reads_any_column_type():
    assert content_hash("ab", b"c") != content_hash("a", b"bc")
    assert content_hash(None, b"x") != content_hash("", b"x") and content_hash("t", None) != content_hash("t", b"")
    assert content_hash("é", b"x") == content_hash("é".encode(), b"x") and len(content_hash("", b"")) == 32
    titles, images = ["Red Dress", None, "", "Blue"], [b"\xff\xd8a", b"b", None, b""]
    expected = [content_hash(t, i) for t, i in zip(titles, images)]
    for kind in (pa.string(), pa.large_string(), pa.string_view(), pa.binary()):
        column = pa.array([t if t is None or kind != pa.binary() else t.encode() for t in titles], kind)
        assert content_hashes(column, pa.array(images, pa.large_binary())).to_pylist() == expected, kind
    chunked = pa.chunked_array([pa.array(titles[:1]), pa.array(titles[1:])]).slice(1)
    assert content_hashes(chunked, pa.array(images[1:])).to_pylist() == expected[1:]
    assert content_hashes(pa.array(titles).dictionary_encode(), pa.array(images)).to_pylist() == expected
    assert content_hashes(pa.nulls(2), pa.array(images[:2])).to_pylist() == [content_hash(None, i) for i in images[:2]]


def test_the_pyfunc_records_the_hash_batch_scoring_records(nights, checkpoint):
    from pipeline.tracking import pyfunc

    frame = pq.read_table(nights["first"]).to_pandas().head(12)
    out = pyfunc.predict_rows(Predictor.from_checkpoint(checkpoint), frame[list(pyfunc.INPUT_COLUMNS)])
    batch = _by_id(_predictions(nights["night1"]))
    assert Counter(out["content_hash"].isna()) == Counter({False: 12})
    for product_id, digest in zip(out["product_id"], out["content_hash"]):
        assert digest == batch[product_id]["content_hash"]
