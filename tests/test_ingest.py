from __future__ import annotations

import io
import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import cli, reasons
from pipeline.io import storage
from pipeline.ingest.dataset import (CatalogError, dataset_files, ingest, read_labels, read_manifest, split_of)
from pipeline.io.text import MAX_TITLE_CHARS, normalize_title
from pipeline.synthetic import BAD_ROWS, MESSY_TITLE, make_row

TASKS = "color,pattern,style"


def dataset(out: str) -> pa.Table:
    return pq.read_table(str(Path(out) / "dataset"))


def quarantine(out: str) -> pa.Table:
    return pq.read_table(str(Path(out) / "quarantine.parquet"))


def write(path: Path, table: pa.Table) -> str:
    pq.write_table(table, str(path))
    return str(path)


def rows_table(rows: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def assert_accounted(manifest: dict, out: str) -> None:
    counts = manifest["counts"]
    assert counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"]
    assert dataset(out).num_rows == counts["rows_kept"] == sum(counts["rows_by_split"].values())
    assert quarantine(out).num_rows == counts["rows_quarantined"] == sum(counts["quarantined_by_reason"].values())


# --- the bad-input acceptance test -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_out(bad_catalog: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("bad_out"))
    return out, ingest(bad_catalog, TASKS, out, min_class_count=1)


def test_every_bad_row_is_kept_or_quarantined_with_its_reason(bad_out: tuple[str, dict]) -> None:
    out, manifest = bad_out
    assert manifest["counts"]["rows_in"] == 200 + len(BAD_ROWS) + 1
    assert_accounted(manifest, out)
    kept = set(dataset(out).column("product_id").to_pylist())
    q = quarantine(out).to_pylist()
    by_id = {r["product_id"]: r for r in q}
    for kind, reason in BAD_ROWS.items():
        pid = None if kind == "missing_id" else f"bad-{kind}"
        if reason is None:
            assert pid in kept and pid not in by_id, kind
        elif kind == "duplicate_id":
            assert pid in kept and by_id[pid]["reason"] == reasons.DUPLICATE_ID
            assert "labels" in by_id[pid]["detail"]
        else:
            assert by_id[pid]["reason"] == reason, (kind, by_id[pid])
            assert pid not in kept
    assert all(r["stage"] == "ingest" and r["reason"] in reasons.ALL and r["detail"] for r in q)
    assert manifest["counts"]["images_converted"] == 3  # png_alpha, cmyk_jpeg, grayscale


def test_converted_images_are_rgb_and_alpha_on_white(bad_out: tuple[str, dict]) -> None:
    out, _ = bad_out
    table = dataset(out).to_pydict()
    images = dict(zip(table["product_id"], table["image"]))
    for pid in ("bad-png_alpha", "bad-cmyk_jpeg", "bad-grayscale"):
        image = Image.open(io.BytesIO(images[pid]))
        assert image.mode == "RGB", pid
    corner = Image.open(io.BytesIO(images["bad-png_alpha"])).getpixel((0, 0))
    assert corner == (255, 255, 255)  # the transparent background became white


def test_titles_are_normalised(bad_out: tuple[str, dict]) -> None:
    out, _ = bad_out
    rows = {r["product_id"]: r for r in dataset(out).select(["product_id", "title"]).to_pylist()}
    messy = rows["bad-messy_title"]["title"]
    assert not any(unicodedata.category(c) == "Cc" for c in messy)
    assert "👗" in messy and "👩🏽\u200d💻" in messy            # emoji (and the ZWJ sequence) kept
    assert "فستان أحمر" in messy and "\u200f" in messy          # right-to-left text and mark kept
    assert messy == unicodedata.normalize("NFC", messy) and "  " not in messy
    assert messy.startswith("Acme Red Striped Dress")
    assert MESSY_TITLE != messy
    assert rows["bad-null_title"]["title"] is None


def test_manifest_labels_and_layout(bad_out: tuple[str, dict]) -> None:
    out, manifest = bad_out
    assert read_manifest(out).to_dict() == manifest
    labels = read_labels(out)
    assert set(labels) == {"color", "pattern", "style"}
    for task, doc in labels.items():
        assert doc["vocabulary"] == sorted(doc["vocabulary"]) == manifest["vocabularies"][task]
        assert sum(doc["counts"].values()) == manifest["counts"]["rows_kept"] - manifest["counts"]["labels_missing"][task]
    names = sorted(p.name for p in (Path(out) / "dataset").iterdir())
    assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names)
    assert sorted(p.name for p in Path(out).iterdir()) == ["dataset", "labels.json", "manifest.json", "quarantine.parquet"]
    schema = pq.read_schema(dataset_files(out, "train")[0]["uri"])
    assert schema.names == ["product_id", "title", "image", "color", "pattern", "style", "split"]
    assert manifest["input"]["fingerprint"] and manifest["input"]["files"][0]["version"].startswith("sha256:")


