"""Run-time settings of a loaded pipeline: what the weights compute in and which attention kernel runs.

    Pipeline.from_pretrained("klein-9b-kv", runtime=RuntimeConfig(dtype="bfloat16"))

Defaults follow the backend: bfloat16 weights and activations on GPU/TPU (the 9B is 36 GB in
float32), float32 on CPU (exact parity with the float32 reference, and XLA:CPU has no fast bf16
matmul). `attention` picks the kernel: "auto" is per backend (cuDNN-capable
`dot_product_attention` on NVIDIA GPUs, XLA's on TPU and ROCm, blocked matmuls on CPU), or force one of "xla", "cudnn",
"cpu". `mesh` lays the devices out (`mesh.py`): `data=D,model=M`, or None for the automatic mesh
(every local device on "data", weights replicated, unless they do not fit a device's memory).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from flowgen.engine.runtime.mesh import MeshSpec
from flowgen.errors import CheckpointError

DTYPES = ("float32", "bfloat16")
ATTENTION_PATHS = ("auto", "cpu", "xla", "cudnn")


@dataclass(frozen=True)
class RuntimeConfig:
    dtype: str | None = None  # None: per backend (see module doc)
    attention: str = "auto"
    mesh: str | None = None  # "data=D,model=M" (either may be left out); None: automatic (see module doc)

    def __post_init__(self):
        MeshSpec.parse(self.mesh)  # a one-line EngineInputError for anything but data=D,model=M
        if self.dtype is not None and self.dtype not in DTYPES:
            raise CheckpointError(f"dtype {self.dtype!r} is not supported (allowed: {', '.join(DTYPES)})")
        if self.attention not in ATTENTION_PATHS:
            raise CheckpointError(
                f"attention {self.attention!r} is not supported (allowed: {', '.join(ATTENTION_PATHS)})"
            )

    def resolved(self, backend: str | None = None) -> RuntimeConfig:
        """This config with "per backend" choices made for `backend` (default: JAX's default backend)."""
        if backend is None:
            import jax

            backend = jax.default_backend()
        accelerator = backend in ("gpu", "cuda", "rocm", "tpu")
        dtype = self.dtype or ("bfloat16" if accelerator else "float32")
        attention = self.attention
        if attention == "auto":
            # cuDNN only where NVIDIA's stack is; TPU and ROCm get XLA's fused attention, never the CPU path
            attention = "cpu" if not accelerator else ("cudnn" if backend in ("gpu", "cuda") else "xla")
        return replace(self, dtype=dtype, attention=attention)


def default_dtype(backend: str | None = None) -> str:
    """The dtype a run uses when none is asked for."""
    dtype = RuntimeConfig().resolved(backend).dtype
    assert dtype is not None  # resolved() chooses one
    return dtype
