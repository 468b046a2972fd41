"""The published state in versions: publish reads the newest run only, a deleted product leaves the state,
rollback restores the previous version byte for byte, a publish that fails halfway leaves the previous
version current, retention keeps the last versions and the runs they need; and the report catalog teams act
on (fill, disagreements, per-task drift) on runs and catalogs made for it. No model: the prediction files
are written directly (tests/publish_support.py)."""
from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import cli, contracts
from pipeline.io import storage
from pipeline.scoring import publish, report, retention, versions
from publish_support import catalog, finalized_run, prediction


def _published(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "published").glob("*.parquet"))}


def _runs(out: Path) -> set[str]:
    return {p.name.removeprefix("run=").removesuffix(".json") for p in (out / "_manifests").iterdir()}


# --- versions ---------------------------------------------------------------------------------------------

def test_a_deleted_product_leaves_the_state_and_only_the_newest_run_is_read(tmp_path):
    out = tmp_path / "out"
    first = finalized_run(out, "night-1", [prediction(p, "night-1") for p in ("c", "a", "b")])
    assert publish.publish(str(out))["version"] == 1
    # Night 2: b was deleted from the catalog, d added, c rescored, a carried over with its own lineage.
    rows = [prediction("a", "night-1"), prediction("d", "night-2", night=1),
            prediction("c", "night-2", night=1, color="red")]
    finalized_run(out, "night-2", rows, night=1)
    for file in first.predictions:  # an older run's files are never read
        Path(file).write_bytes(b"not parquet")

    summary = publish.publish(str(out))
    assert (summary["version"], summary["previous"], summary["run_id"], summary["products"]) == (2, 1, "night-2", 3)
    latest = pq.read_table(summary["latest"])
    assert latest.column("product_id").to_pylist() == ["a", "c", "d"]
    assert latest.column("run_id").to_pylist() == ["night-1", "night-2", "night-2"]
    assert latest.column("color").to_pylist() == ["blue", "red", "blue"]
    assert latest.schema.metadata[versions.VERSION_KEY.encode()] == b"2"
    assert pq.read_table(str(out / "published/versions/v=2/latest.parquet")).equals(latest)
    # Publishing the run that is current again writes nothing new.
    assert publish.publish(str(out))["version"] == 2 and versions.numbers(str(out)) == [1, 2]


