"""One forward: `transformer.forward` is its stages (embed -> blocks -> final layer), and the step-cached
loop is built from the same stages.

* the stages over any split of the block stack (the cache's front / middle / back ranges) give the
  forward's velocity bit for bit, with per-row reference K/V and masked padding;
* a step cache that never skips renders exactly the uncached images through the whole pipeline:
  text-to-image, KV-reference edits and concatenated-reference edits with CFG, batches of 2;
* the cache module reaches the transformer only through those stages (it computes no part of it).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flowgen.engine.sampling import step_cache
from flowgen.engine.transformer import model as transformer
from flowgen.engine.transformer.compiled import CompiledTransformer
from flowgen.engine.transformer.config import Flux2Config
from flowgen.engine.transformer.positions import image_ids, reference_ids, text_ids

# tiny-model pipelines rendered with and without step caches: minutes on CPU
pytestmark = pytest.mark.slow

CONFIG = Flux2Config(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=48,
                     axes_dim=(8, 8, 8, 8))
B, H, W, T, R = 2, 4, 4, 8, 12
TOTAL = CONFIG.depth + CONFIG.depth_single_blocks


@pytest.fixture(scope="module")
def inputs():
    tr = CompiledTransformer.random(CONFIG, seed=0)
    x = jax.random.normal(jax.random.key(0), (B, H * W, 128))
    txt = jax.random.normal(jax.random.key(1), (B, T, 48))
    t = jnp.asarray([0.9, 0.4], jnp.float32)
    refs = jax.random.normal(jax.random.key(2), (B, R, 128))
    lengths = jnp.asarray([R, 7], jnp.int32)  # row 1's references are padded: its tail is masked
    kv = tr.reference_kv(refs, reference_ids([(3, 4)]), key_lengths=lengths)
    key_lengths = T + H * W + lengths
    return tr, (x, tr.rope(image_ids(H, W)), t, txt, tr.rope(text_ids(T))), kv, key_lengths


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _staged(graphdef, start, stop, params, args, ref_kv, key_lengths):
    """The stages over blocks [0, start), [start, stop), [stop, total), as the cached loop runs them: the
    range that ends the stack through `image_after`, the others through `run_blocks`."""
    model = nnx.merge(graphdef, params)
    x, rope_img, t, txt, rope_txt = args
    step_inputs, streams = transformer.embed(model, x, rope_img, t, txt, rope_txt, key_lengths)
    *leading, last = [(a, b) for a, b in ((0, start), (start, stop), (stop, TOTAL)) if a < b]
    for a, b in leading:
        streams = transformer.run_blocks(step_inputs, streams, transformer.block_range(model, ref_kv, a, b))
    img = transformer.image_after(step_inputs, streams, transformer.block_range(model, ref_kv, *last))
    return transformer.velocity(model, step_inputs, img)


@pytest.mark.parametrize("with_refs", [False, True])
def test_the_stages_over_any_split_of_the_blocks_are_the_forward(inputs, with_refs):
    tr, args, kv, key_lengths = inputs
    ref_kv, lengths = (kv, key_lengths) if with_refs else (None, None)
    whole = np.asarray(tr.forward_fn(tr.params, *args, ref_kv, lengths))
    no_refs = np.asarray(tr.forward_fn(tr.params, *args))
    assert with_refs != np.allclose(whole, no_refs)  # the references reach every split below
    for start in range(TOTAL + 1):
        for stop in range(start, TOTAL + 1):
            staged = _staged(tr.graphdef, start, stop, tr.params, args, ref_kv, lengths)
            np.testing.assert_array_equal(np.asarray(staged), whole, err_msg=f"blocks split at {start}, {stop}")


# ---- the pipeline: a cache that never skips is the uncached loop --------------------------------

NEVER = {  # distances are never below 0: every step is computed
    "teacache": {"teaCache": True, "teaCacheDistance": 0.0},
    "fbcache": {"fbCache": True, "fbCacheThreshold": 0.0},
    "dbcache": {"dbCache": True, "dbCacheThreshold": 0.0, "dbCacheSkipInterval": 2},
}
SIZE = {"width": 32, "height": 48}
STEPS = 5


@pytest.fixture(scope="module")
def kv_pipe(tmp_path_factory):
    from flowgen.engine.pipeline import Pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWGEN_CACHE", str(tmp_path_factory.mktemp("flowgen_cache")))
        return Pipeline.from_pretrained("flux2-klein-tiny", max_sequence_length=16)


@pytest.fixture(scope="module")
def cfg_pipe(kv_pipe):
    """The same weights as a base (CFG) plain Klein model: references are concatenated tokens."""
    from flowgen.engine.pipeline import Pipeline

    source = dataclasses.replace(kv_pipe.source, is_kv=False, distilled=False, defaults={"guidance": 4.0})
    return Pipeline(kv_pipe.transformer, kv_pipe.vae, kv_pipe.prompts.tokenizer, kv_pipe.prompts.encoder, source,
                    max_sequence_length=16)


def _picture(seed: int, size) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(coarse, 8, 0), 8, 1))


@pytest.mark.parametrize("kind, mode", [
    ("teacache", "text"), ("fbcache", "text"), ("dbcache", "kv edit"), ("fbcache", "kv edit"),
    ("teacache", "cfg edit"), ("dbcache", "cfg edit")])
def test_a_never_skipping_cache_renders_the_uncached_images(kv_pipe, cfg_pipe, kind, mode):
    pipe = cfg_pipe if mode == "cfg edit" else kv_pipe
    kwargs = dict(seeds=[5, 6], steps=STEPS, **SIZE)
    if mode != "text":  # rows with different reference sets (lengths differ: padded and masked)
        kwargs["references"] = [[_picture(1, (64, 80))], [_picture(2, (80, 64)), _picture(3, (64, 64))]]
    if mode == "cfg edit":
        kwargs.update(guidance=3.0, negative_prompts=["", "blurry"])
    plain = pipe.generate(["a red fox", "a blue boat"], acceleration="none", **kwargs)
    cached = pipe.generate(["a red fox", "a blue boat"], accelerator_options=NEVER[kind], **kwargs)
    assert plain.step_caches == [] and [r["kind"] for r in cached.step_caches] == [kind, kind]
    assert all(all(r["computed"]) for r in cached.step_caches)
    for a, b in zip(cached.images, plain.images):
        np.testing.assert_array_equal(a, b)


# ---- nothing of the transformer is computed in the cache module ----------------------------------

# What a DiT computation is made of: the blocks' helpers, and the model's own layers.
_DIT_HELPERS = {"scan_layers", "modulate", "layer_norm", "apply_rope", "attention", "timestep_embedding"}
_DIT_LAYERS = {"img_in", "txt_in", "vec", "time_in", "double_stream_modulation_img", "double_stream_modulation_txt",
               "single_stream_modulation", "final_layer"}


def test_the_cache_module_runs_the_transformer_only_through_its_stages():
    tree = ast.parse(inspect.getsource(step_cache))
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert not [pair for pair in imported if pair[0] in ("flowgen.engine.transformer.blocks", "flowgen.engine.transformer.rope")]
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None)
    assert not called & (_DIT_HELPERS | _DIT_LAYERS)
    stages_used = {node.attr for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "transformer"}
    assert {"embed", "run_blocks", "block_range", "velocity"} <= stages_used
