"""Fit TeaCache's rescale polynomial for a FLUX.2 [klein] model (TeaCache's published method).

For each calibration prompt, run the uncached sampler (flow Euler, the model's own schedule) and
record per step i ≥ 1:
    x_i = rel_L1(modulated input of block 0 at step i, at step i−1)   (the signal TeaCache sees)
    y_i = rel_L1(model output at step i, at step i−1)                  (the change it stands for)
with rel_L1(a, b) = mean|a − b| / mean|b|; then fit y ≈ P(x) with numpy.polyfit(x, y, 4). The
coefficients (highest power first, as numpy.poly1d) are what `step_cache_settings.resolve(...,
coefficients=...)` takes; `Pipeline.generate` passes `source.defaults["teacache_coefficients"]`
when a model source carries them (model cards do not yet: flowgen uses FLUX.1's published ones).
Fit over the input-change range the sampler actually produces: a degree-4 fit is not to be trusted
outside it.

Default: the mid-size random model of bench/pipeline.py — which calibrates nothing real (random
weights have no denoising trajectory to speak of); it checks the procedure. On a GPU with real
weights:  python bench/teacache_calibrate.py --model klein-base-9b --size 1024 --steps 50

Usage: JAX_PLATFORMS=cpu .venv/bin/python bench/teacache_calibrate.py [--model PATH|CARD]
       [--size 128] [--steps 28] [--prompts 4] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["a lighthouse on a cliff at dusk, oil painting", "a bowl of ramen, studio photo",
           "a red sneaker on white linen, product shot", "portrait of an old fisherman, soft light",
           "a glass perfume bottle on marble", "a city street in the rain at night",
           "a ceramic mug with steam, morning light", "a mountain lake with pine trees"]


def rel_l1(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).mean() / np.abs(b).mean())


def trajectory_signals(pipe, prompt: str, seed: int, size: int, steps: int, max_len: int):
    """(x, y) pairs of one uncached Euler trajectory (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flowgen.engine.pipeline import seed_noise
    from flowgen.engine.sampling import names
    from flowgen.engine.sampling.loop import model_time
    from flowgen.engine.transformer.blocks import modulate
    from flowgen.engine.transformer.positions import image_ids, pack, text_ids

    tr = pipe.transformer
    h = w = size // 16
    txt = pipe.prompts.embeddings([prompt], max_len)
    x = pack(seed_noise(seed, (tr.config.in_channels, h, w))[None].astype(pipe.dtype))
    sigmas = names.resolve("Default").sigmas(steps, h * w)
    rope_img, rope_txt = tr.rope(image_ids(h, w)), tr.rope(text_ids(txt.shape[1]))

    @jax.jit
    def modulated(params, x, t):
        dit = nnx.merge(tr.graphdef, params)
        (shift, scale, _), _ = dit.double_stream_modulation_img(dit.vec(t))
        return modulate(dit.img_in(x.astype(dit.dtype)), shift, scale, dit.double_blocks.eps).astype(jnp.float32)

    xs, ys, previous = [], [], None
    for i in range(steps):
        t = jnp.broadcast_to(model_time(sigmas[i]), (1,))
        m = np.asarray(modulated(tr.params, x, t))
        v = np.asarray(tr.forward_fn(tr.params, x, rope_img, t, txt, rope_txt))
        if previous is not None:
            xs.append(rel_l1(m, previous[0]))
            ys.append(rel_l1(v, previous[1]))
        previous = (m, v)
        x = (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v).astype(x.dtype)
    return xs, ys


def fit(xs, ys, degree: int = 4) -> np.ndarray:
    return np.polyfit(np.asarray(xs), np.asarray(ys), degree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model card, AIR id or diffusers folder "
                        "(default: bench/pipeline.py's mid model)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--json", help="write {coefficients, points} here")
    args = parser.parse_args()

    from flowgen.engine.pipeline import Pipeline
    from flowgen.engine.sampling.step_cache_settings import FLUX1_TEACACHE_COEFFICIENTS

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            pipe = Pipeline.from_pretrained(args.model, max_sequence_length=args.max_len)
        else:
            from bench.pipeline import write_model

            pipe = Pipeline.from_pretrained(write_model(Path(tmp)), max_sequence_length=args.max_len)
        xs, ys = [], []
        for index, prompt in enumerate(PROMPTS[: args.prompts]):
            x, y = trajectory_signals(pipe, prompt, 1000 + index, args.size, args.steps, args.max_len)
            xs += x
            ys += y
    coefficients = fit(xs, ys)
    residual = np.sqrt(np.mean((np.polyval(coefficients, xs) - np.asarray(ys)) ** 2))
    flux1 = np.sqrt(np.mean((np.polyval(FLUX1_TEACACHE_COEFFICIENTS, xs) - np.asarray(ys)) ** 2))
    print(f"{len(xs)} points: input change {min(xs):.4f}..{max(xs):.4f}, output change {min(ys):.4f}..{max(ys):.4f}")
    print("coefficients (highest power first):", ", ".join(f"{c:.8e}" for c in coefficients))
    print(f"fit RMS error {residual:.4f}; FLUX.1's coefficients on the same points: RMS {flux1:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"coefficients": coefficients.tolist(), "x": xs, "y": ys}))


if __name__ == "__main__":
    main()
