"""Normalise titles and labels (Unicode NFC, control characters removed, whitespace collapsed) and
product ids (decoded, trimmed).

Only C0/C1 control characters (category Cc) are removed. Format characters (Cf) stay: the zero-width
joiner builds emoji sequences and the directional marks order right-to-left text, so both carry meaning.
Used by ingest and by scoring, so a title is cleaned the same way for training and for prediction, and
a product_id is the same key at ingest, at scoring and in publish.
"""
from __future__ import annotations

import functools
import sys
import unicodedata

import pyarrow as pa
import pyarrow.compute as pc

# Tabs and line breaks separate words; other controls (NUL, BEL, ESC...) are noise inside a word.
_SPACE_CONTROLS = "\t\n\r\v\f\x85"
# Category Cc is exactly C0 (U+0000-001F), DEL and C1 (U+007F-009F); stable across Unicode versions.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0)]
_DROP = {cp: None for cp in _CONTROLS if chr(cp) not in _SPACE_CONTROLS}
_TO_SPACE = {ord(c): " " for c in _SPACE_CONTROLS}
_TABLE = _DROP | _TO_SPACE
# Titles are cut to this many characters before anything else, so a megabyte-long title costs microseconds
# and the dataset never stores what no model reads: a 77-token CLIP context reads at most
# cmaclip.transforms.max_title_chars(77) = 2,541 characters, and the 4x margin leaves room for the
# whitespace and control characters that cleaning removes. (cmaclip imports torch; this module must not.)
MAX_TITLE_CHARS = 10_240


class NotText(ValueError):
    """Bytes that are not valid UTF-8 (a binary column holding something other than text)."""


def as_text(value: str | bytes | None) -> str | None:
    """A cell of a text column; binary cells (legacy writers omit the UTF-8 annotation) must be UTF-8."""
    if value is None or isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotText(f"not UTF-8 text: {bytes(value)[:16]!r}... ({exc.reason} at byte {exc.start})") from None


def clean(text: str | None) -> str | None:
    """NFC, controls removed, runs of whitespace collapsed to one space, trimmed; None if nothing is left."""
    if text is None:
        return None
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = " ".join(text.translate(_TABLE).split())
    return text or None


def normalize_product_id(value: str | bytes | None) -> str | None:
    """A product_id cell: decoded (NotText unless UTF-8), surrounding whitespace trimmed (`str.strip`), None if
    blank. Nothing else changes: ids are opaque keys, and NFC or case folding could merge two products."""
    text = as_text(value)
    return (text.strip() or None) if text is not None else None


@functools.cache
def _whitespace() -> str:
    """What `str.strip()` removes: every character whose `isspace()` is true (Unicode spaces, NEL, the
    separators U+001C-001F...), so Arrow's trim removes exactly the same ones."""
    return "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())


def normalize_product_ids(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`normalize_product_id` over a column of any text type (string, large/view string, dictionary, binary,
    null), vectorised for plan-time scans of a whole catalog; a cell that is not UTF-8 becomes null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    try:
        text = values.cast(pa.large_string())  # from binary, this validates UTF-8 for the whole column
    except pa.ArrowInvalid:
        return pa.array([_id_or_none(v) for v in values.to_pylist()], pa.large_string())
    trimmed = pc.utf8_trim(text, characters=_whitespace())
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.large_string()), trimmed)


def _id_or_none(value: bytes | None) -> str | None:
    try:
        return normalize_product_id(value)
    except NotText:
        return None


def normalize_title(value: str | bytes | None) -> str | None:
    """A title as ingest stores it and scoring reads it: its first MAX_TITLE_CHARS characters, cleaned."""
    text = as_text(value)
    return clean(text[:MAX_TITLE_CHARS] if text is not None else None)


def normalize_label(value: str | bytes | None, synonyms: dict[str, str] | None = None) -> str | None:
    """A label trimmed and cleaned, then mapped through `synonyms` (exact, case-sensitive match)."""
    label = clean(as_text(value))
    if label is not None and synonyms:
        label = clean(synonyms.get(label, label))
    return label


def normalize_labels(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`normalize_label` (no synonyms) over a column of any text type, computed once per distinct value:
    a column of labels holds few. A cell that is not UTF-8, or not text at all, becomes null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), pa.large_string())
    encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
    labels = [_label_or_none(v) for v in encoded.dictionary.to_pylist()]
    return pc.take(pa.array(labels, pa.large_string()), encoded.indices)


def _label_or_none(value: object) -> str | None:
    if not isinstance(value, (str, bytes)):
        return None
    try:
        return normalize_label(value)
    except NotText:
        return None