# --- file-level problems -----------------------------------------------------------------------------

def good_rows(n: int = 3) -> list[dict]:
    return [make_row(1, i) for i in range(n)]


@pytest.mark.parametrize("case, problem", [
    ("wrong_type", "column 'color' has type int64"),
    ("missing_product_id", "missing column 'product_id'"),
    ("empty_file", "empty file (0 bytes)"),
    ("zero_rows", "zero rows"),
    ("not_parquet", "not a readable Parquet file"),
    ("image_as_string", "column 'image' has type string"),
])
def test_file_level_problems_are_one_clear_error(tmp_path: Path, case: str, problem: str) -> None:
    path = tmp_path / "catalog.parquet"
    rows = good_rows()
    if case == "wrong_type":
        write(path, rows_table([r | {"color": i} for i, r in enumerate(rows)]))
    elif case == "missing_product_id":
        write(path, rows_table([{k: v for k, v in r.items() if k != "product_id"} for r in rows]))
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "zero_rows":
        write(path, rows_table(rows).slice(0, 0))
    elif case == "not_parquet":
        path.write_bytes(b"product_id,title\n1,a\n")
    elif case == "image_as_string":
        write(path, rows_table([r | {"image": "not bytes"} for r in rows]))
    out = tmp_path / "out"
    with pytest.raises(CatalogError) as err:
        ingest(str(path), TASKS, str(out))
    assert problem in str(err.value) and str(path) in str(err.value)
    assert err.value.uri == str(path)
    assert not (out / "manifest.json").exists()


def test_bad_file_in_a_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "cat"
    folder.mkdir()
    write(folder / "a.parquet", rows_table(good_rows()))
    write(folder / "b.parquet", rows_table([{k: v for k, v in r.items() if k != "style"} for r in good_rows()]))
    with pytest.raises(CatalogError, match=r"b\.parquet: missing column 'style'"):
        ingest(str(folder), TASKS, str(tmp_path / "out"))


def test_missing_catalog_and_bad_params(tmp_path: Path, tmp_catalog: str) -> None:
    with pytest.raises(CatalogError, match="no Parquet files"):
        ingest(str(tmp_path / "nope"), TASKS, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="splits"):
        ingest(tmp_catalog, TASKS, str(tmp_path / "out"), splits=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="not allowed"):
        ingest(tmp_catalog, "color,title", str(tmp_path / "out"))


# --- rules -------------------------------------------------------------------------------------------

