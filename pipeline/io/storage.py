"""One way to read, list and write any fsspec URI: local paths (default), `s3://`, `memory://`.

Writes are atomic: local files go to a temporary name in the target folder and are renamed into place;
object stores get the finished object in a single put, which they publish all at once. A reader therefore
never sees half a file, and a crashed writer leaves no file at the final name.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

import fsspec
import fsspec.asyn
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    import pyarrow.dataset as pads

# Files that are not data: Spark/Hadoop markers, our own temporary names, hidden files.
_HIDDEN_PREFIXES = ("_", ".")


def has_magic(path: str) -> bool:
    """True for a glob pattern."""
    return any(c in path for c in "*?[")


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def storage_options(uri: str) -> dict[str, Any]:
    """Per-protocol options. s3fs is given AWS_ENDPOINT_URL explicitly (MinIO, moto, on-prem S3), since
    not every botocore path reads that variable on its own."""
    if protocol(uri) in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem behind `uri` and the path within it."""
    return url_to_fs(uri, **storage_options(uri))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Path back to a URI; local paths stay plain paths so they read naturally in manifests and logs."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


class TooLarge(OSError):
    """A bounded read found more bytes than its limit (after reading at most limit + 1)."""


class NotRegularFile(OSError):
    """A bounded read refused a named pipe, device, socket or folder before reading from it."""


def read_bounded(uris: list[str], max_bytes: int, read_timeout_s: float,
                 row_timeout_s: float) -> list[bytes | Exception]:
    """Read many files of one store, each entry the bytes or the exception. Untrusted names are safe here:
    at most `max_bytes + 1` bytes are read of each, local reads take regular files only (a FIFO or
    /dev/zero is refused before a byte is read), and object-store reads run concurrently, each under
    `row_timeout_s`. Names are taken literally (no glob expansion, unlike `fs.cat(list)`). http(s) is not
    read through fsspec: `http_reader.read_bounded`."""
    if not uris:
        return []
    fs, _ = filesystem(uris[0])
    paths = [filesystem(u)[1] for u in uris]
    if getattr(fs, "async_impl", False):
        return fsspec.asyn.sync(fs.loop, _gather_bounded, fs, paths, max_bytes, row_timeout_s)
    read = _read_local if is_local(fs) else lambda p, n: _capped(fs.cat_file(p, start=0, end=n + 1), n)
    out: list[bytes | Exception] = []
    for path in paths:
        try:
            out.append(read(path, max_bytes))
        except Exception as exc:
            out.append(exc)
    return out


