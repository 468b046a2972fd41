"""The reader of `image_uri` catalogs: which URIs a row may name, and reading them within bounds.

A catalog row is untrusted (docs/security.md). Its `image_uri` is judged from the string alone, before
anything is opened: it must resolve under an allowed root (by default the catalog's own folder or bucket
prefix; more roots by configuration), through an allowed scheme, and http(s) only to allow-listed hosts.
A refused row is quarantined as `image_uri_refused`. Reads are then bounded: regular files only, at most
`max_bytes + 1` bytes read, a timeout per read and per row (`storage.read_bounded`, `http_reader.read_bounded`).
"""
from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence
from urllib.parse import urlsplit

from .. import reasons, settings
from . import storage
from .images import DEFAULT_LIMITS
from .text import NotText, as_text

# Stores a root may live on. Anything else fsspec can open (ftp, sftp, ssh, hdfs, zip, tar, data:, chained
# `a::b` URLs, caches) can reach beyond the catalog's storage, so it is refused.
ROOT_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "az", "abfs", "abfss", "memory"})
HTTP_SCHEMES = frozenset({"http", "https"})


class Refused(ValueError):
    """An `image_uri` the policy does not allow; nothing was opened."""


@dataclass(frozen=True)
class ImageSources:
    """What the rows of one catalog may read. Plain data: it travels in scoring plans and to workers."""
    roots: tuple[str, ...]
    http_hosts: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_LIMITS.max_bytes
    read_timeout_s: float = 5.0      # one network read (connect, or a chunk of the body)
    row_timeout_s: float = 10.0      # the whole fetch of one row's image
    _local_roots: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        roots = tuple(sorted({_normalized_root(r) for r in self.roots}))
        object.__setattr__(self, "roots", roots)
        object.__setattr__(self, "http_hosts", tuple(sorted({h.strip().lower() for h in self.http_hosts if h.strip()})))
        # Symlinks are followed when judging a local path, so the roots are compared in the same form.
        object.__setattr__(self, "_local_roots", tuple(_with_slash(os.path.realpath(r)) for r in roots
                                                       if "://" not in r))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageSources":
        return cls(tuple(d["roots"]), tuple(d.get("http_hosts", ())), int(d.get("max_bytes", DEFAULT_LIMITS.max_bytes)),
                   float(d.get("read_timeout_s", 5.0)), float(d.get("row_timeout_s", 10.0)))

    def resolve(self, value: str, catalog_file: str) -> str:
        """The URI a row's value names (relative values start from the catalog file's folder), or Refused."""
        if any(ord(c) < 0x20 or c == "\x7f" for c in value):
            raise Refused("control characters in image_uri")
        if "::" in value:
            raise Refused("chained fsspec URLs are not allowed")
        if "://" not in value and not value.startswith("/"):
            value = storage.join(catalog_file.rsplit("/", 1)[0], value)
        scheme = storage.protocol(value)
        if scheme in HTTP_SCHEMES:
            return self._check_http(value)
        if scheme not in ROOT_SCHEMES:
            raise Refused(f"scheme {scheme!r} is not allowed (allowed: {', '.join(sorted(ROOT_SCHEMES))})")
        uri = _normalized(value)
        if not any(_under(uri, root) for root in self.roots):
            raise Refused(f"{uri} is outside the allowed roots {list(self.roots)}")
        if "://" not in uri:
            real = os.path.realpath(uri)
            if not any(_under(real, root) for root in self._local_roots):
                raise Refused(f"{uri} is a link to {real}, outside the allowed roots")
            return real
        return uri

    def _check_http(self, uri: str) -> str:
        parts = urlsplit(uri)
        host = (parts.hostname or "").lower()
        named = {host, f"{host}:{parts.port}"} if parts.port else {host}
        if not self.http_hosts or not named & set(self.http_hosts):
            raise Refused(f"http(s) host {host!r} is not on the allow-list {list(self.http_hosts)}")
        if parts.username or parts.password:
            raise Refused("credentials in an image URL are not allowed")
        return uri


