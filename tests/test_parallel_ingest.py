"""Ingest spread over groups: the same dataset, byte for byte, for any number of groups and processes; a group
killed mid-write and retried leaves nothing behind; a failed group retries alone, the others untouched."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import external_sort, staging
from pipeline.ingest.dataset import GROUP_ROWS, Helpers, _map, auto_groups, finish, ingest, read_manifest
from pipeline.ingest.plan import balanced_bounds, make_params, plan_ingest, split_key
from pipeline.orchestration import airflow_tasks as orch
from pipeline.synthetic import BAD_ROWS, make_catalog

TASKS = "color,pattern,style"
SMALL_PARTS = {"rows_per_part": 128, "row_group_rows": 32, "min_class_count": 3}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    """600 products and the bad rows, plus copies of some rows far from their originals (duplicates that
    fall in other groups), in row groups of 100 rows: 7 row groups to cut into groups."""
    folder = tmp_path_factory.mktemp("parallel")
    make_catalog(600, str(folder / "base.parquet"), seed=21, with_bad_rows=True)
    base = pq.read_table(folder / "base.parquet")
    table = pa.concat_tables([base, base.slice(5, 20), base.slice(400, 10)])
    pq.write_table(table, folder / "catalog.parquet", row_group_size=100)
    return str(folder / "catalog.parquet")


def digest(out: str) -> dict[str, str]:
    """sha256 of every file of a dataset, the manifest without its run record (timings, processes)."""
    found = {}
    for path in sorted(Path(out).rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "manifest.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "run"}, sort_keys=True).encode()
            found[str(path.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return found


@pytest.fixture(scope="module")
def reference(catalog: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("reference"))
    ingest(catalog, TASKS, out, workers=1, groups=1, **SMALL_PARTS)
    return out


@pytest.mark.parametrize("groups, workers", [(2, 2), (3, 1), (3, 3)])
def test_any_number_of_groups_gives_the_same_dataset(catalog: str, reference: str, tmp_path: Path,
                                                     groups: int, workers: int) -> None:
    out = str(tmp_path / "out")
    manifest = ingest(catalog, TASKS, out, workers=workers, groups=groups, **SMALL_PARTS)
    assert manifest["run"]["workers"] == workers
    files = digest(out)
    assert files == digest(reference)
    assert sum(name.startswith("dataset/part-train") for name in files) >= 3   # several parts per split
    counts = manifest["counts"]
    assert counts["rows_in"] == 600 + len(BAD_ROWS) + 1 + 30 and counts["quarantined_by_reason"]["duplicate_id"] >= 30
    assert counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"]


def test_rows_of_a_split_are_in_split_key_order(reference: str) -> None:
    manifest = read_manifest(reference)
    for split, parts in manifest.files.dataset.items():
        ids = [pid for p in parts for pid in pq.read_table(Path(reference) / p.path).column("product_id").to_pylist()]
        assert ids == sorted(ids, key=lambda pid: (split_key(pid), pid)), split


def test_groups_are_balanced_runs_of_row_groups(catalog: str) -> None:
    params = make_params(catalog, TASKS)
    plan = plan_ingest(catalog, params, groups=3)
    assert plan.bounds == (0, 2, 4, 7) and plan.id == plan_ingest(catalog, params, groups=3).id
    assert [sum(u.rows for u in plan.group(g)) for g in plan.group_ids] == [200, 200, 246]
    assert plan_ingest(catalog, params, groups=50).group_ids == [f"{g:05d}" for g in range(7)]  # one row group each
    assert balanced_bounds([10, 0, 10, 10, 10], 2) == (0, 3, 5)
    assert plan.regrouped(1).bounds == (0, 7) and plan.regrouped(1).id != plan.id


def test_default_groups_follow_the_rows_with_at_least_four_per_process() -> None:
    assert auto_groups(1000, 1) == 1 and auto_groups(1000, 2) == 8 and auto_groups(1000, 3) == 12
    assert auto_groups(10 * GROUP_ROWS + 1, 1) == 11 == auto_groups(10 * GROUP_ROWS + 1, 2)


def test_this_process_works_beside_the_helpers_and_results_keep_their_order() -> None:
    """The first two items each wait until the other has started: they only return if this thread and the
    helper's each took one; then the rest are shared in whatever order they free up."""
    both, threads = threading.Barrier(2, timeout=30), set()

    def square(x: int) -> int:
        threads.add(threading.get_ident())
        if x < 2:
            both.wait()
        return x * x

    with ThreadPoolExecutor(1) as helper:
        assert _map(Helpers(helper, 1), square, [(x,) for x in range(20)]) == [x * x for x in range(20)]
    assert len(threads) == 2 and threading.get_ident() in threads


