"""host_memory: on glibc, a large freed buffer is reused by the next allocation instead of being
unmapped and page-faulted in again (what every XLA:CPU execution pays otherwise)."""

import subprocess
import sys

import pytest

from flowgen.engine import host_memory

pytestmark = pytest.mark.skipif(host_memory._LIBC is None, reason="needs glibc malloc")

_PROBE = """
import ctypes, resource, sys
from flowgen.engine import host_memory
libc = host_memory._LIBC
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_buffers() and host_memory.keep_freed_buffers()
def faults_to_fill(size=64 << 20):  # above glibc's largest dynamic mmap threshold (32 MiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = libc.malloc(size)
    ctypes.memset(buf, 1, size)  # plain malloc + touch, as XLA:CPU does (numpy would madvise huge pages)
    libc.free(buf)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_to_fill()
print(faults_to_fill())
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_kept_buffers_are_reused_without_page_faults():
    pages = (64 << 20) // 4096
    assert _faults("default") > pages // 2  # control: glibc unmaps and faults the pages in again
    assert _faults("keep") < pages // 20


def test_release_free_heap_is_safe_to_call():
    host_memory.release_free_heap()
