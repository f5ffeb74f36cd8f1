"""How this process's C heap (glibc malloc) treats the large buffers XLA's CPU backend allocates.

Two opposite needs, each applied where it pays:

* While loading a checkpoint, hand freed tensor-sized temporaries back to the OS before the next
  tensor (`release_free_heap`), so the load's peak stays near one copy of the params.
* While running on the CPU backend, keep freed buffers for reuse (`keep_freed_buffers`). Every
  XLA:CPU execution allocates its temporaries afresh; glibc serves large ones with mmap and returns
  them on free, so each call page-faults (and the kernel zeroes) hundreds of MB again: 120k minor
  faults and ~35 % of the wall time of a 4-reference pre-pass (bench/kv_speedup.py workload).
  The cost: the process keeps its high-water mark of host memory (as a caching allocator does).

Both are no-ops without glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

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
    """From now on keep large freed buffers in the heap for the next execution. Idempotent.

    Process-wide: torch, when in the same process (the benchmarks), gets the same allocator.
    Returns whether the setting is in force.
    """
    global _keeping
    if _LIBC is not None and not _keeping:
        _keeping = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        )
    return _keeping