def test_an_error_in_any_process_stops_the_map() -> None:
    def fail_on_seven(x: int) -> int:
        if x == 7:
            raise ValueError("row 7")
        return x

    with ThreadPoolExecutor(1) as helper, pytest.raises(ValueError, match="row 7"):
        _map(Helpers(helper, 1), fail_on_seven, [(x,) for x in range(20)])


CHILD = """
import sys, time
from pipeline.ingest import staging
from pipeline.ingest.plan import IngestPlan
from pipeline.io.parquet_writer import AtomicParquetWriter

plan_file, group, folder, scratch, signal_file = sys.argv[1:]

def stalled_close(self):  # every row is written to the temporary file; the commit never comes
    open(signal_file, "w").close()
    time.sleep(600)

AtomicParquetWriter.close = stalled_close
staging.stage_group(IngestPlan.from_json(open(plan_file).read()), group, folder, scratch)
"""


def test_a_group_killed_mid_write_and_retried_leaves_nothing_behind(catalog: str, reference: str,
                                                                    tmp_path: Path) -> None:
    plan = plan_ingest(catalog, make_params(catalog, TASKS, **SMALL_PARTS), groups=3)
    folder, scratch, signal_file = tmp_path / "staging", tmp_path / "scratch", tmp_path / "writing"
    scratch.mkdir()
    (tmp_path / "plan.json").write_text(plan.to_json())
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "plan.json"), "00001", str(folder),
                              str(scratch), str(signal_file)], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal_file.exists(), "the child never reached the commit"
        left = sorted(p.name for p in (folder / "group-00001").iterdir())
        # mid-write: both files are temporaries, neither is committed
        assert [name.split(".tmp-")[0] for name in left] == [".quarantine.parquet", ".rows.parquet"]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert staging.committed(plan, str(folder), "00001") is None
    assert any(scratch.iterdir())  # the killed attempt's scratch is still there

    for group in plan.group_ids:  # the retry of the killed group, and the other groups
        staging.stage_group(plan, group, str(folder), str(scratch))
    assert not any(scratch.iterdir())
    expected = {f"group-{g}{suffix}" for g in plan.group_ids
                for suffix in (".json", "/rows.parquet", "/quarantine.parquet")}
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == expected
    out = str(tmp_path / "out")
    finish(plan, str(folder), out)
    assert digest(out) == digest(reference)


def test_two_ingests_of_one_catalog_into_two_places_keep_their_own_scratch(catalog: str, tmp_path: Path) -> None:
    """One catalog ingested into two places at once is one plan: a group staging into the second place must not
    remove the sorted runs of the same group staging into the first (it removes only its own leftovers)."""
    plan = plan_ingest(catalog, make_params(catalog, TASKS, **SMALL_PARTS), groups=3)
    scratch, first, second = tmp_path / "scratch", str(tmp_path / "first"), str(tmp_path / "second")
    in_progress = Path(staging.scratch_folder(plan, "00001", first, str(scratch)))
    in_progress.mkdir(parents=True)
    (in_progress / "run-000000.arrow").write_bytes(b"the first ingest's sorted run")
    staging.stage_group(plan, "00001", second, str(scratch))
    assert staging.committed(plan, second, "00001") is not None
    assert (in_progress / "run-000000.arrow").read_bytes() == b"the first ingest's sorted run"
    assert staging.scratch_folder(plan, "00001", first, str(scratch)) == str(in_progress)  # a retry finds it


