"""pyarrow's allocator for a step that streams a whole catalog through pyarrow in small batches (publish).

pyarrow's default allocator, mimalloc, keeps much of what it frees, and more the more batches pass through
it: publish at 5x fashion-small peaked 13% above 1x with mimalloc, though what pyarrow held at once was the
same (about 20 MB: `pa.total_allocated_bytes()`); with jemalloc, 5% (docs/benchmarks.md, "Scale").
Process-wide while the block runs: a buffer is freed by the pool that allocated it, whichever is the default
then.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa


@contextlib.contextmanager
def returning_freed_memory() -> Iterator[None]:
    """jemalloc (the system allocator where pyarrow has none) as pyarrow's default pool within the block."""
    previous = pa.default_memory_pool()
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)
