"""The content hash of a catalog row: what a model reads of a product, its title and its image, as one digest.

Incremental scoring carries a prediction over only while the product's hash is still the one it was predicted
from (pipeline/scoring/carry_over.py), and every predictions row records the hash it was made from
(`content_hash`). Defined here once, for the plan (Arrow columns of a whole catalog), the shards and the pyfunc.

sha256 over a format tag, then each part as a presence byte, its length (8 bytes) and its bytes, so that
("ab", "c") and ("a", "bc") differ, and a null differs from an empty value; the first 32 hex digits (128 bits).
The parts are the bytes as stored: the title's UTF-8 bytes before cleaning (an edit that cleaning undoes still
rescores the row, which is never wrong and spares the plan cleaning every title), and the image's encoded bytes
(for `image_uri` rows, the fetched content: a URI that changes while its content does not changes nothing).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

FORMAT = b"cmaclip.content/1\x00"   # another definition gets another tag, so no hash of this one matches it
HEX_DIGITS = 32

Bytes = bytes | bytearray | memoryview


def content_hash(title: str | Bytes | None, image: Bytes | None) -> str:
    """The hash of one row: its title (text or its UTF-8 bytes) and its image bytes; None is a missing value."""
    digest = hashlib.sha256(FORMAT)
    for part in (title.encode("utf-8") if isinstance(title, str) else title, image):
        if part is None:
            digest.update(b"\x00")
        else:
            view = memoryview(part)
            digest.update(b"\x01" + view.nbytes.to_bytes(8, "big"))
            digest.update(view)
    return digest.hexdigest()[:HEX_DIGITS]


def content_hashes(titles: pa.Array | pa.ChunkedArray, images: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`content_hash` of each row of two Arrow columns of any text or binary type (a null type: all null)."""
    return pa.array([content_hash(t, i) for t, i in zip(cells(titles), cells(images))], pa.string())


def as_bytes(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A text or binary column (string, large, view, dictionary, null) as large_binary: each cell's bytes."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column if column.type == pa.large_binary() else column.cast(pa.large_binary())


def cells(column: pa.Array | pa.ChunkedArray) -> Iterator[memoryview | None]:
    """Each cell's bytes as a view into the column's buffer (no copy: a batch of images is hashed in place)."""
    column = as_bytes(column)
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = memoryview(data) if data is not None else memoryview(b"")
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            yield data[ends[i]:ends[i + 1]] if valid[i] else None
