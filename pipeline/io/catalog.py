"""Read a catalog by its contract (docs/contracts.md): a Parquet file, folder or glob on any URI.

File-level problems (no files, empty or unreadable file, missing or mistyped column, no rows at all) raise
one `CatalogError` naming the file and the problem, before any row is processed. Row-level problems are
not this module's business: it hands rows on as plain Python values.

Text columns (`product_id`, `title`, tasks) may be string, large/view string, dictionary-encoded string
(pandas categoricals) or binary: legacy writers store text as BYTE_ARRAY without the UTF-8 annotation, and
a cell there that is not UTF-8 is a row-level error. Integers, floats, lists... are file-level errors.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

REQUIRED_TEXT = ("product_id", "title")
IMAGE_COLUMNS = ("image", "image_uri")
READ_BUFFER = 1 << 20     # rows are read page by page through this buffer, not a column chunk at once


class CatalogError(ValueError):
    """A catalog file cannot be ingested at all; `uri` names the file, `problem` says why."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"catalog file {uri}: {problem}")
        self.uri = uri
        self.problem = problem


@dataclass(frozen=True)
class CatalogFile:
    uri: str
    name: str            # path relative to the catalog root: what the fingerprint records
    rows: int
    size: int
    version: str         # ETag or sha256 of the content
    image_column: str    # "image" (bytes) or "image_uri" (an fsspec URI per row)


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_text_type(t: pa.DataType) -> bool:
    t = _value_type(t)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or is_bytes_type(t) or pa.types.is_null(t))


def is_bytes_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _require(uri: str, schema: pa.Schema, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise CatalogError(uri, f"column {name!r} has type {schema.field(name).type}; expected {expected}")


def image_column(uri: str, schema: pa.Schema) -> str:
    if "image" in schema.names:
        t = _value_type(schema.field("image").type)
        _require(uri, schema, "image", is_bytes_type(t) or pa.types.is_null(t), "binary (image bytes)")
        return "image"
    if "image_uri" in schema.names:
        _require(uri, schema, "image_uri", is_text_type(schema.field("image_uri").type), "string (a URI)")
        return "image_uri"
    raise CatalogError(uri, f"missing column 'image' (or 'image_uri'); columns are {schema.names}")


def check_schema(uri: str, schema: pa.Schema, tasks: tuple[str, ...]) -> str:
    """Raise CatalogError unless the file has every needed column with a usable type; the image column."""
    for name in (*REQUIRED_TEXT, *tasks):
        if name not in schema.names:
            raise CatalogError(uri, f"missing column {name!r}; columns are {schema.names}")
        _require(uri, schema, name, is_text_type(schema.field(name).type), "string")
    return image_column(uri, schema)


def open_parquet(uri: str, buffer_size: int = 0) -> pq.ParquetFile:
    try:
        if storage.size(uri) == 0:
            raise CatalogError(uri, "empty file (0 bytes)")
        return storage.parquet_file(uri, buffer_size)
    except CatalogError:
        raise
    except Exception as exc:  # pyarrow and fsspec raise many types for a bad or missing file
        raise CatalogError(uri, f"not a readable Parquet file ({type(exc).__name__}: {exc})") from exc


def _relative_names(uris: list[str]) -> list[str]:
    if len(uris) == 1:
        return [posixpath.basename(uris[0])]
    root = posixpath.commonpath([u.split("://", 1)[-1] for u in uris])
    return [posixpath.relpath(u.split("://", 1)[-1], root) for u in uris]


def check(catalog_uri: str, tasks: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """Resolve and check every file of the catalog from its footer alone (no data read, no content
    hashed): (uri, rows, image column) per file; CatalogError on any problem."""
    try:
        uris = storage.parquet_files(catalog_uri)
    except Exception as exc:
        raise CatalogError(catalog_uri, f"cannot list ({type(exc).__name__}: {exc})") from exc
    if not uris:
        raise CatalogError(catalog_uri, "no Parquet files found (give a file, a folder of .parquet files or a glob)")
    checked = []
    for uri in uris:
        pf = open_parquet(uri)
        checked.append((uri, pf.metadata.num_rows, check_schema(uri, pf.schema_arrow, tasks)))
    if sum(rows for _, rows, _ in checked) == 0:
        raise CatalogError(catalog_uri, "zero rows in the catalog: nothing to ingest")
    return checked


def scan(catalog_uri: str, tasks: tuple[str, ...]) -> list[CatalogFile]:
    """`check`, then each file's name, size and content version; raise CatalogError on any problem."""
    checked = check(catalog_uri, tasks)
    names = _relative_names([uri for uri, _, _ in checked])
    return [CatalogFile(uri, name, rows, storage.size(uri), storage.content_version(uri), column)
            for (uri, rows, column), name in zip(checked, names)]


def fingerprint(files: list[CatalogFile]) -> str:
    """Identity of the input snapshot: file names, sizes and content versions."""
    listing = [[f.name, f.size, f.version] for f in files]
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def iter_rows(file: CatalogFile, tasks: tuple[str, ...], batch_rows: int,
              row_groups: list[int] | None = None) -> Iterator[dict[str, list[Any]]]:
    """The file's columns (of `row_groups`, default all) as Python lists, `batch_rows` at a time; column
    chunks are read page by page (READ_BUFFER), so memory stays bounded whatever the row group size."""
    columns = ["product_id", "title", file.image_column, *tasks]
    pf = open_parquet(file.uri, READ_BUFFER)
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns, row_groups=row_groups):
            yield {name: batch.column(name).to_pylist() for name in columns}
    except CatalogError:
        raise
    except Exception as exc:
        raise CatalogError(file.uri, f"unreadable data ({type(exc).__name__}: {exc})") from exc
