"""How this process's C heap (glibc malloc) treats the large buffers XLA's CPU backend allocates.

Two opposite needs, each applied where it pays:

* While loading a checkpoint, hand freed tensor-sized temporaries back to the OS before the next
  tensor (`release_free_heap`), so the load's peak stays near one copy of the params.
* While running on the CPU backend, keep freed buffers for reuse (`keep_freed_buffers`). Every
  XLA:CPU execution allocates its temporaries afresh; glibc serves large ones with mmap and returns
  them on free, so each call page-faults (and the kernel zeroes) hundreds of MB again: 120k minor
  faults and ~35 % of the wall time of a 4-reference pre-pass (bench/kv_speedup.py workload).
  The cost: the process keeps its high-water mark of host memory (as a caching allocator does).
  The thresholds govern only glibc's main arena: a thread that gets an arena of its own (as XLA's
  worker threads do, where they allocate a program's scratch) has heaps of at most 64 MiB, so a
  larger scratch (a VAE decode of two 256² images: 112 MiB) is mmapped and faulted in on every call
  whatever the thresholds say. So the setting also puts every thread on the main arena
  (M_ARENA_MAX = 1), which works only for threads that have not allocated yet: call it before the
  first JAX computation (`Pipeline.from_pretrained` does). bench/RESULTS.md "Host allocator".

Both are no-ops without glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_MMAP_THRESHOLD = 1 << 30  # buffers below 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = (1 << 31) - 1  # never shrink the heap on free (an explicit malloc_trim still does)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist only in glibc
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_keeping = False


def release_free_heap() -> None:
    """Return free heap pages to the OS now (malloc_trim(0))."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_freed_buffers() -> bool:
    """From now on keep large freed buffers in the heap for the next execution, and serve threads that
    have not allocated yet from the main arena (where that holds). Idempotent; call it before the
    first JAX computation, else XLA's worker threads keep arenas of their own (see the module doc).

    Process-wide: torch, when in the same process (the benchmarks), gets the same allocator.
    Returns whether the setting is in force.
    """
    global _keeping
    if _LIBC is not None and not _keeping:
        _keeping = (
            bool(_LIBC.mallopt(_M_ARENA_MAX, 1))
            and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
            and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        )
    return _keeping
