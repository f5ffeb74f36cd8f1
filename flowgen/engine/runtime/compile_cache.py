"""JAX's persistent compilation cache, on by default, so a second process starts without compiling.

    enable()        # before the first compile: Pipeline.from_pretrained calls it

Where: `FLOWGEN_COMPILE_CACHE` — unset or empty: `<flowgen cache>/jax-compile` (`FLOWGEN_CACHE`,
see `weights.locate.flowgen_cache_dir`); `off`: no persistent cache; anything else: that folder.
A cache dir set for JAX itself (`JAX_COMPILATION_CACHE_DIR`) wins over the default, not over an
explicit `FLOWGEN_COMPILE_CACHE`.

Every program is written, however small or fast to compile (JAX's defaults skip programs that
compiled in under a second, which on a GPU is most of ours). A program holding a host callback is
never written by JAX: flowgen's programs hold none (the sampling loop reports progress between
program calls). JAX keys an entry by the program, the jaxlib version, the XLA flags and the devices,
so a cache is safe to share between runs and models; like any compiled code it is trusted input —
do not point it at a folder others can write.

JAX sets its cache up once per process, at the first compile: the first `enable()` decides.

`ahead_mark(description)` is where `sampling/ahead.py` notes that it compiled a program into the
cache: a later process finds the note and leaves that program to its first call, which reads it
back (compiling it ahead again would trace and lower it twice).

`stats()` counts, from JAX's own monitoring events, the programs this process compiled or found in
the cache and the seconds spent tracing, lowering and compiling them (the start-up report of a run;
tests assert cache hits from it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from flowgen.errors import CheckpointError

log = logging.getLogger(__name__)

ENV = "FLOWGEN_COMPILE_CACHE"
SUBFOLDER = "jax-compile"
AHEAD_MARKS = "flowgen-ahead"  # in the cache folder: one empty file per program compiled ahead

_enabled: Path | None = None
_decided = False

# JAX's monitoring events (jax._src.dispatch, jax._src.compiler)
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_PROGRAM_EVENT = "/jax/core/compile/backend_compile_duration"  # once per program handed to XLA (cache hit or not)
_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclass
class CompileStats:
    """What this process compiled since `watch()` (see `stats`)."""

    programs: int = 0  # programs handed to XLA: compiled, or read back from the persistent cache
    cache_requests: int = 0  # of those, looked up in the persistent cache
    cache_hits: int = 0  # found there (not compiled)
    seconds: float = 0.0  # tracing + lowering + compiling (or reading back)

    def as_dict(self) -> dict:
        return {"programs": self.programs, "cache_hits": self.cache_hits, "seconds": round(self.seconds, 3)}


_stats = CompileStats()
_stats_lock = threading.Lock()
_watching = False


def _on_event(event: str, **_) -> None:
    if event in (_REQUEST_EVENT, _HIT_EVENT):
        with _stats_lock:
            if event == _REQUEST_EVENT:
                _stats.cache_requests += 1
            else:
                _stats.cache_hits += 1


def _on_duration(event: str, duration_secs: float, **_: str | int) -> None:
    if event in _COMPILE_EVENTS:
        with _stats_lock:
            _stats.seconds += duration_secs
            _stats.programs += event == _PROGRAM_EVENT


def watch() -> None:
    """Start counting (idempotent; `enable()` calls it)."""
    global _watching
    if _watching:
        return
    import jax

    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _watching = True


def stats() -> CompileStats:
    """A copy of the counts since `watch()`."""
    with _stats_lock:
        return CompileStats(**vars(_stats))


def setting() -> Path | None:
    """The folder the cache should use now, or None for `off` (reads the environment only)."""
    from flowgen.engine.weights.locate import flowgen_cache_dir

    value = os.environ.get(ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    return flowgen_cache_dir() / SUBFOLDER


def enable() -> Path | None:
    """Turn the persistent cache on (or off) as the environment says; the folder in use, or None.

    Idempotent: only the first call in a process acts. An explicit folder that cannot be created is
    a one-line CheckpointError; the default folder failing only logs a warning (the run goes on,
    compiling as before).
    """
    global _enabled, _decided
    if _decided:
        return _enabled
    import jax

    watch()

    explicit = os.environ.get(ENV, "").strip()
    folder = setting()
    configured = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]  # a flag its stubs omit
    if folder is not None and not explicit and configured:
        folder = Path(configured)  # the user configured JAX's own cache
    _decided = True
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if explicit:
            raise CheckpointError(
                f"{ENV}={explicit}: cannot create the compile cache folder "
                f"({err.strerror}); give a writable folder or off"
            ) from None
        log.warning("compile cache off: cannot create %s (%s); set %s to a writable folder", folder, err.strerror, ENV)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor (0 lets JAX pick one)
    _enabled = folder
    return folder


def in_use() -> Path | None:
    """The folder `enable()` turned on in this process, or None."""
    return _enabled


def ahead_mark(description: str) -> Path | None:
    """The note that the program `description` names was compiled ahead into the cache in use (None:
    no cache in use). The note is keyed by the description and by everything else a program depends
    on: jax and jaxlib, the devices, XLA_FLAGS and the engine's source files, so a change of any of
    them compiles ahead again. A note whose cache entry is gone costs only a compile at first use."""
    folder = in_use()
    if folder is None:
        return None
    digest = hashlib.sha256(f"{description}\n{_environment()}".encode()).hexdigest()
    return folder / AHEAD_MARKS / digest


@functools.cache
def _environment() -> str:
    import jax
    import jaxlib

    devices = jax.devices()
    engine = Path(__file__).resolve().parents[1]
    sources = hashlib.sha256()
    for path in sorted(engine.rglob("*.py")):
        sources.update(path.relative_to(engine).as_posix().encode() + b"\0" + path.read_bytes())
    return repr(
        (
            jax.__version__,
            jaxlib.__version__,
            jax.default_backend(),
            devices[0].device_kind,
            len(devices),
            os.environ.get("XLA_FLAGS", ""),
            sources.hexdigest(),
        )
    )
