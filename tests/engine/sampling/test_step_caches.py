"""Step caches (TeaCache, FBCache, DBCache) in the compiled sampling loop.

* caches off: the loop is the uncached one (resolve -> None), and a cache that never skips
  computes exactly the uncached images (bit for bit), with CFG, KV references, any sampler;
* the skip decisions recorded by the loop equal a plain-Python reference of each algorithm run on
  the recorded distances (`step_cache_reference`), and TeaCache's distances are the relative L1 of
  the modulated input recomputed here independently;
* the compiled `lax.cond` loop equals the host-driven two-executable loop whose decisions the
  reference takes;
* the window, max-consecutive and refresh limits hold; presets and option rules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowgen.engine.errors import EngineInputError
from flowgen.engine.sampling import loop as denoise
from flowgen.engine.sampling import names
from flowgen.engine.sampling.step_cache_settings import PRESETS, StepCache, resolve, window
from flowgen.engine.transformer.blocks import modulate
from flowgen.engine.transformer.compiled import CompiledTransformer
from flowgen.engine.transformer.config import Flux2Config
from flowgen.engine.transformer.positions import image_ids, reference_ids, text_ids
from tests.engine import step_cache_reference as ref

# every test renders or compiles whole denoising loops: minutes on CPU
pytestmark = pytest.mark.slow

CONFIG = Flux2Config(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=48,
                     axes_dim=(8, 8, 8, 8))
B, H, W, T = 2, 4, 4, 8
STEPS = 12


@pytest.fixture(scope="module")
def model():
    tr = CompiledTransformer.random(CONFIG, seed=0)
    x = jax.random.normal(jax.random.key(0), (B, H * W, 128))
    txt = jax.random.normal(jax.random.key(1), (2 * B, T, 48))  # positives, then negatives (CFG)
    return tr, x, txt


def _cond(tr, txt, ref_kv=None):
    return denoise.Conditioning(txt, tr.rope(text_ids(T)), tr.rope(image_ids(H, W)), ref_kv)


def _run(tr, x, txt, cache, scheduler="Default", guidance=None, ref_kv=None, steps=STEPS):
    choice = names.resolve(scheduler)
    cond = _cond(tr, txt if guidance is not None else txt[:B], ref_kv)
    d = denoise.Denoiser(tr.forward_fn, tr.stages)
    out = d(tr.params, x, cond, choice.sigmas(steps, H * W), choice.sampler(), denoise.noise_keys([1, 2]), guidance,
            step_cache=cache)
    return out if cache is not None else (out, None)


def _cache(kind, threshold, **kw):
    front, back = {"teacache": (0, 0), "fbcache": (1, 0), "dbcache": (1, 1)}[kind]
    return StepCache(kind, threshold, kw.pop("start", 0), kw.pop("end", STEPS), kw.pop("max_consecutive", 3),
                     front=front, back=back, **kw)


# Thresholds that make the tiny random model skip some steps but not all (its first-block residual
# moves by ~1 per step; TeaCache's FLUX.1 polynomial rescales its ~0.2-0.4 distances to ~0.25-0.5).
CASES = {
    "teacache": _cache("teacache", 0.6),
    "fbcache": _cache("fbcache", 1.3),
    "dbcache": _cache("dbcache", 1.3, refresh=4),
}


@pytest.fixture(scope="module")
def kv(model):
    tr, _, _ = model
    refs = jax.random.normal(jax.random.key(3), (1, 12, 128))
    return tr.reference_kv(refs, reference_ids([(3, 4)]))


@pytest.mark.parametrize("kind, scheduler, guidance, with_refs", [
    ("teacache", "Default", None, False), ("fbcache", "DPM++ 2M", 3.0, True), ("dbcache", "Heun", None, True)])
def test_a_cache_that_never_skips_is_bit_identical_to_the_uncached_loop(model, kv, kind, scheduler, guidance,
                                                                         with_refs):
    tr, x, txt = model
    never = _cache(kind, 0.0)  # distances are never below 0
    refs = kv if with_refs else None
    plain, _ = _run(tr, x, txt, None, scheduler, guidance, refs)
    cached, record = _run(tr, x, txt, never, scheduler, guidance, refs)
    assert record["computed"].all()
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))


def test_caches_off_resolve_to_the_uncached_loop():
    assert resolve("none", None, steps=50, distilled=False) is None
    assert resolve(None, {"cacheMaxConsecutiveSteps": 2}, steps=50, distilled=False) is not None  # default high
    for acceleration in PRESETS:  # distilled 4-step models: presets skip nothing
        assert resolve(acceleration, None, steps=4, distilled=True) is None
        assert resolve(acceleration, {"teaCache": False}, steps=4, distilled=True) is None
    assert resolve("high", None, steps=8, distilled=False) is None


@pytest.mark.parametrize("kind", list(CASES))
def test_skip_decisions_equal_the_python_reference(model, kind):
    tr, x, txt = model
    cache = CASES[kind]
    _, record = _run(tr, x, txt, cache)
    computed = record["computed"].tolist()
    assert 0 < computed.count(False) < STEPS - 1, computed  # the test exercises both branches
    assert computed == ref.decisions(cache, record["distances"])
    assert math.isnan(record["distances"][0]) and computed[0]


def test_teacache_distance_is_the_modulated_input_change(model):
    """Recompute block 0's modulated input along the recorded (never-skipping) trajectory."""
    tr, x, txt = model
    cache = _cache("teacache", 0.0)
    sigmas = names.resolve("Default").sigmas(STEPS, H * W)
    _, record = _run(tr, x, txt, cache)
    dit = nnx.merge(tr.graphdef, tr.params)
    rope_img, rope_txt = tr.rope(image_ids(H, W)), tr.rope(text_ids(T))
    xs, previous = x, None
    for i in range(STEPS):
        t = jnp.full((B,), denoise.model_time(sigmas[i]), jnp.float32)
        (shift, scale, _), _ = dit.double_stream_modulation_img(dit.vec(t))
        signal = np.asarray(modulate(dit.img_in(xs), shift, scale, CONFIG.eps), np.float64)
        if previous is not None:
            assert record["distances"][i] == pytest.approx(ref.rel_l1(signal, previous), rel=1e-4)
        previous = signal
        v = tr.forward_fn(tr.params, xs, rope_img, t, txt[:B], rope_txt)
        xs = xs + (sigmas[i + 1] - sigmas[i]) * v


