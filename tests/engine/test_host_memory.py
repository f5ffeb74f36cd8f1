"""host_memory: on glibc, a large freed buffer is reused by the next allocation instead of being
unmapped and page-faulted in again (what every XLA:CPU execution pays otherwise)."""

import os
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


_THREAD_PROBE = """
import ctypes, resource, sys, threading
from flowgen.engine import host_memory
libc = host_memory._LIBC
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    host_memory.keep_freed_buffers()
faults = []
def worker(size=80 << 20):  # above a thread arena's largest heap (64 MiB), as XLA's worker threads' scratch
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = libc.malloc(size)
        ctypes.memset(buf, 1, size)
        libc.free(buf)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=worker)  # a thread that has not allocated before the setting
thread.start()
thread.join()
print(faults[-1])
"""


def test_a_new_threads_freed_buffers_are_reused_too():
    """The thresholds govern only the main arena: a thread with an arena of its own mmaps a large
    buffer on every allocation, so the setting also puts new threads on the main arena."""

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = (80 << 20) // 4096
    assert faults("default") > pages // 2  # control: the thread's own arena maps and faults it in again
    assert faults("keep") < pages // 20


_PIPELINE_ARENAS = """
import ctypes, os, sys
from flowgen.engine import host_memory
from flowgen.engine.pipeline import Pipeline
pipe = Pipeline.from_pretrained("flux2-klein-tiny", max_sequence_length=16)
pipe.generate(["a red fox"], seeds=[1], width=64, height=64, steps=1)
sys.stderr.flush()
os.dup2(sys.stdout.fileno(), 2)  # malloc_stats writes to fd 2
host_memory._LIBC.malloc_stats()
"""


def test_a_cpu_pipeline_runs_every_thread_on_the_main_arena():
    """from_pretrained sets the allocator before JAX's CPU backend starts its worker threads (set
    later, those threads keep arenas of their own, whose large scratch buffers fault in every call)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FLOWGEN_COMPILE_CACHE": "off"}
    out = subprocess.run(
        [sys.executable, "-c", _PIPELINE_ARENAS], capture_output=True, text=True, check=True, env=env, timeout=300
    )
    arenas = [line for line in out.stdout.splitlines() if line.startswith("Arena ")]
    assert arenas == ["Arena 0:"], out.stdout[-2000:]