def _capped(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise TooLarge(f"more than the {max_bytes} byte limit")
    return data


def _read_local(path: str, max_bytes: int) -> bytes:
    if not stat.S_ISREG(os.stat(path).st_mode):  # stat opens nothing: a FIFO's open would block
        raise NotRegularFile(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd)
        if not stat.S_ISREG(size.st_mode):  # swapped after the stat
            raise NotRegularFile(f"{path} is not a regular file")
        if size.st_size > max_bytes:
            raise TooLarge(f"{size.st_size} bytes > {max_bytes} byte limit")
        return _capped(f.read(max_bytes + 1), max_bytes)


async def _gather_bounded(fs: fsspec.AbstractFileSystem, paths: list[str], max_bytes: int,
                          timeout_s: float) -> list[bytes | Exception]:
    async def one(path: str) -> bytes:
        return _capped(await asyncio.wait_for(fs._cat_file(path, start=0, end=max_bytes + 1), timeout_s), max_bytes)

    return list(await asyncio.gather(*(one(p) for p in paths), return_exceptions=True))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def open_input(uri: str) -> IO[bytes]:
    fs, path = filesystem(uri)
    return fs.open(path, "rb")


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def info(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    return fs.info(path)


def content_version(uri: str) -> str:
    """A cheap identity of a file's content: the object store's ETag where there is one, else the
    sha256 of the bytes (local and in-memory files, where reading them is cheap)."""
    fs, path = filesystem(uri)
    meta = fs.info(path)
    etag = meta.get("ETag") or meta.get("etag")
    if etag and not is_local(fs):
        return f"etag:{str(etag).strip(chr(34))}"
    with fs.open(path, "rb") as f:
        return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"


# What an object store reports that changes when the object does: version id (versioned S3), generation
# (GCS), ETag, and as the fallback every store has, modification time and size.
_VERSION_FIELDS = ("VersionId", "generation", "ETag", "etag", "md5Hash", "LastModified", "mtime", "updated",
                   "created", "size")


def object_version(meta: dict[str, Any]) -> str:
    """The identity of one version of an object, from its `fs.info` alone (no read)."""
    fields = {k: meta[k] for k in _VERSION_FIELDS if meta.get(k) is not None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fetch_to_cache(uri: str, cache_dir: str | os.PathLike) -> str:
    """A local path holding the file at `uri`: the path itself when it is local, else a copy under
    `cache_dir` fetched once per version of the object (`object_version`), so a replaced object is fetched
    again and an unchanged one costs one metadata call. The copy keeps the file name (loaders go by its
    extension) and appears only when whole."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return path
    meta = fs.info(path)
    if meta.get("type") != "file":
        raise FileNotFoundError(f"{uri} is not a file (fs.info type {meta.get('type')!r})")
    place = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = os.path.join(os.fspath(cache_dir), place, object_version(meta), os.path.basename(path))
    if os.path.isfile(target):
        return target
    with _local_atomic(target) as f, fs.open(path, "rb") as src:
        shutil.copyfileobj(src, f, 8 << 20)
        if meta.get("size") is not None and f.tell() != meta["size"]:  # replaced while we read it
            raise OSError(f"{uri}: fetched {f.tell()} bytes, the store reported {meta['size']}")
    return target


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a folder with `recursive`); a missing target is not an error."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def glob(pattern: str) -> list[str]:
    """Files and folders matching a glob pattern, as sorted URIs (none: an empty list)."""
    fs, path = filesystem(pattern)
    return sorted(to_uri(fs, p) for p in fs.glob(path))


def copy(src: str, dst: str) -> None:
    """Copy a file byte for byte; `dst` appears whole or not at all (`atomic_output`)."""
    with open_input(src) as f, atomic_output(dst) as out:
        shutil.copyfileobj(f, out, 8 << 20)


def newest_modification(uri: str) -> float | None:
    """When a file, or the newest file under a folder, was last written (seconds since the epoch), as the
    store reports it in one listing; None when there is nothing there or the store reports no time."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return None
    found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    times = [t for t in map(_modified, found.values()) if t is not None]
    return max(times, default=None)


def _modified(info: dict[str, Any]) -> float | None:
    """The modification time in an fsspec `info`: local `mtime`, S3 `LastModified`, GCS `updated`, memory
    `created` (a float, a datetime or an ISO string)."""
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _visible(path: str) -> bool:
    return not path.rstrip("/").rsplit("/", 1)[-1].startswith(_HIDDEN_PREFIXES)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Data files under a folder (recursively), matching a glob, or the file itself; sorted URIs.

    Hidden and underscore-prefixed names (temporary files, `_SUCCESS`) are skipped.
    """
    fs, path = filesystem(uri)
    if has_magic(path):
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if _visible_below(p, path)]
    elif fs.isfile(path):
        return [to_uri(fs, path)]
    else:
        return []
    return sorted(to_uri(fs, p) for p in found if _visible(p) and p.endswith(suffix))


def _visible_below(path: str, root: str) -> bool:
    rel = path[len(root.rstrip("/")):].strip("/")
    return all(not part.startswith(_HIDDEN_PREFIXES) for part in rel.split("/"))


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[IO[bytes]]:
    """A binary file to write; it appears at `uri` only if the block finishes without an exception."""
    fs, path = filesystem(uri)
    if is_local(fs):
        with _local_atomic(path) as f:
            yield f
        return
    with tempfile.NamedTemporaryFile(prefix="cmaclip-", suffix=".part") as tmp:
        yield tmp
        tmp.flush()
        fs.put_file(tmp.name, path)  # one object, published whole by the store


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[IO[bytes]]:
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if is_local(fs):
        with _local_atomic(path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow's native local filesystem where possible (faster), else fsspec wrapped for pyarrow."""
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def parquet_file(uri: str, buffer_size: int = 0) -> pq.ParquetFile:
    """An open Parquet file (footer read, no data yet). `buffer_size` > 0 reads a column chunk page by page
    through a buffer of that size, instead of whole: a row group of large images then costs its pages. It
    also turns pyarrow's pre-buffering off, which would otherwise cache every row group a read asks for
    (iter_batches over a whole file: the file)."""
    return pq.ParquetFile(open_input(uri), buffer_size=buffer_size, pre_buffer=not buffer_size)


def parquet_files(uri: str) -> list[str]:
    """The files of a Parquet dataset given as a file, a folder (its `*.parquet` files) or a glob."""
    fs, path = filesystem(uri)
    if not has_magic(path) and fs.isdir(path):
        return list_files(uri, suffix=".parquet")
    return list_files(uri)


def open_parquet_dataset(uri: str) -> pads.Dataset:
    """A Parquet file, folder or glob as one pyarrow dataset, read through the URI's filesystem."""
    import pyarrow.dataset as pads  # here, not above: it imports pandas, half a second each ingest process pays
    files = parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {uri}")
    fs, _ = filesystem(files[0])
    paths = [filesystem(f)[1] for f in files]
    return pads.dataset(paths, format="parquet", filesystem=arrow_filesystem(fs))


def register_duckdb(con: Any, uri: str) -> None:
    """Let DuckDB read `uri` through fsspec: the httpfs extension cannot be downloaded offline, and one
    code path for every store is simpler anyway. Local paths need nothing."""
    fs, _ = filesystem(uri)
    if not is_local(fs):
        # Once per connection and protocol: DuckDB refuses a second registration (catalog and output on
        # the same store).
        names = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if not names & set(con.list_filesystems()):
            con.register_filesystem(fs)