@pytest.mark.parametrize("kind", list(CASES))
def test_compiled_loop_equals_the_host_driven_two_executable_loop(model, kind):
    tr, x, txt = model
    cache = CASES[kind]
    compiled, record = _run(tr, x, txt, cache)
    sigmas = names.resolve("Default").sigmas(STEPS, H * W)
    host, computed, distances = ref.host_loop(tr.stages, tr.params, cache, x, sigmas, txt[:B],
                                              tr.rope(image_ids(H, W)), tr.rope(text_ids(T)))
    assert computed == record["computed"].tolist()
    np.testing.assert_allclose(distances[1:], record["distances"][1:], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(host), np.asarray(compiled), rtol=1e-4, atol=1e-4)


def test_window_and_max_consecutive_are_honoured(model):
    tr, x, txt = model
    always = dict(fbcache=_cache("fbcache", 1e9, start=3, end=10, max_consecutive=2),
                  teacache=_cache("teacache", 1e9, start=2, end=STEPS, max_consecutive=3),
                  dbcache=_cache("dbcache", 1e9, start=1, end=STEPS, max_consecutive=5, refresh=3))
    _, fb = _run(tr, x, txt, always["fbcache"])
    # steps 0-2 and 10-11 outside the window; inside, two skips then one computed step
    assert fb["computed"].tolist() == [True, True, True, False, False, True, False, False, True, False, True, True]
    _, tea = _run(tr, x, txt, always["teacache"])
    assert tea["computed"].tolist() == [True, True, False, False, False, True, False, False, False, True, False, True]
    _, db = _run(tr, x, txt, always["dbcache"])  # refresh every 3rd window step: (i - 1) % 3 == 0
    assert db["computed"].tolist() == [True, True, False, False, True, False, False, True, False, False, True, False]


def test_composes_with_kv_references_cfg_and_a_multistep_sampler(model, kv):
    tr, x, txt = model
    cache = _cache("fbcache", 1.3)
    plain, _ = _run(tr, x, txt, None, "DPM++ 2M", 3.0, kv)
    cached, record = _run(tr, x, txt, cache, "DPM++ 2M", 3.0, kv)
    computed = record["computed"].tolist()
    assert 0 < computed.count(False) and computed == ref.decisions(cache, record["distances"])
    assert np.isfinite(np.asarray(cached)).all()
    assert not np.array_equal(np.asarray(cached), np.asarray(plain))  # the skipped steps reused residuals
    # the references matter on the cached path too
    no_refs, _ = _run(tr, x, txt, cache, "DPM++ 2M", 3.0, None)
    assert not np.allclose(np.asarray(no_refs), np.asarray(cached))