def test_clean_catalog_splits_and_split_of(tmp_catalog: str, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    manifest = ingest(tmp_catalog, TASKS, out, splits=(0.6, 0.2, 0.2))
    assert_accounted(manifest, out)
    assert manifest["counts"]["rows_quarantined"] == 0
    table = dataset(out).select(["product_id", "split"]).to_pylist()
    assert all(split_of(r["product_id"], (0.6, 0.2, 0.2)) == r["split"] for r in table)
    shares = {s: n / 400 for s, n in manifest["counts"]["rows_by_split"].items()}
    assert abs(shares["train"] - 0.6) < 0.08 and abs(shares["test"] - 0.2) < 0.08
    for split in ("train", "validation", "test"):
        for part in dataset_files(out, split):
            assert set(pq.read_table(part["uri"], columns=["split"]).column(0).to_pylist()) == {split}


def test_split_is_stable_when_the_catalog_grows(tmp_path: Path) -> None:
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    write(small, rows_table([make_row(4, i) for i in range(60)]))
    write(big, rows_table([make_row(4, i) for i in range(120)]))
    ingest(str(small), TASKS, str(tmp_path / "a"), min_class_count=1)
    ingest(str(big), TASKS, str(tmp_path / "b"), min_class_count=1)
    a = {r["product_id"]: r["split"] for r in dataset(str(tmp_path / "a")).select(["product_id", "split"]).to_pylist()}
    b = {r["product_id"]: r["split"] for r in dataset(str(tmp_path / "b")).select(["product_id", "split"]).to_pylist()}
    assert all(b[k] == v for k, v in a.items())


def test_duplicates_resolved_deterministically_in_any_order(tmp_path: Path) -> None:
    base = good_rows(6)
    variants = [base[0] | {"color": c} for c in ("Red", "Blue", "Green")]
    rows = base + variants
    forward = write(tmp_path / "f.parquet", rows_table(rows))
    backward = write(tmp_path / "b.parquet", rows_table(rows[::-1]))
    results = []
    for name, path in (("f", forward), ("b", backward)):
        out = str(tmp_path / name)
        manifest = ingest(path, TASKS, out, min_class_count=1)
        assert manifest["counts"]["quarantined_by_reason"] == {"duplicate_id": 3}
        kept = {r["product_id"]: r["color"] for r in dataset(out).select(["product_id", "color"]).to_pylist()}
        results.append(kept)
        assert all(r["reason"] == "duplicate_id" and r["product_id"] == base[0]["product_id"]
                   for r in quarantine(out).to_pylist())
    assert results[0] == results[1]


def test_exact_copies_are_duplicates_too(tmp_path: Path) -> None:
    rows = good_rows(3)
    out = str(tmp_path / "out")
    manifest = ingest(write(tmp_path / "c.parquet", rows_table(rows + [rows[1]])), TASKS, out, min_class_count=1)
    assert manifest["counts"]["quarantined_by_reason"] == {"duplicate_id": 1}
    assert "exact copy" in quarantine(out).column("detail")[0].as_py()


def test_ids_that_differ_only_by_surrounding_whitespace_are_one_product(tmp_path: Path) -> None:
    """Ingest trims ids as scoring and publish do (pipeline.io.text.normalize_product_id), Unicode spaces too."""
    rows = good_rows(3)
    padded = [rows[0] | {"product_id": f" {rows[0]['product_id']}\u3000", "color": "Blue"},
              rows[1] | {"product_id": "\xa0"}]
    out = str(tmp_path / "out")
    manifest = ingest(write(tmp_path / "c.parquet", rows_table(rows + padded)), TASKS, out, min_class_count=1)
    assert manifest["counts"]["quarantined_by_reason"] == {"duplicate_id": 1, "product_id_missing": 1}
    assert sorted(dataset(out).column("product_id").to_pylist()) == sorted(r["product_id"] for r in rows)


def test_rare_classes_are_masked_not_dropped(tmp_path: Path) -> None:
    rows = [make_row(2, i) | {"color": "Red"} for i in range(8)] + \
           [make_row(2, 100 + i) | {"color": "Teal"} for i in range(2)]
    out = str(tmp_path / "out")
    manifest = ingest(write(tmp_path / "c.parquet", rows_table(rows)), TASKS, out, min_class_count=3)
    assert manifest["counts"]["rows_kept"] == 10
    assert manifest["counts"]["labels_masked_rare"]["color"] == {"Teal": 2}
    assert manifest["vocabularies"]["color"] == ["Red"]
    assert manifest["counts"]["labels_missing"]["color"] == 2
    colors = dataset(out).column("color").to_pylist()
    assert colors.count(None) == 2 and colors.count("Red") == 8


def test_labels_trimmed_and_mapped_and_nulls_kept(tmp_path: Path) -> None:
    raw = ["  Red ", "red", "RED\t", None, "  ", "Blue"]
    rows = [make_row(3, i) | {"color": c} for i, c in enumerate(raw)]
    out = str(tmp_path / "out")
    manifest = ingest(write(tmp_path / "c.parquet", rows_table(rows)), TASKS, out, min_class_count=1,
                      label_map={"color": {"red": "Red", "RED": "Red"}})
    assert manifest["vocabularies"]["color"] == ["Blue", "Red"]
    assert read_labels(out)["color"]["counts"] == {"Blue": 1, "Red": 3}
    assert manifest["counts"]["labels_missing"]["color"] == 2
    with pytest.raises(ValueError, match="label_map"):
        ingest(str(tmp_path / "c.parquet"), TASKS, out, label_map={"size": {}})


def test_long_titles_are_stored_cut(tmp_path: Path) -> None:
    rows = good_rows(3)
    rows[0]["title"] = "Acme Red Dress " + "with pockets " * 100_000  # 1.3 MB
    rows[1]["title"] = "\t" * MAX_TITLE_CHARS + rows[1]["title"]     # all padding up to the cut: nothing left
    out = str(tmp_path / "out")
    manifest = ingest(write(tmp_path / "c.parquet", rows_table(rows)), TASKS, out, min_class_count=1)
    assert manifest["counts"]["rows_kept"] == 3
    stored = dict(zip(*dataset(out).select(["product_id", "title"]).to_pydict().values()))
    for row in rows:  # what scoring reads from the same cell (pipeline.scoring.predictor.check_row)
        assert stored[row["product_id"]] == normalize_title(row["title"])
    assert len(stored[rows[0]["product_id"]]) == MAX_TITLE_CHARS
    assert stored[rows[1]["product_id"]] is None
    assert stored[rows[2]["product_id"]] == rows[2]["title"]


def test_dictionary_and_large_string_columns_are_text(tmp_path: Path) -> None:
    table = rows_table(good_rows(5))
    table = table.set_column(3, "color", table.column("color").dictionary_encode())
    table = table.set_column(1, "title", table.column("title").cast(pa.large_string()))
    out = str(tmp_path / "out")
    manifest = ingest(write(tmp_path / "c.parquet", table), TASKS, out, min_class_count=1)
    assert manifest["counts"]["rows_kept"] == 5


def test_folder_and_glob_inputs_and_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "cat"
    folder.mkdir()
    write(folder / "a.parquet", rows_table([make_row(6, i) for i in range(20)]))
    write(folder / "b.parquet", rows_table([make_row(6, i) for i in range(20, 45)]))
    (folder / "_SUCCESS").write_bytes(b"")
    m1 = ingest(str(folder), TASKS, str(tmp_path / "o1"), min_class_count=1)
    m2 = ingest(str(folder / "*.parquet"), TASKS, str(tmp_path / "o2"), min_class_count=1)
    assert m1["counts"]["rows_in"] == m2["counts"]["rows_in"] == 45
    assert m1["input"]["fingerprint"] == m2["input"]["fingerprint"]
    write(folder / "b.parquet", rows_table([make_row(6, i) for i in range(20, 46)]))
    m3 = ingest(str(folder), TASKS, str(tmp_path / "o1"), min_class_count=1)
    assert m3["input"]["fingerprint"] != m1["input"]["fingerprint"]


def test_rerun_replaces_previous_output_and_parts_roll(tmp_catalog: str, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first = ingest(tmp_catalog, TASKS, out, rows_per_part=100, row_group_rows=32)
    parts = first["files"]["dataset"]["train"]
    assert len(parts) >= 3 and all(p["rows"] <= 100 for p in parts)
    meta = pq.ParquetFile(dataset_files(out, "train")[0]["uri"]).metadata
    assert all(meta.row_group(i).num_rows <= 32 for i in range(meta.num_row_groups))
    second = ingest(tmp_catalog, TASKS, out)
    on_disk = sorted(p.name for p in (Path(out) / "dataset").iterdir())
    listed = sorted(Path(p["path"]).name for s in second["files"]["dataset"].values() for p in s)
    assert on_disk == listed  # no part of the first run is left behind
    assert dataset(out).num_rows == 400


def test_image_uri_column(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        row = make_row(8, i)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(row.pop("image"))
        rows.append(row | {"image_uri": f"img/{i}.jpg" if i % 2 else str(tmp_path / "img" / f"{i}.jpg")})
    rows.append(make_row(8, 9) | {"image_uri": "img/missing.jpg"})
    rows[-1].pop("image")
    out = str(tmp_path / "out")
    manifest = ingest(write(tmp_path / "c.parquet", rows_table(rows)), TASKS, out, min_class_count=1)
    assert manifest["counts"]["rows_kept"] == 4
    assert manifest["counts"]["quarantined_by_reason"] == {reasons.IMAGE_FETCH_FAILED: 1}
    assert "image" in dataset(out).column_names and "image_uri" not in dataset(out).column_names


def test_memory_filesystem_in_and_out() -> None:
    cat = "memory://ingest-test/catalog.parquet"
    with storage.atomic_output(cat) as f:
        pq.write_table(rows_table(good_rows(12)), f)
    manifest = ingest(cat, TASKS, "memory://ingest-test/out", min_class_count=1)
    assert manifest["counts"]["rows_kept"] == 12
    assert storage.exists("memory://ingest-test/out/manifest.json")
    storage.remove("memory://ingest-test", recursive=True)


def test_process_pool_gives_the_same_dataset(bad_catalog: str, bad_out: tuple[str, dict], tmp_path: Path) -> None:
    out = str(tmp_path / "pool")
    manifest = ingest(bad_catalog, TASKS, out, min_class_count=1, workers=2)
    assert manifest["counts"] == bad_out[1]["counts"]
    assert dataset(out).equals(dataset(bad_out[0]))
    assert quarantine(out).equals(quarantine(bad_out[0]))


def test_cli_ingest(tmp_catalog: str, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["ingest", "--catalog", tmp_catalog, "--tasks", TASKS, "--out", out,
                     "--min-class-count", "2", "--splits", "0.8,0.1,0.1"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_kept"] == 400
    assert cli.main(["ingest", "--catalog", str(tmp_path / "nope.parquet"), "--tasks", TASKS, "--out", out]) == 2
    assert "no Parquet files" in capsys.readouterr().err


# --- the real data set --------------------------------------------------------------------------------

@pytest.mark.slow
def test_fashion_small_end_to_end(fashion_small: str, tmp_path: Path) -> None:
    out = str(tmp_path / "fashion")
    manifest = ingest(fashion_small, "color,article_type,usage", out)
    assert_accounted(manifest, out)
    counts = manifest["counts"]
    assert counts["rows_in"] == 20193
    assert counts["rows_quarantined"] == 0  # PROVENANCE.md: every image decodes, ids are unique
    assert counts["images_converted"] == 184  # the grayscale JPEGs
    assert counts["labels_masked_rare"]["usage"] == {"Home": 1}
    assert "Casual" in manifest["vocabularies"]["usage"] and len(manifest["vocabularies"]["color"]) == 43
    assert abs(counts["rows_by_split"]["train"] / 20193 - 0.8) < 0.01  # speed: bench/ingest.py


def test_reading_an_unfinished_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(str(tmp_path))
