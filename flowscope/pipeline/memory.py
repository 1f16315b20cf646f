"""A long-running process gives the memory of each interval's batch back to the system once it is freed.

Every interval a FlowBatch is built, enriched, written and freed (about 40 MB at 100k flows, in blocks of
up to a few MB). With glibc's defaults the size above which malloc maps a block on its own rises to the
largest block freed so far (up to 32 MB), so later batches are carved from the heap and the threads' arenas,
which keep what is freed; pyarrow's default pool (mimalloc) keeps its freed pages as well, and small blocks
freed inside the heap stay until it is trimmed. bench/agent.py at 100k active flows (flow log and gRPC API
on), RSS at the end of the window in three runs each: 382-396 MB with the defaults, 270-312 with a fixed
128 KiB threshold and Arrow's system pool, 253-258 with the heap trimmed once per interval too, at the same
CPU share.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns the threshold's rise off
MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)  # the C library the interpreter runs on
except (OSError, TypeError):  # a statically linked interpreter, or no dlopen(NULL)
    _LIBC = None


def return_freed_memory() -> bool:
    """Keeps batch-sized blocks out of the heap (this process) and Arrow on the system allocator (this process
    and its children, unless ARROW_DEFAULT_MEMORY_POOL says otherwise); to be called before pandas is imported
    (which loads pyarrow). Returns whether the C library took the threshold (one other than glibc may have no
    mallopt)."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # read once, as pyarrow loads (with pandas)
    mallopt = getattr(_LIBC, "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def trim_heap() -> None:
    """Hands the free pages inside glibc's heap and arenas back to the system (small blocks of a freed batch
    that the threshold does not cover), where the C library can."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
