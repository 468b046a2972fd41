"""A hand-made corpus of hostile catalog rows, for tests/test_untrusted_catalogs.py and bench/untrusted.py.

`uri_corpus` writes an `image_uri` catalog whose rows try to read outside the catalog's folder, call a
local http server, hang a worker on a FIFO or /dev/zero, or exhaust memory; each kind is one row whose
product_id is `uri-<kind>`, with the reason ingest and scoring must give it (None: the row is good).
Secrets live in `outside/`: a FIFO whose opening a watcher thread detects, and a valid image whose bytes
must never reach a dataset.
"""
from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import reasons
from pipeline.synthetic import make_row

SEED = 23


class OpenDetector:
    """A FIFO: any process that opens it to read releases a writer thread here, which records it."""

    def __init__(self, path: Path):
        os.mkfifo(path)
        self.path, self.opened, self._closing = path, 0, False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closing:
            with open(self.path, "wb") as pipe:  # blocks until a reader opens the FIFO
                if not self._closing:
                    self.opened += 1
                    try:
                        pipe.write(b"secret")
                    except BrokenPipeError:
                        pass

    def close(self) -> None:
        self._closing = True
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # releases the writer one last time
        self._thread.join(5)
        os.close(fd)


class RequestCounter:
    """A local http server that must receive no request from a catalog row."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                paths.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _uri_kinds(root: Path, port: int) -> dict[str, tuple[str | None, str | None]]:
    """kind -> (image_uri value, expected reason). `root` holds cat/ (the catalog) and outside/."""
    cat, out = root / "cat", root / "outside"
    refused, failed = reasons.IMAGE_URI_REFUSED, reasons.IMAGE_FETCH_FAILED
    return {
        "relative": ("img/good.jpg", None),
        "absolute_inside": (str(cat / "img" / "good.jpg"), None),
        "file_uri_inside": (f"file://{cat}/img/good.jpg", None),
        "dotdot_inside": ("img/../img/good.jpg", None),
        "parent_escape": ("../outside/secret.png", refused),
        "parent_escape_real_image": ("../outside/secret.jpg", refused),
        "deep_escape": ("../../../../../../etc/passwd", refused),
        "absolute_outside": (str(out / "secret.png"), refused),
        "absolute_etc": ("/etc/passwd", refused),
        "file_uri_outside": (f"file://{out}/secret.png", refused),
        "file_uri_shadow": ("file:///etc/shadow", refused),
        "file_uri_with_host": ("file://localhost/etc/passwd", refused),
        "symlink_out": ("img/link-out.png", refused),
        "symlink_dev_zero": ("img/zero.png", refused),
        "dev_zero": ("/dev/zero", refused),
        "proc_environ": ("/proc/self/environ", refused),
        "fifo_inside": ("img/pipe.png", refused),
        "directory_inside": ("img", refused),
        "http_local": (f"http://127.0.0.1:{port}/secret.png", refused),
        "https_local": (f"https://127.0.0.1:{port}/secret.png", refused),
        "http_localhost_credentials": (f"http://user:pw@localhost:{port}/x.png", refused),
        "cloud_metadata": ("http://169.254.169.254/latest/meta-data/iam/", refused),
        "ftp": ("ftp://127.0.0.1/x.png", refused),
        "sftp": ("sftp://127.0.0.1/etc/passwd", refused),
        "chained_url": (f"simplecache::file://{out}/secret.png", refused),
        "zip_chain": (f"zip://secret.png::file://{out}/a.zip", refused),
        "other_bucket": ("s3://another-team/private/x.png", refused),
        "memory_store": ("memory://elsewhere/x.png", refused),
        "nul_in_uri": ("img/good.jpg\x00../../etc/passwd", refused),
        "newline_in_uri": ("img/good.jpg\nhttp://127.0.0.1/", refused),
        "sparse_300mb": ("img/huge.jpg", reasons.IMAGE_TOO_LARGE),
        "missing_file": ("img/missing.jpg", failed),
        "tilde": ("~/.ssh/id_rsa", failed),
        "very_long_uri": ("img/" + "a" * 100_000 + ".jpg", failed),
        "empty_uri": ("", reasons.IMAGE_MISSING),
        "blank_uri": ("   ", reasons.IMAGE_MISSING),
        "null_uri": (None, reasons.IMAGE_MISSING),
    }


def _layout(root: Path, good: bytes) -> OpenDetector:
    img, out = root / "cat" / "img", root / "outside"
    img.mkdir(parents=True)
    out.mkdir()
    (img / "good.jpg").write_bytes(good)
    (out / "secret.jpg").write_bytes(make_row(SEED, 999)["image"])  # a valid image: never to be ingested
    detector = OpenDetector(out / "secret.png")
    (img / "link-out.png").symlink_to(out / "secret.png")
    (img / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(img / "pipe.png")
    with open(img / "huge.jpg", "wb") as f:
        f.truncate(300 << 20)  # sparse: no disk, but 300 MB to whoever reads it
    return detector


def uri_corpus(root: Path, port: int) -> tuple[str, dict[str, str | None], OpenDetector]:
    """Write the corpus under `root`: (catalog file, product_id -> expected reason, FIFO detector)."""
    rows, expected = [], {}
    good = make_row(SEED, 0)["image"]
    detector = _layout(root, good)
    for n, (kind, (value, reason)) in enumerate(_uri_kinds(root, port).items()):
        row = make_row(SEED, n)
        del row["image"]
        row.update(product_id=f"uri-{kind}", image_uri=value)
        rows.append(row)
        expected[row["product_id"]] = reason
    catalog = root / "cat" / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(rows), catalog)
    return str(catalog), expected, detector


def secret_bytes(root: Path) -> bytes:
    return (root / "outside" / "secret.jpg").read_bytes()
