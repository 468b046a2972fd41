from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import cli
from pipeline.io import storage
from pipeline.synthetic import (BAD_ROWS, COLOR_WORDS, COLORS, MENTION_RATES, PATTERNS, ROW_GROUP_ROWS, STYLES,
                                bad_rows, make_catalog, make_product, make_row, measured_rates)


def test_vocabulary_sizes() -> None:
    assert len(COLORS) >= 10 and set(PATTERNS) == {"plain", "striped", "dotted", "checked"}
    assert len(STYLES) >= 4


def test_deterministic_by_seed(tmp_path) -> None:
    a, b, c = (str(tmp_path / n) for n in ("a.parquet", "b.parquet", "c.parquet"))
    make_catalog(120, a, seed=3)
    make_catalog(120, b, seed=3)
    make_catalog(120, c, seed=4)
    ta, tb, tc = pq.read_table(a), pq.read_table(b), pq.read_table(c)
    assert ta.equals(tb)
    assert ta.column("title").to_pylist() != tc.column("title").to_pylist()
    assert make_row(3, 7) == make_row(3, 7)  # a row does not depend on the rows before it


def test_schema_and_unique_ids(tmp_catalog: str) -> None:
    table = pq.read_table(tmp_catalog)
    assert table.schema.field("image").type == pa.binary()
    assert all(table.schema.field(n).type == pa.string() for n in ("product_id", "title", "color", "pattern", "style"))
    ids = table.column("product_id").to_pylist()
    assert len(set(ids)) == len(ids) == 400


def test_title_mention_rates_match_the_paper() -> None:
    rates = measured_rates(seed=1, rows=3000)
    for key, target in MENTION_RATES.items():
        assert abs(rates[key] - target) < 0.03, (key, rates[key])
    assert 0.01 <= rates["misleading"] <= 0.06


def test_mentions_agree_with_titles_unless_misleading() -> None:
    for i in range(300):
        product, _ = make_product(2, i)
        if "color" in product.mentions and not product.misleading:
            assert any(word in product.title for word in COLOR_WORDS[product.color])


def _share_near(image: Image.Image, rgb: tuple[int, int, int], tol: int = 40) -> float:
    pixels = np.asarray(image, dtype=np.int16)
    return float((np.abs(pixels - np.array(rgb)) <= tol).all(axis=-1).mean())


def test_image_shows_the_color() -> None:
    for i in range(60):
        row = make_row(9, i)
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        assert image.size == (64, 64)
        # The garment covers a good part of the picture, and its fill is mostly the base color.
        assert _share_near(image, COLORS[row["color"]]) > 0.12, (row["color"], row["pattern"], row["style"])


def test_written_in_row_groups_that_continue_each_other(tmp_path) -> None:
    """Rows are made and written one row group at a time (memory stays flat at any size), and each group
    continues the product sequence: the file equals the rows made one by one. Speed: the returned
    `rows_per_s`, not a test."""
    path = str(tmp_path / "catalog.parquet")
    stats = make_catalog(2 * ROW_GROUP_ROWS + 5, path, seed=0, image_size=16)
    assert (stats["rows"], stats["good_rows"], stats["bad_rows"]) == (2 * ROW_GROUP_ROWS + 5, 2 * ROW_GROUP_ROWS + 5, 0)
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 5]
    ids = pq.read_table(path, columns=["product_id"]).column("product_id").to_pylist()
    assert ids == [make_row(0, i, 16)["product_id"] for i in range(stats["rows"])]


def test_with_bad_rows_adds_one_of_each_kind(bad_catalog: str) -> None:
    table = pq.read_table(bad_catalog)
    assert table.num_rows == 200 + len(BAD_ROWS) + 1  # duplicate_id contributes two rows
    ids = table.column("product_id").to_pylist()
    for kind in BAD_ROWS:
        if kind != "missing_id":
            assert f"bad-{kind}" in ids
    assert ids.count("bad-duplicate_id") == 2 and ids.count(None) == 1
    # A per-row text type error needs an untyped (binary) column.
    assert table.schema.field("color").type == pa.binary()
    dup = [r for r in bad_rows(5) if r["product_id"] == "bad-duplicate_id"]
    assert dup[0]["color"] != dup[1]["color"]


def test_cli_make_catalog_to_memory(capsys) -> None:
    uri = "memory://synthetic-cli/catalog.parquet"
    assert cli.main(["make-catalog", "--rows", "30", "--out", uri, "--seed", "1", "--with-bad-rows"]) == 0
    assert '"rows": 46' in capsys.readouterr().out
    assert pq.read_table(storage.open_input(uri)).num_rows == 46
    storage.remove("memory://synthetic-cli", recursive=True)
