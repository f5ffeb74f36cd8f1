"""Which JAX backend a process will run on, known without starting one (nor importing JAX).

`flowgen plan` must not import JAX, and the host allocator must be set before JAX's CPU backend
starts its worker threads (`host_memory`), so both ask `guess_backend()` instead of
`jax.default_backend()`, which would start every backend.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys


def guess_backend() -> str:
    """JAX's default backend: JAX's own answer once a backend is running; before that JAX's platforms
    setting (JAX_PLATFORMS), else an installed accelerator plugin whose device node exists, else "cpu"."""
    jax = sys.modules.get("jax")
    if jax is not None and _backends_started():
        return jax.default_backend()
    setting = jax.config.jax_platforms if jax is not None else os.environ.get("JAX_PLATFORMS")
    chosen = (setting or "").split(",")[0].strip().lower()
    if chosen:
        return chosen
    plugins = _jax_plugins()
    if any("cuda" in name for name in plugins) and os.path.exists("/dev/nvidiactl"):
        return "gpu"
    if any("rocm" in name for name in plugins) and os.path.exists("/dev/kfd"):
        return "rocm"
    if importlib.util.find_spec("libtpu") and glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    return "cpu"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge  # JAX keeps no public way to ask without starting them

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True  # then ask JAX itself, as a loaded JAX would be asked anyway


def _jax_plugins() -> set[str]:
    """Names of the installed PJRT plugins (as JAX discovers them), none of them imported."""
    names = {entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)}
    return names
