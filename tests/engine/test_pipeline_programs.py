"""Which programs a warm load + edit hands to XLA: the engine's own, nothing eager.

Every program JAX compiles is traced, lowered and looked up in the persistent compile cache again by
every process, and on a GPU every eager op is a dispatch of its own (issue 22: ~90 of a workload
run's 106 programs were `jnp.asarray`, pads, concatenations, per-layer `.at[].set` ...). Two fresh
processes share one compile cache and each loads the tiny KV model and renders one edit with two
references; the second (warm) one must hand XLA exactly the engine's programs, all cache hits.
Names come from JAX's compile events (`fun_name` of backend_compile_duration).
"""

from __future__ import annotations

from tests.engine.child_python import cpu_env, marked_json, run_python

_EDIT = """
import json
import jax
import numpy as np
names = []
def on_duration(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        names.append(kwargs.get("fun_name"))
jax.monitoring.register_event_duration_secs_listener(on_duration)
from flowgen.engine import Pipeline
from flowgen.engine.runtime import compile_cache
pipe = Pipeline.from_pretrained("flux2-klein-tiny", max_sequence_length=16)
loaded = len(names)
rng = np.random.default_rng(0)
refs = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)]
pipe.generate(prompts=["a cup"], references=[refs], seeds=[3], width=64, height=64, steps=2)
stats = compile_cache.stats()
print("PROGRAMS " + json.dumps({"load": names[:loaded], "edit": names[loaded:], "hits": stats.cache_hits}))
"""

# text encoder; VAE encode (once per reference size); a set's tokens (pack, join, pad); the K/V
# pre-pass; the initial noise with the sampler's keys; the loop; tokens -> latents; decode
EDIT_PROGRAMS = {
    "_encode",
    "encode_images",
    "_set_tokens",
    "_prepass_pure",
    "_seed_draws",
    "_prepare",
    "_steps",
    "_token_latents",
    "decode_latents",
    "to_uint8",
}


def test_a_warm_load_and_edit_compile_only_the_engine_programs(tmp_path):
    env = cpu_env(FLOWGEN_CACHE=str(tmp_path / "cache"))
    cold = marked_json(run_python(_EDIT, env=env).stdout, "PROGRAMS")
    warm = marked_json(run_python(_EDIT, env=env).stdout, "PROGRAMS")
    assert warm["load"] == [], warm["load"]  # weights reach the device by transfers only
    names = [name.removeprefix("jit(").removesuffix(")") for name in warm["edit"]]
    assert set(names) == EDIT_PROGRAMS, sorted(names)
    assert names.count("encode_images") == 2  # two reference sizes; every other program once
    assert len(names) == len(EDIT_PROGRAMS) + 1, sorted(names)
    assert warm["hits"] == len(warm["edit"]) and cold["edit"] == warm["edit"]
