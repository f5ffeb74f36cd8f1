"""The sampling loop without a host callback: progress comes from running it a step per program
call, and a step's arithmetic does not depend on how the steps are split into calls.

* a loop run one step per call (with on_step) equals the same loop run in one call, bit for bit:
  text-to-image, mixed per-row references, a shared reference, CFG, a stochastic and a multistep
  sampler, and the step caches (their per-step records too);
* it also equals the loop compiled as before, one program of a fixed number of steps from 0 (what
  the old `_loop` was, minus its progress callback, which changed no result) — on the quickstart's
  shapes through the CLI, and on the step caches;
* the loop's programs hold no host callback (JAX would not persist them).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import numpy as np
import pytest

from flowgen.engine.pipeline import Pipeline
from flowgen.engine.sampling import loop

MAX_LEN = 24
SIZE = dict(width=32, height=48)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWGEN_CACHE", str(tmp_path_factory.mktemp("flowgen_cache")))
        return Pipeline.from_pretrained("flux2-klein-tiny", max_sequence_length=MAX_LEN)


@pytest.fixture(scope="module")
def base_pipe(pipe):
    """The same weights run as a base (CFG) plain Klein model."""
    source = dataclasses.replace(pipe.source, is_kv=False, distilled=False, defaults={"guidance": 4.0})
    return Pipeline(
        pipe.transformer, pipe.vae, pipe.prompts.tokenizer, pipe.prompts.encoder, source, max_sequence_length=MAX_LEN
    )


def _pixels(seed: int, shape=(64, 80, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


CASES = {
    "t2i": dict(prompts=["a", "b", "c"], seeds=[1, 2, 3], steps=3),
    "mixed_references": dict(
        prompts=["a", "b", "c"], seeds=[4, 5, 6], steps=3, references=[[_pixels(1)], [_pixels(2), _pixels(1)], []]
    ),
    "shared_reference": dict(prompts=["a", "b"], seeds=[4, 5], steps=3, references=[[_pixels(1)], [_pixels(1)]]),
    "ancestral": dict(prompts=["a", "b"], seeds=[7, 8], steps=4, scheduler="EulerAncestralDiscreteScheduler"),
    "multistep": dict(prompts=["a", "b"], seeds=[7, 8], steps=5, scheduler="DPMSolverMultistepScheduler"),
    "fbcache": dict(
        prompts=["a", "b"],
        seeds=[7, 8],
        steps=8,
        acceleration="none",
        accelerator_options={"fbCache": True, "fbCacheThreshold": 0.5},
    ),
    "dbcache_references": dict(
        prompts=["a", "b"],
        seeds=[7, 8],
        steps=8,
        acceleration="none",
        references=[[_pixels(1)], [_pixels(2)]],
        accelerator_options={"dbCache": True, "dbCacheThreshold": 0.5},
    ),
    "teacache": dict(
        prompts=["a", "b"],
        seeds=[7, 8],
        steps=8,
        acceleration="none",
        accelerator_options={"teaCache": True, "teaCacheDistance": 0.5},
    ),
}


def _loop_outputs(pipe, kwargs, on_step=None):
    """The loop's final tokens and step-cache record of one generate call."""
    seen = {}
    call = loop.Denoiser.__call__

    def spy(self, *args, **kw):
        out = call(self, *args, **kw)
        seen["out"] = out
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Denoiser, "__call__", spy)
        images = pipe.generate(**kwargs, **SIZE, on_step=on_step).images
    out = seen["out"]
    tokens, record = out if isinstance(out, tuple) else (out, {})
    return np.asarray(tokens), {k: np.asarray(v) for k, v in record.items()}, images


def _assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name])
    for x, y in zip(a[2], b[2]):
        np.testing.assert_array_equal(x, y)


def _fixed_length_steps():
    """`loop._steps` compiled as the loop used to be: the bounds static, so each (start, stop) is its
    own program with a known trip count."""
    return jax.jit(
        loop._steps.__wrapped__,
        static_argnames=("forward", "cfg", "sampler", "quantize_t", "step_cache", "stages", "start", "stop"),
    )


def _use_fixed_length(mp) -> None:
    """Run the loop as one fixed-length program from step 0, as before the chunked loop."""
    fixed = _fixed_length_steps()

    def steps(params, carry, cond, sigmas, guidance, keys, start, stop, **static):
        return fixed(params, carry, cond, sigmas, guidance, keys, start=int(start), stop=int(stop), **static)

    mp.setattr(loop, "_steps", steps)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["kv", "base"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_step_per_call_equals_one_call(pipe, base_pipe, model, case):
    p = pipe if model == "kv" else base_pipe
    reported = []
    per_step = _loop_outputs(p, CASES[case], on_step=reported.append)
    one_call = _loop_outputs(p, CASES[case])
    _assert_same(per_step, one_call)
    assert reported == list(range(1, CASES[case]["steps"] + 1))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["t2i", "mixed_references", "fbcache", "dbcache_references", "teacache"])
def test_the_loop_equals_the_fixed_length_program(pipe, base_pipe, case, monkeypatch):
    for p in (pipe, base_pipe):
        chunked = _loop_outputs(p, CASES[case], on_step=lambda done: None)
        with monkeypatch.context() as mp:
            _use_fixed_length(mp)
            before = _loop_outputs(p, CASES[case])
        _assert_same(chunked, before)


def _image_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.png"))}


@pytest.mark.slow
def test_quickstart_images_equal_the_fixed_length_program(tmp_path, monkeypatch):
    from flowgen.commands.run import run_command

    recipe = Path(__file__).resolve().parents[3] / "recipes" / "quickstart.yaml"
    monkeypatch.setenv("FLOWGEN_CACHE", str(tmp_path / "cache"))
    assert run_command(str(recipe), str(tmp_path / "chunked"), [], None, False) == 0
    _use_fixed_length(monkeypatch)
    assert run_command(str(recipe), str(tmp_path / "before"), [], None, False) == 0
    chunked, before = _image_digests(tmp_path / "chunked"), _image_digests(tmp_path / "before")
    assert len(chunked) == 4 and chunked == before


def test_the_loop_programs_hold_no_host_callback(pipe):
    import jax.numpy as jnp

    from flowgen.engine.sampling import names

    x = jnp.zeros((1, 6, 128), jnp.float32)
    cond = loop.Conditioning(
        jnp.zeros((1, MAX_LEN, 96), jnp.float32),
        pipe.transformer.rope(np.zeros((MAX_LEN, 4))),
        pipe.transformer.rope(np.zeros((6, 4))),
    )
    sampler = names.resolve(None).sampler()
    sigmas = jnp.linspace(1.0, 0.0, 3)
    prepared, carry = loop._prepare(pipe.params, x, cond, sigmas, cfg=False, sampler=sampler)
    lowered = loop._steps.lower(
        pipe.params,
        carry,
        prepared,
        sigmas,
        jnp.float32(1),
        loop.noise_keys([1]),
        jnp.int32(0),
        jnp.int32(2),
        forward=pipe.denoiser.forward,
        cfg=False,
        sampler=sampler,
        quantize_t=False,
    )
    assert "callback" not in lowered.as_text()
