"""One plan batch = one sampling loop, whatever its rows' reference sets: padded, masked and exact.

Masked keys weigh exactly zero (attention), length buckets bound the compiled programs, a batch
of eight edits with eight different references runs as one loop whose images are within float32
noise of their batch-1 renders, and a recorded layout replays an image bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flowgen.engine.errors import EngineInputError
from flowgen.engine.pipeline import Pipeline
from flowgen.engine.references.cache import bucket_lengths, length_bucket
from flowgen.engine.sampling import loop as denoise
from flowgen.engine.transformer import attention as attn

STEPS = 2
MAX_LEN = 24
SIZE = dict(width=48, height=32)
# three reference sizes (20, 48 and 110 tokens: buckets 64, 64 and 112)
REF_SIZES = [(64, 80), (96, 128), (160, 176)]


@pytest.fixture(scope="module")
def kv_pipe(tmp_path_factory):
    cache = tmp_path_factory.mktemp("flowgen_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWGEN_CACHE", str(cache))
        return Pipeline.from_pretrained("flux2-klein-tiny", max_sequence_length=MAX_LEN)


@pytest.fixture(scope="module")
def plain_pipe(kv_pipe):
    """The same weights as a plain (references concatenated) distilled Klein."""
    source = dataclasses.replace(kv_pipe.source, is_kv=False)
    return Pipeline(kv_pipe.transformer, kv_pipe.vae, kv_pipe.prompts.tokenizer, kv_pipe.prompts.encoder, source,
                    max_sequence_length=MAX_LEN)


def picture(seed: int, size) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(coarse, 8, 0), 8, 1))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ---- masking and buckets ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["cpu", "xla"])
@pytest.mark.parametrize("extra_batch", [None, 1, 3])
def test_masked_keys_weigh_nothing(path, extra_batch):
    """Padding the keys with garbage and masking it gives the unpadded attention."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 9, 8)), jnp.float32) for _ in range(3))
    real = [4, 0, 6]  # valid extra keys per row (0: a row without references)
    extra_len = 6
    if extra_batch is None:  # padding inside k itself (concatenated references)
        valid = [2, 0, 5]  # of 5 extra keys per row; the rest is garbage that must not count
        tail = np.arange(5)[None, None, :, None] >= np.asarray(valid)[:, None, None, None]
        k_more = np.where(tail, 1e4, rng.standard_normal((3, 2, 5, 8)))
        v_more = np.where(tail, 1e6, rng.standard_normal((3, 2, 5, 8)))
        k_pad = jnp.concatenate([k, jnp.asarray(k_more, jnp.float32)], axis=2)
        v_pad = jnp.concatenate([v, jnp.asarray(v_more, jnp.float32)], axis=2)
        lengths = jnp.asarray([9 + n for n in valid], jnp.int32)
        with attn.attention_path(path):
            got = attn.attention(q, k_pad, v_pad, None, lengths)
        for row, n in enumerate(valid):
            want = attn._cpu(q[row:row + 1], k_pad[row:row + 1, :, :9 + n], v_pad[row:row + 1, :, :9 + n], None)
            np.testing.assert_allclose(np.asarray(got[row:row + 1]), np.asarray(want), atol=2e-6)
        return
    ek = jnp.asarray(rng.standard_normal((extra_batch, 2, extra_len, 8)) * 3, jnp.float32)
    ev = jnp.asarray(rng.standard_normal((extra_batch, 2, extra_len, 8)) * 3, jnp.float32)
    lengths = jnp.asarray([9 + r for r in real], jnp.int32)
    with attn.attention_path(path):
        got = attn.attention(q, k, v, (ek, ev), lengths)
    for row, n in enumerate(real):
        e = min(row, extra_batch - 1)
        extra = (ek[e:e + 1, :, :n], ev[e:e + 1, :, :n])
        want = attn._cpu(q[row:row + 1], k[row:row + 1], v[row:row + 1], extra if n else None)
        np.testing.assert_allclose(np.asarray(got[row:row + 1]), np.asarray(want), atol=2e-6)