def test_resolve_maps_options_and_presets():
    fb = resolve("none", {"fbCache": True, "cacheStartStepPercentage": 10, "cacheEndStepPercentage": 90}, steps=28,
                 distilled=False)
    assert (fb.kind, fb.threshold, fb.start, fb.end, fb.max_consecutive) == ("fbcache", 0.25, 2, 26, 3)
    tea = resolve("high", {"teaCache": True, "teaCacheDistance": 0.3, "cacheStartStep": 1, "cacheEndStep": 3}, steps=4,
                  distilled=True)  # explicit options run even on a 4-step distilled model
    assert (tea.kind, tea.threshold, tea.start, tea.end) == ("teacache", 0.3, 1, 3)
    db = resolve(None, {"dbCache": True, "dbCacheSkipInterval": 2, "cacheMaxConsecutiveSteps": 5}, steps=50,
                 distilled=False)
    assert (db.kind, db.threshold, db.refresh, db.max_consecutive, db.front, db.back) == ("dbcache", 0.25, 3, 5, 1, 1)
    high = resolve("high", None, steps=50, distilled=False)
    assert (high.kind, high.threshold, high.start) == ("fbcache", 0.12, 5)
    assert window({"cacheStartStep": 4, "cacheStartStepPercentage": 50}, 10) == (4, 10)
    with pytest.raises(EngineInputError, match="acceleratorOptions: teaCache, fbCache and dbCache are alternatives"):
        resolve("high", {"teaCache": True, "fbCache": True}, steps=28, distilled=False)
    with pytest.raises(EngineInputError, match="acceleration: 'max' is not allowed"):
        resolve("max", None, steps=28, distilled=False)


def test_recipe_validation_names_conflicting_caches():
    from flowgen.recipe import validation

    task = {"steps": 28, "acceleratorOptions": {"teaCache": True, "dbCache": True}}
    problems = validation.model_rule_problems(task, "task", None, False)
    assert problems == ["task.acceleratorOptions: teaCache, fbCache and dbCache are alternatives; enable one of them, "
                        "got teaCache, dbCache"]
    task = {"acceleration": "medium", "acceleratorOptions": {"fbCache": True}}
    assert validation.support_problems(task, "task") == []


def test_jobs_with_different_caches_land_in_different_batches():
    from flowgen.plan.job import Job
    from flowgen.run.engine import BatchRequest

    base = {"positivePrompt": "a", "width": 64, "height": 64, "steps": 28}
    plain = Job.from_task(base, guidance=None)
    tea = Job.from_task({**base, "acceleratorOptions": {"teaCache": True, "cacheEndStep": None}}, guidance=None)
    low = Job.from_task({**base, "acceleration": "low"}, guidance=None)
    assert plain.signature == Job.from_task({**base, "acceleration": "high"}, guidance=None).signature
    assert len({plain.signature, tea.signature, low.signature}) == 3
    request = BatchRequest.for_jobs([(tea, 1, [])], size=2)
    assert request.accelerator_options == {"teaCache": True} and request.acceleration == "high"


def test_pipeline_records_decisions_and_regen_replays_them_bit_for_bit(tmp_path_factory):
    """A batch's decision depends on its rows; the layout records it and a replay at the recorded
    batch size (the row plus copies of itself, as regen pads) reproduces the image exactly."""
    from flowgen.engine.pipeline import Pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWGEN_CACHE", str(tmp_path_factory.mktemp("flowgen_cache")))
        pipe = Pipeline.from_pretrained("flux2-klein-tiny", max_sequence_length=16)
    options = {"fbCache": True, "fbCacheThreshold": 1.0, "cacheMaxConsecutiveSteps": 2}
    kwargs = dict(width=32, height=32, steps=8, accelerator_options=options)
    out = pipe.generate(["a red fox", "a blue car"], seeds=[3, 4], **kwargs)
    record, layout = out.step_caches[1], out.layouts[1]
    assert record["kind"] == "fbcache" and len(record["computed"]) == 8
    assert layout["step_cache_computed"] == "".join("1" if c else "0" for c in record["computed"])
    assert "0" in layout["step_cache_computed"]
    again = pipe.generate(["a blue car"] * 2, seeds=[4, 4], layout=layout, **kwargs)
    assert again.layouts[0]["step_cache_computed"] == layout["step_cache_computed"]
    np.testing.assert_array_equal(again.images[0], out.images[1])
    plain = pipe.generate(["a blue car"], seeds=[4], width=32, height=32, steps=8, acceleration="none")
    assert plain.step_caches == [] and "step_cache_computed" not in plain.layouts[0]
    with pytest.raises(EngineInputError, match="step_cache_computed must be 8 characters"):
        pipe.generate(["a blue car"], seeds=[4], layout={**layout, "step_cache_computed": "11"}, **kwargs)
