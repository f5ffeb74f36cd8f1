"""Engine test fixtures: JAX on the CPU unless told otherwise, and `tiny_pair`, a tiny sharpened diffusers
Flux2Transformer2DModel and the flowgen CompiledTransformer built from its `save_pretrained` output renamed to BFL keys.
Plain helpers live in the fixtures_*.py modules beside this file."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from flowgen.engine.transformer.config import Flux2Config
from tests.engine.fixtures_transformer import TINY, diffusers_to_bfl, set_kv_processors, sharpen_


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(diffusers model with KV processors, flowgen CompiledTransformer) on the same sharpened random weights."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from flowgen.engine.transformer.compiled import CompiledTransformer
    from flowgen.engine.weights.safetensors_io import open_safetensors

    torch.manual_seed(0)
    config = dict(TINY.to_diffusers())
    config.pop("_class_name")
    reference = Flux2Transformer2DModel(**config).eval()
    sharpen_(reference)
    folder = tmp_path_factory.mktemp("tiny_flux2")
    reference.save_pretrained(folder)
    tensors = open_safetensors(folder)
    ours = CompiledTransformer.from_bfl_tensors(Flux2Config.from_diffusers(folder), diffusers_to_bfl(
        {k: tensors[k] for k in tensors.keys()}
    ))
    set_kv_processors(reference)
    return reference, ours
