"""Step caches (TeaCache, FBCache, DBCache, the acceleration presets): speed-up and PSNR vs uncached.

On the mid-size random model of bench/pipeline.py (transformer 512 = 4×128, 2 double + 4 single
blocks), float32, batch 1, one prompt and seed:
  * base-like: Klein's base schedule at 28 and 50 steps on the plain pipeline, without CFG (CFG
    doubles the DiT batch for cached and uncached steps alike; left out to fit the CPU budget);
  * distilled: the KV pipeline, 4 steps.
For each setting: denoise seconds (fastest of --repeats after a compiling warm-up), speed-up vs
the uncached loop, steps computed, and PSNR of the decoded image vs the uncached image.
Also: the compiled `lax.cond` loop vs the same cache as two executables with the decision on the
host (tests/engine/step_cache_reference.host_loop), and diffusers' cache hooks on its Flux2
transformer (Flux2KleinPipeline, same weights), each vs diffusers uncached.

Random weights: the PSNR figures say how far a cache drifts from the uncached trajectory on this
model; they do not predict quality on real weights (bench/teacache_calibrate.py explains why).

Usage: JAX_PLATFORMS=cpu .venv/bin/python bench/step_caches.py [--size 128] [--repeats 1]
       [--no-diffusers] [--no-append]   (appends a section to bench/RESULTS.md unless --no-append)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 7
MAX_LEN = 32
SECTION = "## Step caches (bench/step_caches.py)"

BASE_28 = [
    ("uncached", "none", None),
    ("preset low", "low", None),
    ("preset medium", "medium", None),
    ("preset high (default)", "high", None),
    ("teaCache 0.3", "none", {"teaCache": True, "teaCacheDistance": 0.3}),
    ("teaCache 0.5 (spec default)", "none", {"teaCache": True}),
    ("teaCache 1.0", "none", {"teaCache": True, "teaCacheDistance": 1.0}),
    ("fbCache 0.25 (spec default)", "none", {"fbCache": True}),
    ("fbCache 1.0", "none", {"fbCache": True, "fbCacheThreshold": 1.0}),
    ("dbCache 0.25 (spec default)", "none", {"dbCache": True}),
    ("dbCache 1.0", "none", {"dbCache": True, "dbCacheThreshold": 1.0}),
]
BASE_50 = [
    ("uncached", "none", None),
    ("preset high (default)", "high", None),
    ("teaCache 0.3", "none", {"teaCache": True, "teaCacheDistance": 0.3}),
    ("teaCache 0.5 (spec default)", "none", {"teaCache": True}),
    ("fbCache 1.0", "none", {"fbCache": True, "fbCacheThreshold": 1.0}),
    ("dbCache 1.0", "none", {"dbCache": True, "dbCacheThreshold": 1.0}),
]
DISTILLED_SETTINGS = [
    ("uncached (= every preset)", "high", None),
    ("teaCache 1.0", "none", {"teaCache": True, "teaCacheDistance": 1.0}),
    ("fbCache 0.25", "none", {"fbCache": True}),
    ("fbCache 1.0, max 1 skip", "none", {"fbCache": True, "fbCacheThreshold": 1.0, "cacheMaxConsecutiveSteps": 1}),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def drift(a: np.ndarray, b: np.ndarray, start: np.ndarray) -> float:
    """How far latents a land from the uncached b, relative to how far b moved from the initial
    noise: |a − b| / |b − noise| (the random model's velocities are small next to the noise, so
    PSNRs stay high even when a cache changes much of the trajectory)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b - start))


def latent_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of latents a vs reference b, peak = b's value range (more sensitive than the decoded
    image: a random VAE maps many latents to similar pictures)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(float(np.ptp(b)) ** 2 / mse)


class LatentTap:
    """Keeps the latents the pipeline hands its VAE (the denoised result)."""

    def __init__(self, vae):
        self.vae, self.latents = vae, None

    def decode(self, latents):
        self.latents = np.asarray(latents)
        return self.vae.decode(latents)

    def __getattr__(self, name):
        return getattr(self.vae, name)


def generate(pipe, steps, acceleration, options, size):
    out = pipe.generate([PROMPT], seeds=[SEED], width=size, height=size, steps=steps,
                        acceleration=acceleration, accelerator_options=options)
    computed = sum(out.step_caches[0]["computed"]) if out.step_caches else steps
    return out.timings["denoise"], computed, (out.images[0], pipe.vae.latents)


