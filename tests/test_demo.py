"""The demo's second, incremental night (pipeline/demo.py): its catalog snapshot and how the summary reports
each night. The demo itself (`make demo`, both DAGs under `airflow dags test`) takes minutes and is run by
hand."""
from __future__ import annotations

import pyarrow.parquet as pq

from pipeline import demo, synthetic
from pipeline.io import storage


def test_the_second_night_is_written_once_beside_the_first_and_changes_only_good_rows(tmp_path):
    first = tmp_path / "catalog" / "catalog.parquet"
    synthetic.make_catalog(40, str(first), seed=demo.SEED, with_bad_rows=True)
    second = demo.second_night_catalog(str(first))
    assert second["uri"] == str(tmp_path / "catalog" / "catalog-night-2.parquet")
    assert second["changed"] == {"titles": 3, "images": 2, "deleted": 2, "added": 2}
    version = storage.content_version(second["uri"])
    assert demo.second_night_catalog(str(first)) == second  # a rerun finds the same snapshot, not rewritten
    assert storage.content_version(second["uri"]) == version
    before, after = pq.read_table(first).to_pylist(), pq.read_table(second["uri"]).to_pylist()
    assert len(after) == second["rows"] == len(before)
    bad = [r for r in before if not (r["product_id"] or "").startswith(demo.GOOD_ROW)]
    assert bad and all(r in after for r in bad)


def _night(rows: str, note: str, scored: int, carried: int, verdict) -> dict:
    run = {"run_id": f"run-{note}", "model_version": "1", "shards": 3, "rows_in": scored + carried + 4,
           "scored": scored, "carried": carried, "quarantined": 4, "reasons": {"undecodable_image": 4},
           "verdict": verdict}
    return {"catalog": {"uri": f"{note}.parquet", "rows": rows, "note": note}, "scoring": run, "seconds": 1.0}


def test_the_summary_says_per_night_what_was_scored_and_carried_over_and_the_gate_verdict():
    nights = [_night(1204, "first", 1200, 0, None),
              _night(1204, "second", 7, 1193, {"passed": False, "exceeded": ["color drift 0.4 > 0.2"]})]
    text = "\n".join(demo.night_lines(nights))
    assert "night 1: first.parquet (1204 rows, first)" in text
    assert "1204 rows in = 1200 scored + 0 carried over + 4 quarantined (undecodable_image 4)" in text
    assert "1204 rows in = 7 scored + 1193 carried over + 4 quarantined" in text
    assert text.splitlines()[-1] == "Quality gate   night 1: no verdict (not published); night 2: failed: color drift 0.4 > 0.2"
    assert demo.gate_line({"passed": True, "exceeded": []}) == "passed"
    without = demo.night_lines([_night(1204, "first", 1200, 0, None), _night(1204, "second", 7, 1193, None)])
    assert without[-1] == "Quality gate   no verdict (not published)"
    forced = {"passed": False, "exceeded": ["color drift 0.4 > 0.2"], "forced": True}
    assert demo.gate_line(forced) == "failed, published anyway: color drift 0.4 > 0.2"


def test_the_gate_verdict_is_read_from_the_version_each_run_published(tmp_path):
    from publish_support import finalized_run, prediction

    from pipeline.scoring import publish
    from pipeline.scoring.gate import Limits

    out = str(tmp_path / "out")
    finalized_run(out, "night-1", [prediction(f"p{i}", "night-1") for i in range(20)])
    publish.publish(out, limits=Limits())
    # Night 2: every product's colour moves to another class; published anyway past the gate.
    finalized_run(out, "night-2", [prediction(f"p{i}", "night-2", night=1, color="red") for i in range(20)], night=1)
    publish.publish(out, limits=Limits(), force=True)
    assert demo.gate_verdict(out, "night-1") == {"passed": True, "exceeded": [], "forced": False}
    second = demo.gate_verdict(out, "night-2")
    assert second["passed"] is False and second["forced"] is True and any("color" in e for e in second["exceeded"])
    assert demo.gate_verdict(out, "never-published") is None
