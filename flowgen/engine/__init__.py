"""The JAX/Flax port of FLUX.2 [klein]: transformer, VAE, Qwen3 text encoder, sampler, pipeline.

Public names are imported lazily so `import flowgen.engine` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Flux2Config": "flowgen.engine.config",
    "load_transformer": "flowgen.engine.transformer_loading",
    "Transformer": "flowgen.engine.transformer",
    "load_vae": "flowgen.engine.vae",
    "load_text_encoder": "flowgen.engine.text_encoder",
    "load_tokenizer": "flowgen.engine.tokenizer",
    "Pipeline": "flowgen.engine.pipeline",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flowgen.engine' has no attribute {name!r}")
