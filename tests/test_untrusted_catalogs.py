"""Issue #17's acceptance: hostile catalogs through ingest and score. No traceback, no hang, every row kept
(predicted) or quarantined with its reason, counts reconciled, nothing opened outside the allowed roots
(a FIFO outside them detects any open; a local http server must receive no request)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from hostile_corpus import RequestCounter, secret_bytes, uri_corpus
from pipeline import synthetic
from pipeline.ingest.dataset import ingest
from pipeline.scoring import distributor, publish

TASKS = {"color": list(synthetic.COLORS), "pattern": list(synthetic.PATTERNS), "style": list(synthetic.STYLES)}

# A hang guard, not a timing assertion: a row that blocks a worker fails the test instead of stalling CI.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CMACLIP_IMAGE_ROOTS", raising=False)
    monkeypatch.delenv("CMACLIP_IMAGE_HOSTS", raising=False)
    server = RequestCounter()
    catalog, expected, detector = uri_corpus(tmp_path, server.port)
    yield catalog, expected
    detector.close()
    server.close()
    assert detector.opened == 0, "a row opened the FIFO outside the catalog's folder"
    assert server.paths == [], f"a row made a worker call a local http server: {server.paths}"


def _outcomes(kept_ids: list[str], quarantine: list[dict]) -> dict[str, str | None]:
    outcome = {pid: None for pid in kept_ids}
    for row in quarantine:
        assert row["product_id"] not in outcome, f"{row['product_id']} both kept and quarantined"
        outcome[row["product_id"]] = row["reason"]
    return outcome


def _row_outcomes(kept_ids: list[str | None], quarantine: list[dict]) -> dict[str | None, list[str]]:
    """Per product id, the sorted outcomes of its rows ('kept' or a reason): ids may repeat here."""
    outcome: dict[str | None, list[str]] = {}
    for pid, what in [(p, "kept") for p in kept_ids] + [(q["product_id"], q["reason"]) for q in quarantine]:
        outcome.setdefault(pid, []).append(what)
    return {pid: sorted(v) for pid, v in outcome.items()}


def test_hostile_image_uris_through_ingest(corpus, tmp_path: Path) -> None:
    catalog, expected = corpus
    out = str(tmp_path / "dataset")
    manifest = ingest(catalog, ",".join(TASKS), out, min_class_count=1)
    counts = manifest["counts"]
    assert counts["rows_in"] == len(expected) == counts["rows_kept"] + counts["rows_quarantined"]
    data = pads.dataset(str(Path(out, "dataset")), format="parquet").to_table()
    quarantine = pq.read_table(Path(out, "quarantine.parquet")).to_pylist()
    assert _outcomes(data.column("product_id").to_pylist(), quarantine) == expected
    assert secret_bytes(tmp_path) not in data.column("image").to_pylist()


def test_hostile_image_uris_through_score_and_publish(corpus, checkpoint: str, tmp_path: Path) -> None:
    catalog, expected = corpus
    out = str(tmp_path / "scores")
    summary = distributor.score(catalog, checkpoint, out, rows_per_shard=16, batch_size=8, workers=0, progress=False)
    assert summary["rows_in"] == len(expected) == summary["predicted"] + summary["quarantined"]
    predicted = pads.dataset(str(Path(out, "predictions")), format="parquet").to_table()
    quarantine = pads.dataset(str(Path(out, "quarantine")), format="parquet").to_table().to_pylist()
    assert _outcomes(predicted.column("product_id").to_pylist(), quarantine) == expected
    published = publish.publish(out, catalog=catalog)
    assert published["catalog_rows"] == len(expected)


def test_the_reason_codes_table_in_the_docs_is_the_code() -> None:
    """docs/contracts.md lists exactly the codes of pipeline/reasons.py, so a new code is documented."""
    import re

    from pipeline import reasons

    text = (Path(__file__).resolve().parents[1] / "docs" / "contracts.md").read_text()
    table = text.split("## Quarantine", 1)[1].split("\n## ", 1)[0].split("| reason | meaning |", 1)[1]
    assert set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)) == reasons.ALL


def _big_jpeg(side: int = 6000) -> bytes:
    """A smooth 36-megapixel photo-like JPEG, well under the 16 MiB byte limit."""
    import io

    from PIL import Image

    gradient = Image.linear_gradient("L").resize((side, side))
    buf = io.BytesIO()
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _bytes_corpus(folder: Path) -> tuple[str, dict, dict]:
    """Three files of one catalog, each with other legal column types: every bad-row kind of the synthetic
    corpus (binary text), a 1 MiB title, a 36 MP image and an id repeated across files with other
    whitespace (string), and a dictionary-typed file. (catalog, ingest outcomes, score outcomes)."""
    import pyarrow as pa

    folder.mkdir()
    bad = synthetic.bad_rows(seed=4)
    pq.write_table(pa.Table.from_pylist(bad, schema=synthetic.catalog_schema(pa.binary())), folder / "a.parquet")
    row = lambda i, pid, **kw: synthetic.make_row(41, i) | {"product_id": pid, **kw}  # noqa: E731
    strings = [row(0, "huge-title", title="Red Dress " * 100_000), row(1, "huge-image", image=_big_jpeg()),
               row(2, "dup-cross"), row(3, "plain-1")]
    pq.write_table(pa.Table.from_pylist(strings, schema=synthetic.catalog_schema()), folder / "b.parquet")
    dictionary = pa.Table.from_pylist([row(4, "\tdup-cross "), row(5, "plain-2")], schema=synthetic.catalog_schema())
    dictionary = dictionary.set_column(1, "title", dictionary.column("title").dictionary_encode())
    pq.write_table(dictionary, folder / "c.parquet")
    ingest_expected = {("bad-" + k if k != "missing_id" else None): [r or "kept"] for k, r in synthetic.BAD_ROWS.items()}
    ingest_expected["bad-duplicate_id"] = sorted(["kept", "duplicate_id"])
    ingest_expected.update({"huge-title": ["kept"], "huge-image": ["kept"], "plain-1": ["kept"], "plain-2": ["kept"],
                            "dup-cross": sorted(["kept", "duplicate_id"])})
    score_expected = dict(ingest_expected, **{"bad-label_not_text": ["kept"],  # scoring reads no labels
                                              "bad-duplicate_id": ["duplicate_id"] * 2, "dup-cross": ["duplicate_id"] * 2})
    return str(folder), ingest_expected, score_expected


def test_hostile_rows_and_type_mixes_through_ingest_score_and_publish(checkpoint: str, tmp_path: Path) -> None:
    catalog, ingest_expected, score_expected = _bytes_corpus(tmp_path / "catalog")
    out = str(tmp_path / "dataset")
    counts = ingest(catalog, ",".join(TASKS), out, min_class_count=1)["counts"]
    assert counts["rows_in"] == sum(map(len, ingest_expected.values())) == counts["rows_kept"] + counts["rows_quarantined"]
    data = pads.dataset(str(Path(out, "dataset")), format="parquet").to_table()
    quarantine = pq.read_table(Path(out, "quarantine.parquet")).to_pylist()
    assert _row_outcomes(data.column("product_id").to_pylist(), quarantine) == ingest_expected

    scores = str(tmp_path / "scores")
    summary = distributor.score(catalog, checkpoint, scores, rows_per_shard=8, batch_size=4, workers=0, progress=False)
    assert summary["rows_in"] == sum(map(len, score_expected.values())) == summary["predicted"] + summary["quarantined"]
    predicted = pads.dataset(str(Path(scores, "predictions")), format="parquet").to_table()
    quarantine = pads.dataset(str(Path(scores, "quarantine")), format="parquet").to_table().to_pylist()
    assert _row_outcomes(predicted.column("product_id").to_pylist(), quarantine) == score_expected
    published = publish.publish(scores, catalog=catalog)
    view = pq.read_table(published["catalog"]).to_pylist()
    assert len(view) == summary["rows_in"]
    assert all(r["predicted_color"] is None for r in view if (r["product_id"] or "").strip() == "dup-cross")
