"""Bounded http(s) GETs for `image_uri` rows on allow-listed hosts (pipeline.io.image_sources decides which).

Not fsspec's HTTPFileSystem: it follows redirects (an allowed host could send a worker to an internal
one), reads the whole body of a server that ignores Range, and takes proxies from the environment.
"""
from __future__ import annotations

import asyncio

import aiohttp
import fsspec.asyn

from .storage import TooLarge

CHUNK = 1 << 16


def read_bounded(urls: list[str], max_bytes: int, read_timeout_s: float,
                 row_timeout_s: float) -> list[bytes | Exception]:
    """`storage.read_bounded` for http(s): each entry the bytes or the exception, the reads concurrent, each
    under `row_timeout_s` and `read_timeout_s` per connect or socket read, at most `max_bytes + 1` bytes."""
    return fsspec.asyn.sync(fsspec.asyn.get_loop(), read_all, urls, max_bytes, read_timeout_s, row_timeout_s)


async def read_all(urls: list[str], max_bytes: int, read_timeout_s: float,
                   row_timeout_s: float) -> list[bytes | Exception]:
    timeout = aiohttp.ClientTimeout(total=row_timeout_s, connect=read_timeout_s, sock_read=read_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        reads = (asyncio.wait_for(_get(session, url, max_bytes), row_timeout_s) for url in urls)
        return list(await asyncio.gather(*reads, return_exceptions=True))


async def _get(session: aiohttp.ClientSession, url: str, max_bytes: int) -> bytes:
    async with session.get(url, allow_redirects=False) as response:
        if response.status != 200:
            raise OSError(f"HTTP {response.status} (redirects are not followed)")
        if response.content_length is not None and response.content_length > max_bytes:
            raise TooLarge(f"{response.content_length} bytes > {max_bytes} byte limit")
        body, size = [], 0
        while size <= max_bytes:
            chunk = await response.content.read(min(CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            body.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"more than the {max_bytes} byte limit")
        return b"".join(body)
