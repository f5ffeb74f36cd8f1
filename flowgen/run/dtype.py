"""The compute dtype of a run: `--dtype`, else $FLOWGEN_DTYPE, else auto (per backend).

"auto" is resolved by `RuntimeConfig` (bfloat16 on GPU/TPU, float32 on CPU). `flowgen plan` must
not import JAX, so it resolves "auto" against `flowgen.engine.guess_backend()`; `flowgen run` asks JAX itself.
"""

from __future__ import annotations

import os

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
