"""Stable reason codes for quarantined rows, defined once for ingest and scoring.

These strings are a public contract: they land in quarantine Parquet files and manifests, and users
filter on them. Add new codes; never rename or reuse one.
"""
from __future__ import annotations

PRODUCT_ID_MISSING = "product_id_missing"   # null or blank product_id
DUPLICATE_ID = "duplicate_id"               # another row has this id: ingest kept one, scoring keeps none
TITLE_NOT_TEXT = "title_not_text"           # title bytes are not valid UTF-8 text
LABEL_NOT_TEXT = "label_not_text"           # a label's bytes are not valid UTF-8 text
IMAGE_MISSING = "image_missing"             # null or zero-byte image
IMAGE_FETCH_FAILED = "image_fetch_failed"   # image_uri could not be read
IMAGE_UNDECODABLE = "image_undecodable"     # not an image Pillow can fully decode (truncated, garbage)
IMAGE_TOO_LARGE = "image_too_large"         # over the byte or pixel limit (decompression bombs)
IMAGE_TOO_SMALL = "image_too_small"         # a side below the minimum (e.g. 1x1 tracking pixels)
IMAGE_URI_REFUSED = "image_uri_refused"     # image_uri outside the allowed roots, schemes or hosts, or not a
                                            # regular file: refused without reading it (docs/security.md)

ALL: frozenset[str] = frozenset({
    PRODUCT_ID_MISSING, DUPLICATE_ID, TITLE_NOT_TEXT, LABEL_NOT_TEXT, IMAGE_MISSING,
    IMAGE_FETCH_FAILED, IMAGE_UNDECODABLE, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL, IMAGE_URI_REFUSED,
})
