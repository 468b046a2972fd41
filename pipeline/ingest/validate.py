"""Row-level validation for ingest: one catalog row in, a clean row or a reason code out.

Pure and picklable (plain data in and out), so ingest can fan rows out to a process pool.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .. import reasons
from ..io.images import DEFAULT_LIMITS, ImageLimits, dataset_bytes, decode_image
from ..io.text import NotText, normalize_label, normalize_product_id, normalize_title

# (product_id, title, labels in task order, image bytes) as read from the catalog.
RawRow = tuple[Any, Any, tuple[Any, ...], "bytes | None"]


@dataclass(frozen=True)
class RowRules:
    tasks: tuple[str, ...]
    limits: ImageLimits = DEFAULT_LIMITS
    label_map: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> {synonym: label}


@dataclass(frozen=True, slots=True)
class Checked:
    """A validated row. `reason` set: quarantined. Else `image` is None when the catalog's own bytes are
    stored unchanged (saves shipping them back from a worker), or holds the re-encoded RGB image."""
    product_id: str | None
    reason: str | None = None
    detail: str = ""
    title: str | None = None
    labels: tuple[str | None, ...] = ()
    image: bytes | None = None
    image_sha: str = ""
    content_hash: str = ""


def _product_id(value: Any) -> str | None:
    try:
        return normalize_product_id(value)
    except NotText:
        return None


def _labels(raw: tuple[Any, ...], rules: RowRules) -> tuple[str | None, ...]:
    labels = []
    for task, value in zip(rules.tasks, raw):
        try:
            labels.append(normalize_label(value, rules.label_map.get(task)))
        except NotText as exc:
            raise NotText(f"{task}: {exc}") from None
    return tuple(labels)


def content_hash(image_sha: str, title: str | None, labels: tuple[str | None, ...]) -> str:
    """What dedup compares: the same image, title and labels give the same hash in any input order."""
    key = json.dumps([image_sha, title, list(labels)], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_row(row: RawRow, rules: RowRules) -> Checked:
    """Checks run cheapest first; the first failure is the row's reason."""
    raw_id, raw_title, raw_labels, data = row
    pid = _product_id(raw_id)
    if pid is None:
        return Checked(None, reasons.PRODUCT_ID_MISSING, f"product_id is {raw_id!r}")
    try:
        title = normalize_title(raw_title)
    except NotText as exc:
        return Checked(pid, reasons.TITLE_NOT_TEXT, str(exc))
    try:
        labels = _labels(raw_labels, rules)
    except NotText as exc:
        return Checked(pid, reasons.LABEL_NOT_TEXT, str(exc))
    decoded = decode_image(data, rules.limits)
    if not decoded.ok:
        return Checked(pid, decoded.reason, decoded.detail)
    assert data is not None
    stored = dataset_bytes(data, decoded)
    image_sha = hashlib.sha256(data).hexdigest()
    return Checked(pid, title=title, labels=labels, image=None if stored is data else stored,
                   image_sha=image_sha, content_hash=content_hash(image_sha, title, labels))


def check_rows(rows: list[RawRow], rules: RowRules) -> list[Checked]:
    """A chunk at a time: one pickled task per chunk keeps process-pool overhead small."""
    return [check_row(row, rules) for row in rows]