def test_length_buckets_are_few_and_waste_at_most_a_quarter():
    buckets = bucket_lengths()
    assert len(buckets) == 33 and buckets[0] == 64 and buckets[-1] == 16384
    for n in range(65, 16385):
        assert n <= length_bucket(n) <= 1.25 * n + 1
    assert length_bucket(0) == 0 and length_bucket(16385) == 20480


# ---- one loop per batch ------------------------------------------------------------------------


def _edits(count: int = 8):
    refs = [[picture(100 + i, REF_SIZES[i % 3])] for i in range(count)]
    prompts = [f"product {i} on a marble table" for i in range(count)]
    return prompts, refs, [1000 + i for i in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["kv", "plain"])
def test_batch_of_distinct_references_is_one_loop_within_float32_noise(which, kv_pipe, plain_pipe):
    pipe = kv_pipe if which == "kv" else plain_pipe
    prompts, refs, seeds = _edits()
    pipe.clear_caches()
    pipe.counters.clear()
    batch = pipe.generate(prompts, references=refs, seeds=seeds, steps=STEPS, **SIZE)
    assert pipe.counters["denoise"] == 1
    # each set's pre-pass once, though the K/V cache keeps only two sets between batches
    assert pipe.counters["reference_prepass"] == (8 if which == "kv" else 0)
    layout = batch.layout
    assert layout == {"reference_layout": "rows", "reference_length": 112, "batch": 8, "mesh": "data=1,model=1"}
    for i in range(8):
        alone = pipe.generate([prompts[i]], references=[refs[i]], seeds=[seeds[i]], steps=STEPS, **SIZE)
        assert alone.layouts[0]["reference_layout"] == "shared"
        assert psnr(batch.images[i], alone.images[0]) >= 60, f"row {i}"
    # the images differ from each other: each row saw its own reference
    assert len({img.tobytes() for img in batch.images}) == 8


@pytest.mark.slow
@pytest.mark.parametrize("which", ["kv", "plain"])
def test_a_recorded_layout_replays_bit_for_bit(which, kv_pipe, plain_pipe):
    pipe = kv_pipe if which == "kv" else plain_pipe
    prompts, refs, seeds = _edits(4)
    refs[1] = []  # a row without references joins the batch too
    batch = pipe.generate(prompts, references=refs, seeds=seeds, steps=STEPS, **SIZE)
    for row in (0, 1, 3):
        # regen's replay: the row copied over the recorded batch size, the recorded layout forced
        replay = pipe.generate([prompts[row]] * 4, references=[refs[row]] * 4, seeds=[seeds[row]] * 4,
                               steps=STEPS, layout=batch.layouts[row], **SIZE)
        np.testing.assert_array_equal(replay.images[0], batch.images[row])


@pytest.mark.slow
def test_reference_sizes_in_one_bucket_share_a_compiled_loop(kv_pipe):
    prompts, refs, seeds = _edits(2)
    kv_pipe.generate(prompts, references=refs, seeds=seeds, steps=STEPS, **SIZE)  # 20 and 48 tokens
    before = denoise.TRACE_COUNTS["denoise"]
    other = [[picture(7, (80, 96))], [picture(8, (128, 64))]]  # 30 and 32 tokens: also bucket 64
    kv_pipe.generate(prompts, references=other, seeds=seeds, steps=STEPS, **SIZE)
    assert denoise.TRACE_COUNTS["denoise"] == before


@pytest.mark.slow
def test_a_layout_that_cannot_hold_the_references_is_refused(kv_pipe):
    prompts, refs, seeds = _edits(2)
    with pytest.raises(EngineInputError, match="reference_length"):
        kv_pipe.generate(prompts, references=refs, seeds=seeds, steps=STEPS,
                         layout={"reference_layout": "rows", "reference_length": 16}, **SIZE)
    with pytest.raises(EngineInputError, match="shared"):
        kv_pipe.generate(prompts, references=refs, seeds=seeds, steps=STEPS,
                         layout={"reference_layout": "shared", "reference_length": 64}, **SIZE)
