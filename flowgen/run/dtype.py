"""The compute dtype of a run: `--dtype`, else $FLOWGEN_DTYPE, else auto (per backend).

"auto" is resolved by `RuntimeConfig` (bfloat16 on GPU/TPU, float32 on CPU). `flowgen plan` must
not import JAX, so it resolves "auto" against `guess_backend()`; `flowgen run` asks JAX itself.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

from flowgen.engine import RuntimeConfig
from flowgen.errors import FlowgenError

DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def dtype_setting(option: str | None) -> str:
    """The --dtype value, else FLOWGEN_DTYPE, else "auto"; a bad value is a one-line FlowgenError."""
    if option is not None:
        return checked_dtype(option, f"--dtype {option!r}")
    value = os.environ.get("FLOWGEN_DTYPE", "").strip()
    return checked_dtype(value, f"FLOWGEN_DTYPE={value!r}") if value else "auto"


def checked_dtype(value: str, label: str) -> str:
    if value not in DTYPE_CHOICES:
        raise FlowgenError(f"{label} is not allowed: use {', '.join(DTYPE_CHOICES[:-1])} or {DTYPE_CHOICES[-1]}")
    return value


def resolve_dtype(setting: str, backend: str | None = None) -> str:
    """'float32' or 'bfloat16': the setting itself, or what "auto" means on `backend` (default: JAX's)."""
    dtype = RuntimeConfig(dtype=None if setting == "auto" else setting).resolved(backend).dtype
    assert dtype is not None  # resolved() chooses one
    return dtype


def guess_backend() -> str:
    """JAX's default backend, without importing JAX unless it is loaded already: JAX_PLATFORMS,
    else an installed accelerator plugin whose device node exists, else "cpu"."""
    if "jax" in sys.modules:
        return sys.modules["jax"].default_backend()
    chosen = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
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


def _jax_plugins() -> set[str]:
    """Names of the installed PJRT plugins (as JAX discovers them), none of them imported."""
    names = {entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)}
    return names
