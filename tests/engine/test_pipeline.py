"""Pipeline behaviour without a reference implementation: batch independence, work deduplication,
no retracing, argument errors. Runs on the embedded tiny model card (no torch)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from flowgen.engine.errors import EngineInputError
from flowgen.engine.pipeline import Pipeline, seed_noise
from flowgen.engine.sampling import loop as denoise
from flowgen.errors import FlowgenError, ImageInputError

SIZE = dict(width=32, height=48)
STEPS = 2
MAX_LEN = 24


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    cache = tmp_path_factory.mktemp("flowgen_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWGEN_CACHE", str(cache))
        return Pipeline.from_pretrained("flux2-klein-tiny", max_sequence_length=MAX_LEN)


@pytest.fixture(scope="module")
def base_pipe(pipe):
    """The same weights run as a base (CFG) plain Klein model."""
    source = dataclasses.replace(pipe.source, is_kv=False, distilled=False, defaults={"guidance": 4.0})
    return Pipeline(pipe.transformer, pipe.vae, pipe.prompts.tokenizer, pipe.prompts.encoder, source,
                    max_sequence_length=MAX_LEN)


def picture(seed: int, size=(64, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(coarse, 8, 0), 8, 1))


def test_card_source(pipe):
    assert pipe.is_kv and pipe.distilled and pipe.dtype == np.float32
    identity = pipe.identity()
    assert identity["model"] == "flux2-klein-tiny" and identity["card"]["tiny"]["seed"] == 0
    assert {"flowgen", "jax", "dtype", "device_kind"} <= set(identity)


def test_seed_noise_is_jax_normal_of_the_seed():
    import jax

    np.testing.assert_array_equal(seed_noise(7, (4, 2, 3)), jax.random.normal(jax.random.key(7), (4, 2, 3)))
    assert not np.array_equal(seed_noise(5, (8,)), seed_noise(5 + 2**40, (8,)))  # high bits count


@pytest.mark.slow
def test_images_do_not_depend_on_batch_mates(pipe):
    a = ("a red fox", 11, [picture(1)])
    b = ("a blue boat", 22, None)
    c = ("a red fox", 33, [picture(2, (80, 64))])

    def run(*items):
        out = pipe.generate([i[0] for i in items], references=[i[2] for i in items], seeds=[i[1] for i in items],
                            steps=STEPS, **SIZE)
        assert all(img.shape == (48, 32, 3) and img.dtype == np.uint8 for img in out.images)
        return out.images

    ab, ba, alone, cab = run(a, b), run(b, a), run(a), run(c, a, b)
    np.testing.assert_array_equal(ab[0], ba[1])
    np.testing.assert_array_equal(ab[1], ba[0])
    np.testing.assert_array_equal(ab[0], alone[0])
    np.testing.assert_array_equal(ab[0], cab[1])
    np.testing.assert_array_equal(ab[1], cab[2])
    assert not np.array_equal(ab[0], cab[0])  # same prompt, other seed and references


@pytest.mark.slow
def test_cfg_images_do_not_depend_on_batch_mates(base_pipe):
    def run(prompts, seeds, negatives):
        return base_pipe.generate(prompts, seeds=seeds, steps=STEPS, guidance=3.0, negative_prompts=negatives,
                                  **SIZE).images

    ab = run(["fox", "boat"], [1, 2], ["", "blurry"])
    ba = run(["boat", "fox"], [2, 1], ["blurry", ""])
    np.testing.assert_array_equal(ab[0], ba[1])
    np.testing.assert_array_equal(ab[1], ba[0])
    other_negative = run(["boat"], [2], [""])[0]
    assert not np.array_equal(ab[1], other_negative)  # the negative prompt is used


@pytest.mark.slow
def test_work_is_done_once_per_distinct_input(pipe):
    pipe.counters.clear()
    pipe.clear_caches()
    x1, x2, y = picture(3), picture(4, (80, 64)), picture(5)
    x1_again, x2_again = Image.fromarray(np.asarray(x1)), Image.fromarray(np.asarray(x2))  # equal content
    prompts = ["one", "two", "one", "two"]
    references = [[x1, x2], [x1_again, x2_again], [y], [y]]
    # no width/height: each image takes its first reference's prepared size (64x80 here)
    out = pipe.generate(prompts, references=references, seeds=[1, 2, 3, 4], steps=STEPS)
    assert [img.shape for img in out.images] == [(80, 64, 3)] * 4
    assert set(out.timings) == {"text", "references", "denoise", "decode"}
    assert pipe.counters["text_encode"] == 2  # distinct prompts
    assert pipe.counters["reference_prepare"] == 3  # rows 2 and 3 hold the same image object: prepared once
    assert pipe.counters["vae_encode"] == 3  # distinct images
    assert pipe.counters["reference_prepass"] == 2  # distinct reference sets
    assert pipe.counters["denoise"] == 1  # one loop for the batch, whatever its reference sets
    # a later batch reuses cached prompts and the last reference sets
    pipe.generate(["one"], references=[[y]], seeds=[9], steps=STEPS)
    assert (pipe.counters["text_encode"], pipe.counters["reference_prepass"]) == (2, 2)


@pytest.mark.slow
def test_same_shapes_do_not_retrace(pipe):
    pipe.generate(["warm"], seeds=[1], steps=STEPS, **SIZE)
    before = denoise.TRACE_COUNTS["denoise"]
    pipe.generate(["other prompt"], seeds=[2], steps=STEPS, **SIZE)
    assert denoise.TRACE_COUNTS["denoise"] == before


@pytest.mark.slow
def test_latents_are_used_as_given(pipe):
    noise = np.asarray(seed_noise(5, (128, 3, 2)))[None]
    from_latents = pipe.generate(["fox"], latents=noise, steps=STEPS, **SIZE).images[0]
    from_seed = pipe.generate(["fox"], seeds=[5], steps=STEPS, **SIZE).images[0]
    np.testing.assert_array_equal(from_latents, from_seed)


@pytest.mark.parametrize("kwargs, error", [
    (dict(width=40), EngineInputError),
    (dict(height=8), EngineInputError),
    (dict(steps=0), EngineInputError),
    (dict(seeds=[1, 2]), EngineInputError),
    (dict(latents=np.zeros((1, 128, 3, 2), np.float32)), EngineInputError),  # and seeds: both given
    (dict(references=[[picture(i) for i in range(5)]]), ImageInputError),
    (dict(references=[[np.zeros((64, 64), np.float32)]]), ImageInputError),
    (dict(references=[[picture(1, (32, 64))]]), ImageInputError),  # side below 64 px
    (dict(guidance=-1.0), EngineInputError),
    (dict(negative_prompts=["a", "b"]), EngineInputError),
])
def test_bad_arguments_raise_one_line_errors(pipe, kwargs, error):
    args = dict(prompts=["fox"], seeds=[1], steps=1, **SIZE)
    args.update(kwargs)
    with pytest.raises(error) as info:
        pipe.generate(**args)
    assert isinstance(info.value, FlowgenError) and "\n" not in str(info.value)


def test_unknown_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(FlowgenError):
        Pipeline.from_pretrained(os.fspath(tmp_path / "nowhere"))