def flowgen_table(pipe, base, size, repeats):
    """Each setting: a compiling warm-up, then `repeats` × (uncached, setting) back to back; the
    speed-up is the fastest uncached run of those pairs over the fastest cached one (both saw the
    same machine load). The uncached row shows the fastest uncached run of the schedule."""
    from flowgen.engine.pipeline import seed_noise

    rows = []
    for label, pipeline, steps, settings in (("base-like", base, 28, BASE_28), ("base-like", base, 50, BASE_50),
                                             ("distilled KV", pipe, 4, DISTILLED_SETTINGS)):
        plain = settings[0][1:]
        uncached_times = [generate(pipeline, steps, *plain, size)[0]]  # compiles
        _, _, reference = generate(pipeline, steps, *plain, size)
        noise = np.asarray(seed_noise(SEED, reference[1].shape[1:]))[None]
        measured = []
        for name, acceleration, options in settings[1:]:
            generate(pipeline, steps, acceleration, options, size)  # compiles
            best = beside = None
            for _ in range(repeats):
                before = generate(pipeline, steps, *plain, size)[0]
                seconds, computed, image = generate(pipeline, steps, acceleration, options, size)
                uncached_times.append(before)
                best, beside = min(best or seconds, seconds), min(beside or before, before)
            measured.append((name, best, beside / best, computed, psnr(image[0], reference[0]),
                             latent_psnr(image[1], reference[1]), drift(image[1], reference[1], noise)))
            print(f"{label} {steps} {name}: {best:.3f} s, {beside / best:.2f}x, {computed}/{steps}, "
                  f"{measured[-1][4]:.1f} dB, latents {measured[-1][5]:.1f} dB, drift {100 * measured[-1][6]:.2f} %",
                  flush=True)
        rows.append((label, steps, settings[0][0], min(uncached_times), 1.0, steps, float("inf"), float("inf"), 0.0))
        rows += [(label, steps, *row) for row in measured]
    return rows