def test_a_failed_group_retries_alone(catalog: str, reference: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The Airflow tasks' functions, as the mapped tasks call them: group 1's staging fails (storage lost
    mid-group), its retry stages it, and the committed groups are neither staged again nor touched."""
    monkeypatch.setenv("CMACLIP_STORAGE_PREFIXES", f"{tmp_path},{Path(catalog).parent}")
    run = str(tmp_path / "run")
    planned = orch.plan_ingest(catalog, TASKS.split(","), run, groups=3)
    assert planned["groups"] == ["00000", "00001", "00002"]
    real_check = staging.check_rows

    def storage_lost(rows, rules):
        raise OSError("storage unavailable")

    orch.stage_ingest_group(planned["plan"], "00000", run)
    monkeypatch.setattr(staging, "check_rows", storage_lost)
    with pytest.raises(OSError, match="storage unavailable"):
        orch.stage_ingest_group(planned["plan"], "00001", run)
    monkeypatch.setattr(staging, "check_rows", real_check)
    orch.stage_ingest_group(planned["plan"], "00002", run)
    folder = Path(run) / "ingest-staging"
    assert not (folder / "group-00001.json").exists()
    assert not any((folder / "group-00001").glob("*.parquet"))   # nothing of the failed attempt committed
    committed = {g: (folder / f"group-{g}.json").stat().st_mtime_ns for g in ("00000", "00002")}

    monkeypatch.setattr(staging, "check_rows", storage_lost)  # a committed group is not staged again
    for group in ("00000", "00002"):
        assert orch.stage_ingest_group(planned["plan"], group, run)["group"] == group
    monkeypatch.setattr(staging, "check_rows", real_check)
    retried = orch.stage_ingest_group(planned["plan"], "00001", run)
    assert retried["rows_in"] == 200
    assert {g: (folder / f"group-{g}.json").stat().st_mtime_ns for g in ("00000", "00002")} == committed

    finished = orch.finish_ingest(planned["plan"], run)
    assert finished["rows_kept"] == read_manifest(reference).counts.rows_kept
    assert not folder.exists()  # the staged rows are gone once the dataset is written
    assert orch.finish_ingest(planned["plan"], run) == finished   # run again: the written dataset


def test_external_sort_merges_in_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small runs (more than FAN_IN): merged in passes, sorted as an in-memory sort would."""
    monkeypatch.setattr(external_sort, "RUN_BYTES", 2_000)
    monkeypatch.setattr(external_sort, "FAN_IN", 3)
    monkeypatch.setattr(external_sort, "BATCH_BYTES", 500)
    rng = random.Random(0)
    rows = [{"key": f"{rng.randrange(50):03d}", "id": rng.choice("abc"), "seq": i, "blob": rng.randbytes(40)}
            for i in range(600)]
    tables = [pa.Table.from_pylist(rows[i:i + 25]) for i in range(0, 600, 25)]
    merged = pa.concat_tables(external_sort.sorted_tables(tables, ("key", "id", "seq"), str(tmp_path), out_rows=64))
    assert merged.to_pylist() == sorted(rows, key=lambda r: (r["key"], r["id"], r["seq"]))
    assert not any(tmp_path.iterdir())  # every run removed once merged


def test_cli_groups_and_a_kept_staging_folder_that_a_rerun_reuses(catalog: str, tmp_path: Path, capsys) -> None:
    from pipeline import cli

    staging_folder, out = tmp_path / "staging", str(tmp_path / "out")
    args = ["ingest", "--catalog", catalog, "--tasks", TASKS, "--out", out, "--min-class-count", "3",
            "--workers", "1", "--groups", "3", "--staging", str(staging_folder)]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["rows_in"] == 600 + len(BAD_ROWS) + 1 + 30
    markers = {p.name: p.stat().st_mtime_ns for p in staging_folder.glob("group-*.json")}
    assert len(markers) == 3
    first = digest(out)
    assert cli.main(args) == 0   # the committed groups are reused, the dataset written again the same
    assert {p.name: p.stat().st_mtime_ns for p in staging_folder.glob("group-*.json")} == markers
    assert digest(out) == first
    single = str(tmp_path / "single")
    ingest(catalog, TASKS, single, workers=1, groups=1, min_class_count=3)
    assert digest(single) == first
