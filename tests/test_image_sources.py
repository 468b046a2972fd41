"""The image source policy: what an `image_uri` row may name, judged before anything is opened."""
from __future__ import annotations

import http.server
import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline import reasons
from pipeline.io import storage
from pipeline.io.image_sources import ImageSources, Refused, catalog_root, fetch_images, for_catalog


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """cat/ (the catalog's folder, with img/ and links out of it) beside outside/ (a secret)."""
    (tmp_path / "cat" / "img").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "cat" / "img" / "ok.png").write_bytes(_png())
    (tmp_path / "outside" / "secret.png").write_bytes(_png())
    (tmp_path / "cat" / "img" / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    (tmp_path / "cat" / "img" / "inner.png").symlink_to(tmp_path / "cat" / "img" / "ok.png")
    return tmp_path


REFUSED = ["../outside/secret.png", "img/../../outside/secret.png", "/etc/passwd", "file:///etc/shadow",
           "../../../../etc/passwd", "http://127.0.0.1:9/x.png", "https://169.254.169.254/latest/meta-data",
           "ftp://example.com/x.png", "sftp://host/x", "zip://x.png::file:///tmp/a.zip",
           "simplecache::file:///etc/passwd", "memory://other/x.png", "s3://another-bucket/x.png",
           "img/ok.png\x00.txt", "file://localhost/etc/passwd", "/dev/zero",
           "img/link.png"]


@pytest.mark.parametrize("value", REFUSED)
def test_values_outside_the_roots_are_refused(tree: Path, value: str) -> None:
    sources = for_catalog(str(tree / "cat" / "c.parquet"), roots=[], http_hosts=[])
    with pytest.raises(Refused):
        sources.resolve(value, str(tree / "cat" / "c.parquet"))


@pytest.mark.parametrize("value", ["img/ok.png", "./img/ok.png", "img/../img/ok.png", "img/inner.png"])
def test_values_inside_the_root_resolve(tree: Path, value: str) -> None:
    catalog = str(tree / "cat" / "c.parquet")
    resolved = for_catalog(catalog, roots=[], http_hosts=[]).resolve(value, catalog)
    assert resolved == os.path.realpath(tree / "cat" / "img" / "ok.png")


def test_absolute_and_file_uris_inside_the_root_resolve(tree: Path) -> None:
    catalog = str(tree / "cat" / "c.parquet")
    sources = for_catalog(catalog, roots=[], http_hosts=[])
    for value in (str(tree / "cat" / "img" / "ok.png"), f"file://{tree}/cat/img/ok.png"):
        assert sources.resolve(value, catalog).endswith("/cat/img/ok.png")


def test_a_configured_root_extends_the_catalog_root(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = str(tree / "cat" / "c.parquet")
    assert for_catalog(catalog, roots=[str(tree / "outside")]).resolve("../outside/secret.png", catalog)
    monkeypatch.setenv("CMACLIP_IMAGE_ROOTS", f"{tree / 'outside'}, s3://images/public/")
    sources = for_catalog(catalog)
    assert sources.resolve("img/link.png", catalog).endswith("outside/secret.png")
    assert sources.resolve("s3://images/public/a.jpg", catalog) == "s3://images/public/a.jpg"
    for near_miss in ("s3://images/public-evil/a.jpg", "s3://images/public/../private/a.jpg", "s3://images/a.jpg"):
        with pytest.raises(Refused):
            sources.resolve(near_miss, catalog)


def test_roots_of_files_folders_globs_and_buckets(tree: Path) -> None:
    assert catalog_root(str(tree / "cat" / "c.parquet")) == str(tree / "cat")
    assert catalog_root(str(tree / "cat")) == str(tree / "cat")
    assert catalog_root(str(tree / "cat" / "*" / "part-*.parquet")) == str(tree / "cat")
    assert catalog_root("memory://bucket/cat/c.parquet").endswith("bucket/cat")


def test_a_root_must_be_a_store_a_row_could_use() -> None:
    for bad in ("ftp://host/x", "http://host/x", "zip://a::file:///x"):
        with pytest.raises(ValueError):
            ImageSources((bad,))


def test_http_only_to_allow_listed_hosts_and_never_with_credentials(tree: Path) -> None:
    catalog = str(tree / "cat" / "c.parquet")
    sources = for_catalog(catalog, roots=[], http_hosts=["images.example.com", "cdn.example.com:8443"])
    assert sources.resolve("https://images.example.com/a.jpg", catalog)
    assert sources.resolve("https://cdn.example.com:8443/a.jpg", catalog)
    for refused in ("https://cdn.example.com/a.jpg", "http://images.example.com.evil.net/a.jpg",
                    "http://user:pw@images.example.com/a.jpg", "http://evil@127.0.0.1/a.jpg"):
        with pytest.raises(Refused):
            sources.resolve(refused, catalog)


class _Counting(http.server.BaseHTTPRequestHandler):
    """Serves /ok.png, redirects /redirect, stalls on /slow, streams a body over the limit on /huge."""
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.requests.append(self.path)
        if self.path == "/slow":
            time.sleep(5)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/internal")
            self.end_headers()
            return
        body = _png() if self.path == "/ok.png" else b"x" * 4096
        self.send_response(200)
        self.end_headers()  # no Content-Length: the reader must stop by counting
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> str:
    _Counting.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_no_request_reaches_a_host_that_is_not_allowed(tree: Path, server: str) -> None:
    catalog = str(tree / "cat" / "c.parquet")
    values = [f"http://{server}/ok.png", f"https://{server}/ok.png", f"http://localhost:{server.split(':')[1]}/x"]
    images, errors = fetch_images(values, catalog, for_catalog(catalog, roots=[], http_hosts=[]))
    assert images == [None] * 3 and {e[0] for e in errors.values()} == {reasons.IMAGE_URI_REFUSED}
    assert _Counting.requests == []


def test_allowed_http_reads_are_bounded_and_follow_no_redirect(tree: Path, server: str) -> None:
    catalog = str(tree / "cat" / "c.parquet")
    sources = ImageSources((str(tree / "cat"),), (server,), max_bytes=1024, read_timeout_s=0.5, row_timeout_s=1.0)
    values = [f"http://{server}/{p}" for p in ("ok.png", "redirect", "slow", "huge")]
    images, errors = fetch_images(values, catalog, sources)
    assert images[0] == _png() and set(errors) == {1, 2, 3}
    assert errors[1][0] == reasons.IMAGE_FETCH_FAILED and "302" in errors[1][1]
    assert errors[2][0] == reasons.IMAGE_FETCH_FAILED and "Timeout" in errors[2][1]
    assert errors[3][0] == reasons.IMAGE_TOO_LARGE
    assert "/internal" not in _Counting.requests


def test_fetch_reports_a_reason_per_row(tree: Path) -> None:
    catalog = str(tree / "cat" / "c.parquet")
    os.mkfifo(tree / "cat" / "img" / "pipe.png")
    values = ["img/ok.png", "img/pipe.png", "img", "img/missing.png", "../outside/secret.png", None, "  ",
              b"\xff\xfe"]
    images, errors = fetch_images(values, catalog, for_catalog(catalog, roots=[], http_hosts=[]))
    assert images[0] == _png() and images[5] is None and images[6] is None
    assert {i: e[0] for i, e in errors.items()} == {
        1: reasons.IMAGE_URI_REFUSED, 2: reasons.IMAGE_URI_REFUSED, 3: reasons.IMAGE_FETCH_FAILED,
        4: reasons.IMAGE_URI_REFUSED, 7: reasons.IMAGE_URI_REFUSED}


def test_object_store_reads_are_capped(tmp_path: Path) -> None:
    base = f"memory://sources-{os.getpid()}-{tmp_path.name}"
    storage.write_bytes(f"{base}/cat/img/a.png", _png())
    storage.write_bytes(f"{base}/cat/img/big.png", b"x" * 2048)
    storage.write_bytes(f"{base}/secret.png", _png())
    catalog = f"{base}/cat/c.parquet"
    sources = ImageSources((catalog_root(catalog),), max_bytes=1024)
    images, errors = fetch_images(["img/a.png", "img/big.png", "../secret.png"], catalog, sources)
    assert images[0] == _png()
    assert errors[1][0] == reasons.IMAGE_TOO_LARGE and errors[2][0] == reasons.IMAGE_URI_REFUSED
    storage.remove(base, recursive=True)
