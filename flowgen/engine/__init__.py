"""The JAX/Flax port of FLUX.2 [klein], and its one front door.

Code outside the engine imports from here only (`from flowgen.engine import Pipeline, ModelCard`),
never from a module inside it; the engine imports nothing of the workflow (recipe, plan, run,
serve, commands). tests/test_layers.py holds both rules. Names are imported on first use, so
`import flowgen.engine` stays cheap, and the workflow's JAX-free names (model cards, capabilities,
step-cache settings, reference files and image decoding, LoRA names) never load JAX.

The engine, by component:

    pipeline.py      Pipeline: prompts (+ references) -> images; request.py checks its arguments,
                     source.py says where its weights are, runtime.py what they compute in
    transformer/     the FLUX.2 transformer: config, blocks, rope, time embedding, attention,
                     positions (token ids), model (NNX module and its forward stages), compiled
                     (jit wrapper), checkpoint loading, params and keys (BFL <-> diffusers names)
    vae/             the autoencoder: config, blocks, model, checkpoint, keys
    text/            Qwen3 text encoder, tokenizer (+ the tiny one), prompt cache, checkpoint keys
    references/      reference files and image decoding, latents/K/V cache, a batch's layout
    sampling/        the compiled loop, samplers, schedules, scheduler names, step caches
    lora/            LoRA names -> files, reading adapters, merging them per batch
    faces/           face detection and refinement
    catalog/         JAX-free: model cards, capabilities, the embedded tiny model
    weights/         safetensors reading, where weights are on disk
    errors.py        EngineInputError (an argument the engine refuses), MeshPeerLost (a process of the mesh is gone)
    runtime/         dtype/attention settings, compile cache, device mesh and placement, which
                     backend runs (backend.py), CPU programs side by side on host threads
    host_memory.py, byte_lru.py   host-allocator settings; a byte-bounded LRU (shared by caches)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> "module" (same name there) or "module:name"
_EXPORTS = {
    # generation (loads JAX)
    "Pipeline": "flowgen.engine.pipeline",
    "Flux2Config": "flowgen.engine.transformer.config",
    "CompiledTransformer": "flowgen.engine.transformer.compiled",
    "load_transformer": "flowgen.engine.transformer.checkpoint",
    "convert_weights": "flowgen.engine.weights.orbax_checkpoint",
    "load_vae": "flowgen.engine.vae.model",
    "load_text_encoder": "flowgen.engine.text.qwen3",
    "load_tokenizer": "flowgen.engine.text.tokenizer",
    "refine_faces": "flowgen.engine.faces.refine",
    # JAX-free: what the workflow reads while validating, planning and preparing inputs
    "EngineInputError": "flowgen.engine.errors",
    "MeshPeerLost": "flowgen.engine.errors",
    "ModelCard": "flowgen.engine.catalog.cards",
    "list_cards": "flowgen.engine.catalog.cards",
    "resolve_model": "flowgen.engine.catalog.cards",
    "capabilities": "flowgen.engine.catalog.capabilities",
    "flowgen_cache_dir": "flowgen.engine.weights.locate",
    "resolve_source": "flowgen.engine.source",
    "RuntimeConfig": "flowgen.engine.runtime",
    "guess_backend": "flowgen.engine.runtime.backend",
    "compile_stats": "flowgen.engine.runtime.compile_cache:stats",
    "LoopShape": "flowgen.engine.sampling.ahead",
    "ReferenceSet": "flowgen.engine.sampling.ahead",
    "MeshSpec": "flowgen.engine.runtime.mesh",
    "mesh_for": "flowgen.engine.runtime.placement",
    "resolve_step_cache": "flowgen.engine.sampling.step_cache_settings:resolve",
    "step_cache_option_problems": "flowgen.engine.sampling.step_cache_settings:option_problems",
    "checked_lora_path": "flowgen.engine.lora.source",
    "ReferenceImageError": "flowgen.engine.references.files",
    "reference_sha256": "flowgen.engine.references.files",
    "image_header": "flowgen.engine.references.images",
    "load_image": "flowgen.engine.references.images",
    "reduced_for_preparation": "flowgen.engine.references.images",
    "MAX_SERVE_INPUT_PIXELS": "flowgen.engine.references.images",
    "FaceRefineSettings": "flowgen.engine.faces.refine",
    "FaceRefineResult": "flowgen.engine.faces.refine",
    "face_detector": "flowgen.engine.faces.detect",
    "ByteLRU": "flowgen.engine.byte_lru",
    "release_free_heap": "flowgen.engine.host_memory",
}

if TYPE_CHECKING:  # the same names for type checkers (tests/test_layers.py keeps this block and _EXPORTS in step)
    from flowgen.engine.byte_lru import ByteLRU
    from flowgen.engine.catalog.capabilities import capabilities
    from flowgen.engine.catalog.cards import ModelCard, list_cards, resolve_model
    from flowgen.engine.errors import EngineInputError, MeshPeerLost
    from flowgen.engine.faces.detect import face_detector
    from flowgen.engine.faces.refine import FaceRefineResult, FaceRefineSettings, refine_faces
    from flowgen.engine.host_memory import release_free_heap
    from flowgen.engine.lora.source import checked_lora_path
    from flowgen.engine.pipeline import Pipeline
    from flowgen.engine.references.files import ReferenceImageError, reference_sha256
    from flowgen.engine.references.images import (
        MAX_SERVE_INPUT_PIXELS,
        image_header,
        load_image,
        reduced_for_preparation,
    )
    from flowgen.engine.runtime import RuntimeConfig
    from flowgen.engine.runtime.backend import guess_backend
    from flowgen.engine.runtime.compile_cache import stats as compile_stats
    from flowgen.engine.runtime.mesh import MeshSpec
    from flowgen.engine.runtime.placement import mesh_for
    from flowgen.engine.sampling.ahead import LoopShape, ReferenceSet
    from flowgen.engine.sampling.step_cache_settings import option_problems as step_cache_option_problems
    from flowgen.engine.sampling.step_cache_settings import resolve as resolve_step_cache
    from flowgen.engine.source import resolve_source
    from flowgen.engine.text.qwen3 import load_text_encoder
    from flowgen.engine.text.tokenizer import load_tokenizer
    from flowgen.engine.transformer.checkpoint import load_transformer
    from flowgen.engine.transformer.compiled import CompiledTransformer
    from flowgen.engine.transformer.config import Flux2Config
    from flowgen.engine.vae.model import load_vae
    from flowgen.engine.weights.locate import flowgen_cache_dir
    from flowgen.engine.weights.orbax_checkpoint import convert_weights

__all__ = [  # what `from flowgen.engine import ...` may name (the keys of _EXPORTS)
    "Pipeline",
    "Flux2Config",
    "CompiledTransformer",
    "load_transformer",
    "convert_weights",
    "load_vae",
    "load_text_encoder",
    "load_tokenizer",
    "refine_faces",
    "EngineInputError",
    "MeshPeerLost",
    "ModelCard",
    "list_cards",
    "resolve_model",
    "capabilities",
    "flowgen_cache_dir",
    "resolve_source",
    "RuntimeConfig",
    "guess_backend",
    "compile_stats",
    "LoopShape",
    "ReferenceSet",
    "MeshSpec",
    "mesh_for",
    "resolve_step_cache",
    "step_cache_option_problems",
    "checked_lora_path",
    "ReferenceImageError",
    "reference_sha256",
    "image_header",
    "load_image",
    "reduced_for_preparation",
    "MAX_SERVE_INPUT_PIXELS",
    "FaceRefineSettings",
    "FaceRefineResult",
    "face_detector",
    "ByteLRU",
    "release_free_heap",
]


def __getattr__(name: str) -> Any:
    # Looked up on every access (not cached here), so a test that patches the defining module is seen.
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)
    raise AttributeError(f"module 'flowgen.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