def _first_version(tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    """Version 1 to go back to: night-1's predictions of products a, b, c, published with their catalog.
    The output folder, the catalog, and version 1's published files."""
    out = tmp_path / "out"
    products = catalog(tmp_path / "catalog.parquet", [{"product_id": p, "color": "blue"} for p in "abc"])
    finalized_run(out, "night-1", [prediction(p, "night-1") for p in "abc"])
    publish.publish(str(out), products)
    return out, products, _published(out)


def test_rollback_makes_the_previous_version_current_byte_for_byte(tmp_path, capsys):
    out, products, first = _first_version(tmp_path)
    assert set(first) == {"latest.parquet", "catalog.parquet"}
    finalized_run(out, "night-2", [prediction(p, "night-2", night=1, color="green") for p in "ab"], night=1)
    publish.publish(str(out))  # no catalog this time: version 2 has none, and none stays from version 1
    assert set(_published(out)) == {"latest.parquet"}

    assert cli.main(["publish", "--out", str(out), "--rollback"]) == 0
    rolled = json.loads(capsys.readouterr().out)
    assert (rolled["version"], rolled["rolled_back"], rolled["run_id"]) == (1, 2, "night-1")
    assert _published(out) == first
    assert versions.current(str(out)).run_id == "night-1"
    assert cli.main(["publish", "--out", str(out), "--rollback"]) == 2  # version 1 has no previous one
    assert "there is no previous version" in capsys.readouterr().err
    # The next publish follows the version that is current.
    finalized_run(out, "night-3", [prediction(p, "night-3", night=2) for p in "abcd"], night=2)
    summary = publish.publish(str(out), products)
    assert (summary["version"], summary["previous"]) == (3, 1)


def test_a_publish_that_fails_halfway_leaves_the_previous_version_current(tmp_path, monkeypatch):
    out, products, first = _first_version(tmp_path)
    finalized_run(out, "night-2", [prediction(p, "night-2", night=1, style="formal") for p in "abc"], night=1)

    def no_catalog(*args, **kwargs):
        raise OSError("storage went away while writing the catalog table")

    with monkeypatch.context() as patched:  # the version's tables half written, no record
        patched.setattr(publish, "_publish_catalog", no_catalog)
        with pytest.raises(OSError, match="went away"):
            publish.publish(str(out), products)
    assert _published(out) == first and versions.numbers(str(out)) == [1, 2]
    assert not versions.is_complete(str(out), 2)

    real_copy = storage.copy

    def copy_all_but_latest(src: str, dst: str) -> None:
        if dst.endswith("published/latest.parquet"):
            raise OSError("storage went away while making the version current")
        real_copy(src, dst)

    with monkeypatch.context() as patched:  # the version complete, not yet current
        patched.setattr(storage, "copy", copy_all_but_latest)
        with pytest.raises(OSError, match="went away"):
            publish.publish(str(out), products)
    assert (out / "published/latest.parquet").read_bytes() == first["latest.parquet"]
    assert versions.current(str(out)).run_id == "night-1" and versions.is_complete(str(out), 3)

    summary = publish.publish(str(out), products)  # the retry
    assert (summary["version"], summary["previous"], summary["run_id"]) == (4, 1, "night-2")
    assert summary["removed"]["versions"] == [2]  # the incomplete folder; 3 is complete and within keep
    assert set(pq.read_table(summary["latest"]).column("style").to_pylist()) == {"formal"}


def test_retention_keeps_the_last_versions_and_the_runs_they_need(tmp_path, monkeypatch):
    monkeypatch.setenv("CMACLIP_KEEP_RUNS", "1")
    out = tmp_path / "out"
    for night in range(1, 5):
        run_id = f"night-{night}"
        finalized_run(out, run_id, [prediction(p, run_id, night=night) for p in "abc"], night=night)
        summary = publish.publish(str(out), keep=2)
    assert summary["removed"] == {"versions": [2], "runs": ["night-2"], "unfinalized_runs": [], "plans": []}
    assert versions.numbers(str(out)) == [3, 4]
    assert _runs(out) == {"night-3", "night-4"}  # night-3: version 3 was published from it
    for kind in ("predictions", "_markers", "_reports"):
        assert {p.name for p in out.glob(f"{kind}/**/run=*")} == {"run=night-3", "run=night-4"}, kind

    # A night that never finalized, and a plan no kept run uses: kept while they may still be resumed.
    failed = out / "_markers" / "run=failed-night" / "shard-00000.json"
    failed.parent.mkdir(parents=True)
    failed.write_text("{}")
    plan = out / "_plans" / "plan=old" / "duplicates.parquet"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"")
    rules = retention.Retention(versions=2, runs=1)
    assert retention.prune(str(out), rules)["unfinalized_runs"] == [] and failed.exists() and plan.exists()
    later = retention.prune(str(out), rules, now=time.time() + 8 * retention.DAY_S)
    assert (later["unfinalized_runs"], later["plans"]) == (["failed-night"], ["old"])
    assert not failed.parent.exists() and not plan.parent.exists() and _runs(out) == {"night-3", "night-4"}
    assert versions.rollback(str(out))["run_id"] == "night-3"  # what rollback needs was kept


def test_versions_rollback_and_retention_on_an_object_store():
    """memory:// stands in for s3:// (objects put whole, listed by prefix, no real folders)."""
    out = f"memory://publish-state-{uuid.uuid4().hex}/out"
    for night, colour in enumerate(["blue", "green", "red"], start=1):
        run_id = f"night-{night}"
        finalized_run(out, run_id, [prediction(p, run_id, night=night, color=colour) for p in "ab"], night=night)
        summary = publish.publish(out, keep=2)
    assert summary["removed"]["runs"] == ["night-1"] and versions.numbers(out) == [2, 3]
    assert storage.glob(storage.join(out, "predictions", "*", "*", "run=night-1")) == []
    assert versions.rollback(out)["run_id"] == "night-2"
    assert storage.read_bytes(summary["latest"]) == storage.read_bytes(f"{out}/published/versions/v=2/latest.parquet")
    assert set(pq.read_table(storage.open_input(summary["latest"])).column("color").to_pylist()) == {"green"}


# --- the report ---------------------------------------------------------------------------------------------

