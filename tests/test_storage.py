from __future__ import annotations

import os
from collections.abc import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import storage
from pipeline.io.parquet_writer import AtomicParquetWriter


@pytest.fixture(params=["local", "memory"])
def base(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    uri = f"memory://test-{os.getpid()}-{tmp_path.name}"
    yield uri
    storage.remove(uri, recursive=True)


def test_bytes_text_json_roundtrip(base: str) -> None:
    storage.write_bytes(storage.join(base, "a/b.bin"), b"\x00\x01")
    storage.write_text(storage.join(base, "t.txt"), "héllo")
    storage.write_json(storage.join(base, "j.json"), {"x": [1, "ü"]})
    assert storage.read_bytes(storage.join(base, "a/b.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(base, "t.txt")) == "héllo"
    assert storage.read_json(storage.join(base, "j.json")) == {"x": [1, "ü"]}
    assert storage.exists(storage.join(base, "t.txt"))
    assert storage.size(storage.join(base, "a/b.bin")) == 2


def test_atomic_output_commits_whole_file_or_nothing(base: str) -> None:
    target = storage.join(base, "out/data.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_output(target) as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not storage.exists(target)
    with storage.atomic_output(target) as f:
        f.write(b"whole")
    assert storage.read_bytes(target) == b"whole"
    assert storage.list_files(storage.join(base, "out")) == [storage.list_files(target)[0]]  # no temp left



def test_parquet_writer_cuts_fixed_row_groups_and_commits_whole_or_nothing(base: str) -> None:
    schema = pa.schema([("a", pa.int64())])
    target = storage.join(base, "w/whole.parquet")
    with AtomicParquetWriter(target, schema, row_group_rows=4) as writer:
        for n in (3, 6, 2):  # writes that do not line up with the row groups
            writer.write(pa.table({"a": list(range(n))}, schema=schema))
        assert not storage.exists(target)
    meta = storage.parquet_file(target).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 3] and writer.rows == 11
    assert pq.read_table(pa.BufferReader(storage.read_bytes(target))).column("a").to_pylist() == [0, 1, 2, *range(6), 0, 1]
    with pytest.raises(RuntimeError):
        with AtomicParquetWriter(storage.join(base, "w/half.parquet"), schema, row_group_rows=4) as writer:
            writer.write(pa.table({"a": list(range(9))}, schema=schema))  # two row groups written
            raise RuntimeError("writer died")
    fs, folder = storage.filesystem(storage.join(base, "w"))
    assert [name.rsplit("/", 1)[-1] for name in fs.ls(folder, detail=False)] == ["whole.parquet"]  # no temp left

def test_list_files_folder_glob_file_and_hidden(base: str) -> None:
    for name in ("d/a.parquet", "d/sub/b.parquet", "d/_SUCCESS", "d/.tmp.parquet", "d/c.txt"):
        storage.write_bytes(storage.join(base, name), b"x")
    folder = storage.list_files(storage.join(base, "d"))
    assert sorted(f.rsplit("/", 1)[-1] for f in folder) == ["a.parquet", "b.parquet", "c.txt"]
    assert folder == sorted(folder)
    assert len(storage.parquet_files(storage.join(base, "d"))) == 2
    assert len(storage.parquet_files(storage.join(base, "d/*.parquet"))) == 1
    single = storage.list_files(storage.join(base, "d/c.txt"))
    assert len(single) == 1 and single[0].endswith("d/c.txt")
    assert storage.list_files(storage.join(base, "nothing-here")) == []


def test_remove_is_idempotent(base: str) -> None:
    storage.write_bytes(storage.join(base, "f/x"), b"1")
    storage.remove(storage.join(base, "f"), recursive=True)
    storage.remove(storage.join(base, "f"), recursive=True)
    assert not storage.exists(storage.join(base, "f/x"))


def test_open_parquet_dataset_file_folder_glob(base: str) -> None:
    for i in range(2):
        with storage.atomic_output(storage.join(base, f"ds/part-{i}.parquet")) as f:
            pq.write_table(pa.table({"a": [i, i]}), f)
    assert storage.open_parquet_dataset(storage.join(base, "ds")).count_rows() == 4
    assert storage.open_parquet_dataset(storage.join(base, "ds/part-*.parquet")).count_rows() == 4
    assert storage.open_parquet_dataset(storage.join(base, "ds/part-1.parquet")).to_table()["a"].to_pylist() == [1, 1]
    with pytest.raises(FileNotFoundError):
        storage.open_parquet_dataset(storage.join(base, "missing"))


def test_duckdb_reads_through_registered_filesystem(base: str) -> None:
    uri = storage.join(base, "q/t.parquet")
    with storage.atomic_output(uri) as f:
        pq.write_table(pa.table({"k": ["x", "y", "x"]}), f)
    con = duckdb.connect()
    storage.register_duckdb(con, uri)
    rows = con.execute("SELECT k, count(*) FROM read_parquet($p) GROUP BY k ORDER BY k",
                       {"p": storage.list_files(uri)[0]}).fetchall()
    assert rows == [("x", 2), ("y", 1)]


def test_content_version_follows_content(base: str) -> None:
    uri = storage.join(base, "v.bin")
    storage.write_bytes(uri, b"one")
    first = storage.content_version(uri)
    assert first == storage.content_version(uri) and first.startswith("sha256:")
    storage.write_bytes(uri, b"two")
    assert storage.content_version(uri) != first


def test_s3_options_honor_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage.storage_options("s3://b/k") == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    assert storage.storage_options("/local/path") == {}
    assert storage.protocol("memory://x") == "memory" and storage.protocol("/x") == "file"


def test_read_bounded_returns_bytes_or_the_error(base: str) -> None:
    storage.write_bytes(storage.join(base, "r/a[1].bin"), b"A")   # glob characters are taken literally
    storage.write_bytes(storage.join(base, "r/big.bin"), b"B" * 11)
    storage.write_bytes(storage.join(base, "r/limit.bin"), b"C" * 10)
    names = ["a[1].bin", "missing.bin", "big.bin", "limit.bin"]
    got = storage.read_bounded([storage.join(base, "r", n) for n in names], 10, 1.0, 2.0)
    assert got[0] == b"A" and got[3] == b"C" * 10
    assert isinstance(got[1], Exception) and not isinstance(got[1], storage.TooLarge)
    assert isinstance(got[2], storage.TooLarge)
    assert storage.read_bounded([], 10, 1.0, 2.0) == []


def test_bounded_local_read_refuses_what_is_not_a_regular_file(tmp_path) -> None:
    fifo, folder = tmp_path / "pipe.jpg", tmp_path / "folder.jpg"
    os.mkfifo(fifo)  # opening it to read would block until a writer comes: it must never be opened
    folder.mkdir()
    got = storage.read_bounded([str(fifo), str(folder), "/dev/zero"], 1 << 20, 1.0, 2.0)
    assert all(isinstance(g, storage.NotRegularFile) for g in got), got


def test_bounded_local_read_refuses_a_large_file_without_reading_it(tmp_path) -> None:
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as f:
        f.truncate(300 << 20)  # 300 MB that take no disk; reading them would take 300 MB of memory
    [got] = storage.read_bounded([str(sparse)], 16 << 20, 1.0, 2.0)
    assert isinstance(got, storage.TooLarge) and str(300 << 20) in str(got)
