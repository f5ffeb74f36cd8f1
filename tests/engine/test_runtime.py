"""RuntimeConfig: per-backend defaults (dtype, attention path) and refused values."""

from __future__ import annotations

import pytest

from flowgen.engine.runtime import RuntimeConfig, default_dtype
from flowgen.errors import CheckpointError


@pytest.mark.parametrize("backend, dtype, attention", [
    ("cpu", "float32", "cpu"),
    ("gpu", "bfloat16", "cudnn"),
    ("cuda", "bfloat16", "cudnn"),
    ("rocm", "bfloat16", "xla"),
    ("tpu", "bfloat16", "xla"),  # a TPU must never take the CPU attention path
])
def test_auto_follows_the_backend(backend, dtype, attention):
    resolved = RuntimeConfig().resolved(backend)
    assert (resolved.dtype, resolved.attention) == (dtype, attention)
    assert default_dtype(backend) == dtype


def test_explicit_choices_win_over_the_backend():
    assert RuntimeConfig(dtype="float32").resolved("tpu").dtype == "float32"
    assert RuntimeConfig(dtype="bfloat16", attention="xla").resolved("cpu") == RuntimeConfig("bfloat16", "xla")


@pytest.mark.parametrize("field, value", [("dtype", "float16"), ("attention", "flash")])
def test_unknown_values_are_refused_naming_what_is_allowed(field, value):
    with pytest.raises(CheckpointError) as err:
        RuntimeConfig(**{field: value})
    assert repr(value) in str(err.value) and "allowed" in str(err.value)
