"""Hostile catalog rows, one kind at a time, through ingest and score (issue #17: each kind under 10 s).

    python bench/untrusted.py [--kinds uri-fifo_inside,uri-sparse_300mb]

Each kind is a catalog of that one row plus one good row (tests/hostile_corpus.py for the `image_uri`
kinds, pipeline.synthetic.BAD_ROWS for the image-bytes kinds). It is ingested and then scored with a tiny
random model; the bench records seconds per kind, checks that rows in = kept + quarantined (ingest) and
predicted + quarantined (score), and that nothing outside the catalog's folder was opened or requested.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench"), os.path.join(ROOT, "tests")]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

import cmaclip  # noqa: E402
from cmaclip.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from cmaclip.config import load_config  # noqa: E402
from common import report  # noqa: E402
from hostile_corpus import RequestCounter, uri_corpus  # noqa: E402
from pipeline import synthetic  # noqa: E402
from pipeline.ingest.dataset import ingest  # noqa: E402
from pipeline.scoring import distributor

TASKS = {"color": list(synthetic.COLORS), "pattern": list(synthetic.PATTERNS), "style": list(synthetic.STYLES)}


def tiny_checkpoint(folder: Path) -> str:
    config = load_config("tiny").with_tasks({t: len(v) for t, v in TASKS.items()})
    torch.manual_seed(0)
    save_checkpoint(folder, cmaclip.create_model(config, load_pretrained=False), Checkpoint(config, TASKS, {}, {}))
    return str(folder)


def corpora(root: Path, port: int):
    """(catalog of every kind, product_id -> kind) for the image_uri corpus and the image-bytes corpus,
    plus the FIFO detector that watches for reads outside the root."""
    uri_catalog, uri_expected, detector = uri_corpus(root / "uri", port)
    bytes_rows = synthetic.bad_rows(seed=3)
    bytes_catalog = root / "bytes" / "catalog.parquet"
    bytes_catalog.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(bytes_rows, schema=synthetic.catalog_schema(pa.binary())), bytes_catalog)
    return [(uri_catalog, "uri-relative"), (str(bytes_catalog), "bad-messy_title")], uri_expected, detector


def one_kind(catalog: str, pid: str | None, good: str, folder: Path, model: str) -> dict:
    """Ingest and score a catalog of the row `pid` (and the good row `good`) next to the original."""
    table = pq.read_table(catalog)
    ids = table.column("product_id").to_pylist()
    keep = [i for i, p in enumerate(ids) if p == pid or p == good]
    single = Path(catalog).parent / f"kind-{len(list(Path(catalog).parent.glob('kind-*')))}.parquet"
    pq.write_table(table.take(keep), single)
    started = time.perf_counter()
    manifest = ingest(str(single), ",".join(TASKS), str(folder / "ds"), min_class_count=1, workers=0)
    ingest_s = time.perf_counter() - started
    summary = distributor.score(str(single), model, str(folder / "sc"), workers=0, progress=False)
    total = time.perf_counter() - started
    counts = manifest["counts"]
    reconciled = (counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"] == len(keep)
                  and summary["rows_in"] == summary["predicted"] + summary["quarantined"] == len(keep))
    single.unlink()
    return {"ingest_s": round(ingest_s, 2), "score_s": round(total - ingest_s, 2), "seconds": round(total, 2),
            "reasons": counts["quarantined_by_reason"], "reconciled": reconciled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", help="comma-separated product ids (default: every kind)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every load that the tiny model is random
    for name in ("CMACLIP_IMAGE_ROOTS", "CMACLIP_IMAGE_HOSTS"):
        os.environ.pop(name, None)
    server = RequestCounter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-untrusted-") as tmp:
        root = Path(tmp)
        model = tiny_checkpoint(root / "model")
        catalogs, _, detector = corpora(root, server.port)
        wanted = set(args.kinds.split(",")) if args.kinds else None
        for catalog, good in catalogs:
            ids = pq.read_table(catalog, columns=["product_id"]).column("product_id").to_pylist()
            for pid in dict.fromkeys(ids):  # once per kind: duplicate_id is two rows
                name = pid or "bad-missing_id"
                if pid == good or (wanted and name not in wanted):
                    continue
                results[name] = one_kind(catalog, pid, good, root / "runs" / str(len(results)), model)
                print(f"{name:40s} {results[name]['seconds']:6.2f}s  {results[name]['reasons']}", flush=True)
        detector.close()
    server.close()
    slowest = max(results, key=lambda k: results[k]["seconds"])
    report("untrusted", {"kinds": len(results), "slowest_kind": slowest,
                         "slowest_s": results[slowest]["seconds"],
                         "all_reconciled": all(r["reconciled"] for r in results.values()),
                         "opened_outside_root": detector.opened, "http_requests": len(server.paths),
                         "per_kind_s": {k: r["seconds"] for k, r in results.items()}})


if __name__ == "__main__":
    main()