def test_the_report_per_task_abstention_classes_lambda_and_drift(tmp_path):
    out = tmp_path / "out"
    finalized_run(out, "night-1", [prediction(p, "night-1", color=c) for p, c in zip("abcd", ["blue", "blue",
                                                                                           "green", "green"])])
    publish.publish(str(out))
    rows = [prediction("a", "night-1", color="blue", color_image_weight=0.2),              # carried over
            prediction("b", "night-2", night=1, color="red", color_image_weight=0.4),      # changed
            prediction("c", "night-2", night=1, color="green", color_image_weight=0.6),    # unchanged
            prediction("d", "night-2", night=1, color=None, color_top="green",             # now abstains
                       color_confidence=0.3, color_image_weight=0.8),
            prediction("e", "night-2", night=1, color="red", color_image_weight=1.0)]      # new
    made = report.build(str(out), finalized_run(out, "night-2", rows, night=1))

    assert (made.products, made.baseline_version, made.baseline_products, made.catalog) == (5, 1, 4, None)
    color = {t.task: t for t in made.tasks}["color"]
    assert (color.products, color.abstained, color.abstention_rate) == (5, 1, 0.2)
    assert color.classes == {"blue": 1, "green": 1, "red": 2}
    assert color.mean_image_weight == pytest.approx(0.6)
    assert (color.rescored, color.compared, color.changed) == (4, 3, 2) and color.changed_rate == pytest.approx(2 / 3)
    # Shares of blue, green, red and abstained: 1/5, 1/5, 2/5, 1/5 now; 2/4, 2/4, 0, 0 before (0 -> 1e-4).
    by_hand = 2 * (0.2 - 0.5) * math.log(0.2 / 0.5) + sum((p - 1e-4) * math.log(p / 1e-4) for p in (0.4, 0.2))
    assert color.psi == pytest.approx(by_hand) and (color.filled, color.disagreements) == (None, None)
    style = {t.task: t for t in made.tasks}["style"]
    assert style.classes == {"casual": 5, "formal": 0} and style.psi == pytest.approx(0.0)
    summary = Path(made.files["summary"]).read_text()
    assert "| color  | 20.0%" in summary and "2 of 3" in summary and "4 scored by this run, 1 carried over" in summary
    assert report.build(str(out), finalized_run(out, "night-2", rows, night=1)) == made  # built once per state


@pytest.mark.parametrize("text", [pa.string(), pa.binary()], ids=["string", "binary"])
def test_fill_and_disagreements_on_a_catalog_made_for_them(tmp_path, text):
    out = tmp_path / "out"
    # (product, predicted color or None when it abstains, confidence, catalog color)
    cases = [("missing", "red", 0.95, None), ("empty", "blue", 0.7, ""), ("blank", "green", 0.8, " \t "),
             ("agrees", "red", 0.9, " red "), ("differs", "red", 0.99, "blue"), ("navy", "green", 0.6, "navy"),
             ("unsure", None, 0.3, "red"), ("unsure-missing", None, 0.3, None), ("twice", "red", 0.9, "blue")]
    rows = [prediction(p, "night-1", color=c, color_top=c or "blue", color_confidence=conf) for p, c, conf, _ in cases]
    finalized_run(out, "night-1", rows)
    values = [{"product_id": f" {p}", "color": v} for p, _, _, v in cases]
    values += [{"product_id": "twice", "color": None}, {"product_id": "quarantined", "color": None}]
    encode = (lambda v: v.encode() if isinstance(v, str) else v) if text == pa.binary() else (lambda v: v)
    schema = pa.schema([("product_id", pa.string()), ("color", text)])  # no style column at all
    products = catalog(tmp_path / "catalog.parquet", [r | {"color": encode(r["color"])} for r in values], schema)

    made = report.build(str(out), publish.run_manifest(str(out)), products)
    fill, disagreements = (pq.read_table(made.files[n]) for n in ("fill", "disagreements"))
    assert fill.schema.remove_metadata() == contracts.schema_of(contracts.FILL)
    assert disagreements.schema.remove_metadata() == contracts.schema_of(contracts.DISAGREEMENTS)
    color_fill = fill.filter(pc.equal(fill.column("task"), "color")).to_pylist()
    assert [(r["product_id"], r["predicted"]) for r in color_fill] == [("missing", "red"), ("blank", "green"),
                                                                     ("empty", "blue")]   # most confident first
    assert [r["confidence"] for r in color_fill] == pytest.approx([0.95, 0.8, 0.7])
    # No style column in the catalog: every confident style prediction fills it (not the duplicated id).
    style_fill = fill.filter(pc.equal(fill.column("task"), "style")).column("product_id").to_pylist()
    assert sorted(style_fill) == sorted(p for p, *_ in cases if p != "twice")
    assert [(r["product_id"], r["catalog_value"], r["predicted"]) for r in disagreements.to_pylist()] == \
        [("differs", "blue", "red"), ("navy", "navy", "green")]
    assert disagreements.column("confidence").to_pylist() == pytest.approx([0.99, 0.6])
    tasks = {t.task: t for t in made.tasks}
    assert (tasks["color"].filled, tasks["color"].disagreements) == (3, 2)
    assert (tasks["style"].filled, tasks["style"].disagreements) == (8, 0)


def test_a_run_with_two_predictions_of_one_product_is_not_published(tmp_path):
    out = tmp_path / "out"
    finalized_run(out, "night-1", [prediction("a", "night-1"), prediction("a", "night-1", color="red")])
    with pytest.raises(RuntimeError, match="hold 2 rows but 1 products"):
        publish.publish(str(out))
    assert not (out / "published" / "latest.parquet").exists() and not versions.is_complete(str(out), 1)