def cond_vs_host(base, size, repeats):
    """lax.cond in the compiled loop vs two executables with the decision on the host (no CFG)."""
    import jax
    import jax.numpy as jnp

    from flowgen.engine.pipeline import seed_noise
    from flowgen.engine.sampling import loop as denoise
    from flowgen.engine.sampling import names
    from flowgen.engine.sampling.base import FlowEuler
    from flowgen.engine.sampling.step_cache_settings import resolve
    from flowgen.engine.transformer.positions import image_ids, pack, text_ids
    from tests.engine.step_cache_reference import host_loop

    tr, steps = base.transformer, 28
    h = w = size // 16
    txt = base.prompts.embeddings([PROMPT], MAX_LEN)
    x = pack(seed_noise(SEED, (tr.config.in_channels, h, w))[None].astype(jnp.float32))
    sigmas = names.resolve("Default").sigmas(steps, h * w)
    rope_img, rope_txt = tr.rope(image_ids(h, w)), tr.rope(text_ids(txt.shape[1]))
    cache = resolve("none", {"fbCache": True, "fbCacheThreshold": 1.0}, steps=steps, distilled=False)
    cond = denoise.Conditioning(txt, rope_txt, rope_img)
    keys = denoise.noise_keys([SEED])
    times = {"compiled lax.cond loop": [], "two executables, host decides": [], "uncached compiled loop": []}
    computed = None
    for _repeat in range(repeats + 2):
        start = time.perf_counter()
        _, record = base.denoiser(tr.params, x, cond, sigmas, FlowEuler(), keys, step_cache=cache)
        times["compiled lax.cond loop"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _, computed, _ = host_loop(tr.stages, tr.params, cache, x, sigmas, txt, rope_img, rope_txt)
        times["two executables, host decides"].append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(base.denoiser(tr.params, x, cond, sigmas, FlowEuler(), keys))
        times["uncached compiled loop"].append(time.perf_counter() - start)
    assert computed == record["computed"].tolist()
    return {name: min(t[1:]) for name, t in times.items()}, sum(computed), steps


def diffusers_table(folder, size, steps=28):
    """diffusers' Flux2KleinPipeline with its cache hooks vs uncached (same weights, no CFG)."""
    import torch
    from diffusers import Flux2KleinPipeline
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, TaylorSeerCacheConfig

    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def run():
        generator = torch.Generator().manual_seed(SEED)
        start = time.perf_counter()
        image = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=1.0,
                     generator=generator, output_type="np", max_sequence_length=MAX_LEN).images[0]
        return time.perf_counter() - start, (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    reference_time, reference = run()
    rows = [("uncached", reference_time, 1.0, float("inf"), "")]
    hooks = [
        ("TaylorSeerCacheConfig()", lambda: TaylorSeerCacheConfig()),
        ("FasterCacheConfig(spatial_attention_block_skip_range=2)",
         lambda: FasterCacheConfig(spatial_attention_block_skip_range=2,
                                   current_timestep_callback=lambda: getattr(pipe, "_current_timestep", 0))),
        ("FirstBlockCacheConfig(threshold=0.12)", lambda: FirstBlockCacheConfig(threshold=0.12)),
    ]
    for name, config in hooks:
        try:
            pipe.transformer.enable_cache(config())
            seconds, image = run()
            rows.append((name, seconds, reference_time / seconds, psnr(image, reference), ""))
        except Exception as err:  # report what fails on Flux2, as it fails
            rows.append((name, None, None, None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
        finally:
            try:
                pipe.transformer.disable_cache()
            except Exception:
                pass
        print(name, rows[-1][1:], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    import jax

    from bench.pipeline import write_model
    from flowgen.engine.pipeline import Pipeline

    started = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp))
        pipe = Pipeline.from_pretrained(folder, max_sequence_length=MAX_LEN)
        source = dataclasses.replace(pipe.source, is_kv=False, distilled=False, defaults={"guidance": 1.0})
        pipe.vae = LatentTap(pipe.vae)
        base = Pipeline(pipe.transformer, pipe.vae, pipe.prompts.tokenizer, pipe.prompts.encoder, source,
                        max_sequence_length=MAX_LEN)
        rows = flowgen_table(pipe, base, args.size, args.repeats)
        host_times, host_computed, host_steps = cond_vs_host(base, args.size, args.repeats)
        theirs = None if args.no_diffusers else diffusers_table(folder, args.size)

    lines = [
        "",
        SECTION,
        "",
        f"`JAX_PLATFORMS=cpu .venv/bin/python bench/step_caches.py --size {args.size} --repeats {args.repeats}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPU, "
        f"load average {load:.1f} at start (shared machine: treat times as indicative), jax {jax.__version__}. "
        f"Mid-size random model (bench/pipeline.py), float32, {args.size}×{args.size}, batch 1, {MAX_LEN}-token "
        f"prompt, no CFG; denoise seconds, fastest of {args.repeats} after a compiling warm-up; speed-up vs the "
        "uncached runs made back to back with them; PSNR of the decoded image "
        "and of the latents vs the uncached ones, and the drift |latents − uncached| / |uncached − initial noise| "
        "(random weights: distance from the uncached trajectory, not a quality judgement). "
        f"Bench wall time {time.perf_counter() - started:.0f} s.",
        "",
        "| model | steps | setting | denoise s | speed-up | steps computed | image PSNR dB | latent PSNR dB | drift |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, steps, name, seconds, speedup, computed, value, latent, moved in rows:
        shown = ["—" if v == float("inf") else f"{v:.1f}" for v in (value, latent)]
        lines.append(f"| {label} | {steps} | {name} | {seconds:.3f} | {speedup:.2f}× | {computed}/{steps} | "
                     f"{shown[0]} | {shown[1]} | {100 * moved:.2f} % |")
    lines += ["", f"lax.cond vs two executables (fbCache 1.0, 28 steps, no CFG, {host_computed}/{host_steps} "
              "computed, same decisions):", ""]
    lines += [f"- {name}: {seconds:.3f} s" for name, seconds in host_times.items()]
    if theirs:
        lines += ["", f"diffusers {__import__('diffusers').__version__} Flux2KleinPipeline (same weights, no CFG, 28 "
                  "steps, whole call incl. text encoder and VAE), cache hooks via `transformer.enable_cache`:", "",
                  "| hook | seconds | speed-up | PSNR dB vs diffusers uncached | error |", "|---|---|---|---|---|"]
        for name, seconds, speedup, value, error in theirs:
            if seconds is None:
                lines.append(f"| {name} | — | — | — | {error} |")
            else:
                shown = "—" if value == float("inf") else f"{value:.1f}"
                lines.append(f"| {name} | {seconds:.2f} | {speedup:.2f}× | {shown} | |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