def _with_slash(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def _normalized(uri: str) -> str:
    """`..` and `.` folded and `file://` dropped, so a root comparison sees the path a store would open."""
    scheme = storage.protocol(uri)
    if scheme == "file":
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            raise Refused(f"{uri}: a file URI must hold an absolute path")
        return posixpath.normpath(path)
    path = posixpath.normpath(uri.split("://", 1)[1].lstrip("/"))
    if path in (".", "..") or path.startswith("../"):
        raise Refused(f"{uri} leaves its bucket")
    return f"{scheme}://{path}"


def _normalized_root(root: str) -> str:
    root = root.strip()
    if storage.protocol(root) not in ROOT_SCHEMES or "::" in root:
        raise ValueError(f"image root {root!r}: use a local folder or one of {sorted(ROOT_SCHEMES - {'file'})}")
    if "://" not in root:
        root = os.path.abspath(root)
    return _with_slash(_normalized(root))


def _under(uri: str, root: str) -> bool:
    return _with_slash(uri).startswith(root)


def catalog_root(catalog_uri: str) -> str:
    """The folder or bucket prefix of a catalog: a folder itself, a file's folder, a glob's fixed part."""
    fs, path = storage.filesystem(catalog_uri)
    if storage.has_magic(path):
        fixed = path[:min(path.find(c) for c in "*?[" if c in path)]
        folder = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
    else:
        folder = path if fs.isdir(path) else path.rsplit("/", 1)[0]
    return storage.to_uri(fs, folder or "/")


def for_catalog(catalog_uri: str, roots: Sequence[str] | None = None, http_hosts: Sequence[str] | None = None,
                max_bytes: int = DEFAULT_LIMITS.max_bytes) -> ImageSources:
    """The policy for a catalog: its own root plus `roots` (default: `CMACLIP_IMAGE_ROOTS`), the http(s)
    hosts `http_hosts` (default: `CMACLIP_IMAGE_HOSTS`; none when unset), `CMACLIP_IMAGE_TIMEOUT_S`."""
    extra = settings.image_roots() if roots is None else list(roots)
    hosts = settings.image_hosts() if http_hosts is None else list(http_hosts)
    timeout = settings.image_timeout_s()
    return ImageSources((catalog_root(catalog_uri), *extra), tuple(hosts), max_bytes, timeout / 2, timeout)


def fetch_images(values: Sequence[Any], catalog_files: str | Sequence[str],
                 sources: ImageSources) -> tuple[list[bytes | None], dict[int, tuple[str, str]]]:
    """The bytes behind each `image_uri` value (None where the value is empty), and for the rows that get
    none, (reason code, detail). `catalog_files` is the file the rows came from, or one per row. Values the
    policy refuses are never opened; reads run concurrently on object stores and http."""
    files = [catalog_files] * len(values) if isinstance(catalog_files, str) else list(catalog_files)
    images: list[bytes | None] = [None] * len(values)
    errors: dict[int, tuple[str, str]] = {}
    wanted: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, (value, file) in enumerate(zip(values, files)):
        try:
            text = as_text(value)
            if text and text.strip():
                uri = sources.resolve(text.strip(), file)
                wanted[storage.protocol(uri)].append((i, uri))
        except NotText as exc:
            errors[i] = (reasons.IMAGE_URI_REFUSED, f"image_uri {exc}")
        except Refused as exc:
            errors[i] = (reasons.IMAGE_URI_REFUSED, str(exc))
    for scheme, group in wanted.items():  # one filesystem per group: its reads can run concurrently
        data = _reader(scheme)([uri for _, uri in group], sources.max_bytes, sources.read_timeout_s,
                               sources.row_timeout_s)
        for (i, uri), got in zip(group, data):
            if isinstance(got, bytes):
                images[i] = got
            else:
                errors[i] = (_read_reason(got), f"cannot read {uri}: {type(got).__name__}: {got}")
    return images, errors


def _reader(scheme: str):
    """The bounded reader of a scheme: http(s) has its own (no redirects, no proxies), the rest fsspec's."""
    if scheme in HTTP_SCHEMES:
        from . import http_reader  # aiohttp only where an allow-list enables http
        return http_reader.read_bounded
    return storage.read_bounded


def _read_reason(error: Exception) -> str:
    if isinstance(error, storage.TooLarge):
        return reasons.IMAGE_TOO_LARGE
    if isinstance(error, storage.NotRegularFile):
        return reasons.IMAGE_URI_REFUSED
    return reasons.IMAGE_FETCH_FAILED
