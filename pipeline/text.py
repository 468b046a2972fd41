"""Normalise titles and labels: Unicode NFC, control characters removed, whitespace collapsed.

Only C0/C1 control characters (category Cc) are removed. Format characters (Cf) stay: the zero-width
joiner builds emoji sequences and the directional marks order right-to-left text, so both carry meaning.
Used by ingest and by scoring, so a title is cleaned the same way for training and for prediction.
"""
from __future__ import annotations

import unicodedata

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
