"""The product-photo workload (issue 22): `flowgen run` vs the diffusers loop a user writes.

8 SKUs (3 of them with two packshots) × 4 background prompts = 32 edits, 256², 4 steps, float32, on
bench/pipeline.py's mid-size random KV model (written once, read by every side). The packshots are
crops and recolourings of scikit-image's bundled photos (nothing is downloaded). Three sides, run
interleaved (A B C A B C ...) for --repeats rounds, each in a fresh process, as a user runs them:

  A  flowgen     `flowgen run recipe.yaml --dtype float32` (a JSONL product list, a CSV of background
                 prompts, the recipe's matrix crossing them). The CLI is called in a child process
                 through a small wrapper that only adds a listener for JAX's compile events, so the
                 compile seconds can be reported (flowgen records no compile time of its own).
  B  diffusers   `Flux2KleinKVPipeline`, one call per image, the same seeds as flowgen's plan
     loop        (torch generators, so not the same noise), images saved as JPEG 95 like flowgen's.
  C  diffusers   the same, one call per SKU with its 4 prompts (a generator per image).
     batched

Reported per side (the fastest round by end-to-end time): end-to-end seconds (process start to
exit) and images/s; steady-state images/s (flowgen: its run record's seconds minus model load and
compile; diffusers: the calls after the first, so without import, load and the warm-up call); and
stage seconds (flowgen: the engine timings of its manifest rows and its run record; diffusers: its
pipeline methods wrapped with timers, bench/pipeline.py's StageClock). Then a markdown table for
bench/RESULTS.md and the CPU ceiling for this workload (see `ceiling`).

Usage: JAX_PLATFORMS=cpu .venv/bin/python bench/workload.py [--repeats 1] [--threads N] [--warm-cache]
       [--quick] [--size 256]
  --threads N   cores for every side (default: all): the child processes are pinned to N CPUs, so
                XLA's and torch's thread pools both see N, and torch.set_num_threads(N)
  --warm-cache  one extra flowgen run first with a fresh JAX_COMPILATION_CACHE_DIR (and FLOWGEN_CACHE)
                that every later flowgen run shares: its figure is the cold one, the rounds are warm.
                Without it every flowgen run gets empty cache folders, so every run is cold.
  --quick       2 SKUs (one with two packshots) × 2 prompts: a fast check that everything runs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

SECTION = "## Product-photo workload (issue 22)"
STEPS = 4
JPEG_QUALITY = 95  # flowgen's default outputQuality for JPG, used by the diffusers sides too
STAGES = ("text", "references", "denoise", "decode", "encode/write")

# ---------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Shot:
    """A packshot cut from a scikit-image photo: crop box (top, left, bottom, right) as fractions,
    and a colour to tint it with (grey photos become coloured products)."""

    photo: str
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    tint: tuple[float, float, float] | None = None


SKUS: list[tuple[str, str, list[Shot]]] = [
    ("MUG-01", "ceramic coffee cup", [Shot("coffee", (0.05, 0.2, 0.95, 0.85)), Shot("coffee", (0.2, 0.3, 0.8, 0.7))]),
    ("RKT-02", "toy rocket", [Shot("rocket", (0.0, 0.3, 1.0, 0.7)), Shot("rocket", (0.3, 0.4, 0.85, 0.6), (1.0, 0.7, 0.6))]),
    ("CLK-03", "brass wall clock", [Shot("clock", tint=(1.0, 0.8, 0.45)), Shot("clock", (0.1, 0.2, 0.9, 0.8), (0.8, 0.8, 0.9))]),
    ("CNS-04", "gold coin set", [Shot("coins", tint=(1.0, 0.85, 0.4))]),
    ("CWH-05", "colour wheel print", [Shot("colorwheel")]),
    ("LGO-06", "logo sticker", [Shot("logo")]),
    ("CAM-07", "vintage film camera", [Shot("camera", (0.1, 0.2, 0.6, 0.75), (1.0, 0.9, 0.75))]),
    ("AST-08", "astronaut figurine", [Shot("astronaut", (0.0, 0.1, 0.6, 0.7))]),
]
QUICK_SKUS = ("MUG-01", "CNS-04")
BACKGROUNDS = [
    ("marble", "Place the product on a white marble countertop, soft morning daylight, product photo"),
    ("oak", "Place the product on a rustic oak table beside a window, warm light, shallow depth of field"),
    ("beach", "Place the product on fine sand at a beach at golden hour, ocean blurred behind"),
    ("studio", "Place the product on a seamless pastel pink studio backdrop, softbox lighting, clean shadow"),
]
# packshot sizes (width, height) at 256² output, cycled over the shots; scaled with --size
SHOT_SIZES = [(256, 256), (192, 256), (256, 192), (224, 224)]

RECIPE = """\
version: 1
name: product-photos
model: {model}
seed: 22
datasets:
  products: {{jsonl: products.jsonl, key: "{{sku}}"}}
  backgrounds: {{csv: backgrounds.csv, key: "{{background}}"}}
matrix:
  product: products
  background: backgrounds
task:
  positivePrompt: "{{background.prompt}}"
  width: {size}
  height: {size}
  steps: {steps}
  outputFormat: JPG
  outputQuality: {quality}
  inputs:
    referenceImages: "{{product.packshots}}"
output:
  filename: "{{product.sku}}/{{background.background}}.{{ext}}"
"""


def packshot(shot: Shot, size: tuple[int, int]):
    """The PIL packshot: a crop of a bundled scikit-image photo, tinted, on white where transparent."""
    import numpy as np
    import skimage.data
    from PIL import Image

    pixels = getattr(skimage.data, shot.photo)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 4:  # RGBA logo: composed on white, as a packshot would be
        alpha = pixels[..., 3:4].astype(np.float32) / 255.0
        pixels = (pixels[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    height, width = pixels.shape[:2]
    top, left, bottom, right = shot.crop
    pixels = pixels[int(top * height):int(bottom * height), int(left * width):int(right * width)]
    if shot.tint is not None:
        pixels = (pixels.astype(np.float32) * np.asarray(shot.tint, np.float32)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Workload:
    recipe: Path
    skus: dict[str, list[str]]  # SKU -> its packshot paths (absolute)
    backgrounds: list[tuple[str, str]]

    @property
    def images(self) -> int:
        return len(self.skus) * len(self.backgrounds)


def write_workload(folder: Path, model: Path, size: int, quick: bool) -> Workload:
    """Packshots, products.jsonl, backgrounds.csv and recipe.yaml in `folder`."""
    skus = [sku for sku in SKUS if not quick or sku[0] in QUICK_SKUS]
    backgrounds = BACKGROUNDS[:2] if quick else BACKGROUNDS
    (folder / "packshots").mkdir(parents=True)
    paths: dict[str, list[str]] = {}
    products = []
    number = 0
    for sku, name, shots in skus:
        relative = []
        for index, shot in enumerate(shots):
            width, height = SHOT_SIZES[number % len(SHOT_SIZES)]
            number += 1
            scaled = (max(16, width * size // 256 // 16 * 16), max(16, height * size // 256 // 16 * 16))
            path = f"packshots/{sku}_{index}.png"
            packshot(shot, scaled).save(folder / path)
            relative.append(path)
        paths[sku] = [str(folder / p) for p in relative]
        products.append({"sku": sku, "name": name, "packshots": relative})
    (folder / "products.jsonl").write_text("".join(json.dumps(p) + "\n" for p in products))
    with open(folder / "backgrounds.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["background", "prompt"])
        writer.writerows(backgrounds)
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=json.dumps(str(model)), size=size, steps=STEPS, quality=JPEG_QUALITY))
    return Workload(recipe, paths, list(backgrounds))


def planned_edits(workload: Workload) -> list[dict]:
    """Each edit as flowgen's plan has it (prompt, packshots, seed), in the recipe's item order; the
    diffusers sides render exactly these."""
    from flowgen.plan.from_recipe import plan_recipe

    plan = plan_recipe(workload.recipe, workload.recipe.parent / "plan-only", [], 8, "float32")
    edits = []
    for result in plan.results:
        job = result.job
        if job.guidance is not None:
            raise SystemExit(f"error: the plan uses guidance {job.guidance}; the workload is a distilled (no CFG) edit")
        values = result.item.values
        edits.append({"sku": values["product"]["sku"], "background": values["background"]["background"],
                      "prompt": job.prompt, "references": list(job.references), "seed": result.seed})
    return edits


# ---------------------------------------------------------------------------------------------- child processes


def pin_threads(threads: int) -> None:
    """Give this process `threads` CPUs before JAX or torch start their thread pools (both size them
    from the CPUs the process may use); torch also gets set_num_threads in its child."""
    available = sorted(os.sched_getaffinity(0))
    if threads < len(available):
        os.sched_setaffinity(0, available[:threads])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "XLA compile or cache read"}


def flowgen_child(result_path: str, threads: int, cli_args: list[str]) -> None:
    """`flowgen CLI_ARGS` in this process, adding only timers: JAX's compile events (tracing,
    lowering, XLA compile or persistent-cache read) and the model load's wall-clock window (so the
    compiles inside the load are not counted twice), written to RESULT_PATH."""
    pin_threads(threads)
    import jax.monitoring

    from flowgen.engine.pipeline import Pipeline

    spans: list[tuple[str, float, float]] = []  # (phase, start, end), time.time() like JAX's own spans
    loads: list[tuple[float, float]] = []
    cache = {"hits": 0, "misses": 0}

    def on_span(event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            spans.append((COMPILE_EVENTS[event], start, end))

    def on_event(event: str, **_) -> None:
        for outcome in cache:
            if event == f"/jax/compilation_cache/cache_{outcome}":
                cache[outcome] += 1

    load_from = Pipeline.from_pretrained.__func__

    def timed_load(cls, *args, **kwargs):
        start = time.time()
        try:
            return load_from(cls, *args, **kwargs)
        finally:
            loads.append((start, time.time()))

    jax.monitoring.register_event_time_span_listener(on_span)
    jax.monitoring.register_event_listener(on_event)
    Pipeline.from_pretrained = classmethod(timed_load)
    from flowgen.cli import main as flowgen_main

    code: int | str | None = 0
    try:
        flowgen_main(args=cli_args, prog_name="flowgen")
    except SystemExit as done:
        code = done.code
    finally:
        Path(result_path).write_text(json.dumps({"spans": spans, "loads": loads, "cache": cache}))
    sys.exit(code)


def covered(spans: list[tuple[float, float]], windows: list[tuple[float, float]] | None = None) -> float:
    """Seconds covered by the union of `spans` (nested traces count once), within `windows` if given."""
    total, end = 0.0, float("-inf")
    merged: list[list[float]] = []
    for start, stop in sorted(spans):
        if start > end:
            merged.append([start, stop])
        else:
            merged[-1][1] = max(merged[-1][1], stop)
        end = merged[-1][1]
    for start, stop in merged:
        if windows is None:
            total += stop - start
        else:
            total += sum(max(0.0, min(stop, w_end) - max(start, w_start)) for w_start, w_end in windows)
    return total


class StepTimes:
    """The transformer calls of a diffusers pipeline call, by kv_cache_mode: step 0 with references
    ("extract": all tokens, references included) and the cached steps after it."""

    def __init__(self, transformer):
        self.transformer, self.calls = transformer, []

    def __enter__(self):
        forward = self.transformer.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.calls.append((kwargs.get("kv_cache_mode"), time.perf_counter() - start))

        self.transformer.forward = timed
        return self

    def __exit__(self, *exc):
        del self.transformer.forward

    def extraction_surplus(self) -> float:
        """What step 0's reference K/V extraction cost beyond a cached step, summed over the pipeline
        calls made so far: per call, the extract step minus the mean of its cached steps."""
        surplus, extract, cached = 0.0, None, []
        for mode, seconds in self.calls + [("extract", None)]:
            if mode == "extract":
                if extract is not None and cached:
                    surplus += extract - sum(cached) / len(cached)
                extract, cached = seconds, []
            elif mode == "cached":
                cached.append(seconds)
        return surplus


def diffusers_child(spec_path: str, result_path: str) -> None:
    """The diffusers script a user writes: load the pipeline, one call per image (loop) or per SKU
    (batched), save each image. Times its stages into RESULT_PATH."""
    spec = json.loads(Path(spec_path).read_text())
    pin_threads(spec["threads"])
    import torch
    from diffusers import Flux2KleinKVPipeline
    from PIL import Image
    from pipeline import StageClock

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    pipe = Flux2KleinKVPipeline.from_pretrained(spec["model"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - start

    by_sku: dict[str, list[dict]] = {}
    for edit in spec["edits"]:
        by_sku.setdefault(edit["sku"], []).append(edit)
    batched = spec["mode"] == "batched"
    calls: list[tuple[int, float]] = []  # (images, seconds) per pipeline call, with its saves
    opening = writing = 0.0
    out = Path(spec["out"])
    clock = StageClock(pipe)
    loop_start = time.perf_counter()
    with clock.wrapped() as times, StepTimes(pipe.transformer) as steps:
        for edits in by_sku.values():
            start = time.perf_counter()
            packshots = [Image.open(path).convert("RGB") for path in edits[0]["references"]]
            opening += time.perf_counter() - start
            for group in [edits] if batched else [[edit] for edit in edits]:
                start = time.perf_counter()
                generators = [torch.Generator("cpu").manual_seed(edit["seed"]) for edit in group]
                images = pipe(prompt=[edit["prompt"] for edit in group] if batched else group[0]["prompt"],
                              image=packshots, height=spec["size"], width=spec["size"],
                              num_inference_steps=spec["steps"],
                              generator=generators if batched else generators[0]).images
                saving = time.perf_counter()
                for image, edit in zip(images, group):
                    (out / edit["sku"]).mkdir(parents=True, exist_ok=True)
                    image.save(out / edit["sku"] / f"{edit['background']}.jpg", quality=JPEG_QUALITY)
                writing += time.perf_counter() - saving
                calls.append((len(group), time.perf_counter() - start))
        loop = time.perf_counter() - loop_start
        surplus = steps.extraction_surplus()
    stages = dict(times)
    in_calls = sum(seconds for _, seconds in calls) - writing
    stages["references"] += opening
    stages["denoise"] = in_calls - times["text"] - times["references"] - times["decode"]
    stages["encode/write"] = writing
    Path(result_path).write_text(json.dumps({"load": load, "loop": loop, "calls": calls, "stages": stages,
                                             "kv_extraction": surplus}))


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One side's run: end-to-end seconds, what of it went where, and steady-state seconds."""

    side: str
    images: int
    seconds: float  # end to end: process start to exit, as the parent saw it
    startup: float  # interpreter, imports, planning, exit: what is not the run, load or compile
    load: float
    compile: float  # flowgen only (inside its stages: the first call of each program compiles it)
    steady_seconds: float  # seconds for `steady_images` without start-up, load, compile (or warm-up call)
    steady_images: int
    stages: dict[str, float]
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def steady_rate(self) -> float:
        return self.steady_images / self.steady_seconds if self.steady_seconds > 0 else float("nan")


def child_env(threads: int, caches: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "FLOWGEN_CACHE")}
    env.update(caches)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_child(argv: list[str], env: dict[str, str], what: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: {what} exited with {done.returncode}:\n{tail}")
    return seconds, done.stdout


def run_flowgen(workload: Workload, tmp: Path, label: str, threads: int, caches: dict[str, str]) -> Run:
    from flowgen.run.manifest import Manifest

    out, result = tmp / f"out-{label}", tmp / f"{label}.json"
    argv = [sys.executable, str(Path(__file__)), "--child", "flowgen", "--result", str(result),
            "--threads", str(threads), "--", "run", str(workload.recipe), "--out", str(out), "--dtype", "float32"]
    seconds, stdout = run_child(argv, child_env(threads, caches), f"flowgen run ({label})")
    timed = json.loads(result.read_text())
    spans = [(start, end) for _, start, end in timed["spans"]]
    compile_s, compile_in_load = covered(spans), covered(spans, timed["loads"])
    phases = {phase: covered([(a, b) for p, a, b in timed["spans"] if p == phase]) for phase in COMPILE_EVENTS.values()}
    programs = sum(phase == "XLA compile or cache read" for phase, _, _ in timed["spans"])
    with Manifest(out, create=False) as manifest:
        run = manifest.runs()[-1]
        records = [r for r in manifest.records() if r["status"] == "ok"]
    summary = run["summary"]
    if len(records) != workload.images:
        raise SystemExit(f"error: flowgen ({label}) rendered {len(records)} of {workload.images} images: {stdout[-500:]}")
    stages = dict.fromkeys(STAGES, 0.0)
    batches = [r for r in records if r["batch"]["position"] == 0]  # a batch's engine stages are on each of its rows
    for record in batches:
        for stage, seconds_ in record["timings"]["engine_stages"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds_
    spent = summary["stage_seconds"]
    stages["encode/write"] = spent["encode"] + spent["write"]
    engine_other = spent["engine"] - sum(sum(r["timings"]["engine_stages"].values()) for r in batches)
    load = sum(end - start for start, end in timed["loads"])
    return Run("flowgen", workload.images, seconds, seconds - summary["seconds"], load, compile_s,
               summary["seconds"] - load - (compile_s - compile_in_load), workload.images, stages,
               {"programs": programs, "cache": timed["cache"], "phases": phases, "compile_in_load": compile_in_load,
                "batches": len(batches), "manifest": spent["manifest"], "engine_other": engine_other - load})


def run_diffusers(mode: str, workload: Workload, edits: list[dict], tmp: Path, label: str, threads: int,
                  model: Path, size: int) -> Run:
    spec, result = tmp / f"{label}.spec.json", tmp / f"{label}.json"
    spec.write_text(json.dumps({"model": str(model), "mode": mode, "threads": threads, "size": size, "steps": STEPS,
                                "edits": edits, "out": str(tmp / f"out-{label}")}))
    argv = [sys.executable, str(Path(__file__)), "--child", f"diffusers-{mode}", "--spec", str(spec),
            "--result", str(result), "--threads", str(threads)]
    seconds, _ = run_child(argv, child_env(threads, {}), f"diffusers {mode} ({label})")
    got = json.loads(result.read_text())
    first_images, first_seconds = got["calls"][0]
    return Run(f"diffusers {mode}", workload.images, seconds, seconds - got["load"] - got["loop"], got["load"], 0.0,
               got["loop"] - first_seconds, workload.images - first_images, got["stages"],
               {"kv_extraction": got["kv_extraction"], "calls": len(got["calls"])})


# ---------------------------------------------------------------------------------------------- report


def ceiling(loop: Run, edits: list[dict]) -> dict:
    """The most flowgen can gain per image over the diffusers loop on this CPU, one-time costs aside.

    The per-image cached-step work is equal on both sides and both run at the box's FLOP/s, so
    denoise, decode and writing cost the same at best; what flowgen saves is what the loop repeats:
    text (one encode per image; flowgen one per distinct prompt), reference VAE encodes (one per
    packshot per image; flowgen one per distinct packshot) and the reference K/V extraction in step 0
    (per image; flowgen one pre-pass per distinct packshot set). Each is taken from the loop's own
    stage times. work = the loop's seconds in its calls (end to end − start-up − load);
    ceiling = work / (work − what it repeats)."""
    n = len(edits)
    prompts = len({e["prompt"] for e in edits})
    uses = sum(len(e["references"]) for e in edits)
    packshots = len({p for e in edits for p in e["references"]})
    sets = len({tuple(e["references"]) for e in edits})
    repeated = {
        "text": loop.stages["text"] * (1 - prompts / n),
        "references": loop.stages["references"] * (1 - packshots / uses),
        "K/V extraction": loop.extra["kv_extraction"] * (1 - sets / n),
    }
    work = loop.seconds - loop.startup - loop.load
    best = work - sum(repeated.values())
    return {"repeated": repeated, "work": work, "best_seconds": best, "ceiling": work / best,
            "counts": {"images": n, "prompts": prompts, "packshot uses": uses, "packshots": packshots, "sets": sets}}


def table(runs: list[tuple[str, Run]], loop: Run) -> list[str]:
    lines = [("| side | end to end s | images/s | × loop | steady images/s | × loop | start-up s | load s | "
              "compile s | text s | references s | denoise s | decode s | encode/write s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, run in runs:
        compile_s = f"{run.compile:.1f} ({run.extra['programs']} programs)" if run.side == "flowgen" else "—"
        lines.append(
            f"| {label} | {run.seconds:.1f} | {run.images_per_second:.3f} | {loop.seconds / run.seconds:.2f}× | "
            f"{run.steady_rate:.3f} | {run.steady_rate / loop.steady_rate:.2f}× | {run.startup:.1f} | {run.load:.1f} | "
            f"{compile_s} | " + " | ".join(f"{run.stages.get(stage, 0.0):.1f}" for stage in STAGES) + " |")
    return lines


def report(args, workload: Workload, edits: list[dict], runs: list[tuple[str, Run]], settings: str) -> str:
    import jax
    import torch

    loop = next(run for label, run in runs if run.side == "diffusers loop")
    flowgen_runs = [(label, run) for label, run in runs if run.side == "flowgen"]
    top = ceiling(loop, edits)
    counts = top["counts"]
    n = counts["images"]
    two = sum(len(p) > 1 for p in workload.skus.values())
    setup = (
        f"{len(workload.skus)} SKUs ({two} with two packshots) × {len(workload.backgrounds)} background prompts = "
        f"{workload.images} edits, {args.size}², {STEPS} steps, float32, bench/pipeline.py's mid-size random KV model; "
        f"{args.threads} thread(s) per side; {args.repeats} interleaved round(s), fastest round per side shown. "
        f"flowgen: `flowgen run` in a child process (the CLI, plus timers on JAX's compile events and on the model load), {settings}. "
        f"diffusers {diffusers_version()}: `Flux2KleinKVPipeline`, the same seeds (torch generators), JPEG {JPEG_QUALITY} "
        f"like flowgen. {platform.machine()}, {os.cpu_count()} CPU, jax {jax.__version__}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load average {args.load_at_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (this bench adds up to "
        f"{args.threads}; the rest is other jobs)."
    )
    notes = (
        "Start-up: what is outside the run and the load (interpreter, imports, planning, exit). flowgen's compile "
        "(JAX's trace, lower and XLA compile or cache-read spans, nested ones once) lies inside its load and "
        "stages, as each program compiles on its first call; the columns do not add up. Steady state: flowgen = "
        "images / (run record seconds − load − the compile outside the load); diffusers = the images after its "
        "first call / their seconds. Diffusers' references = resize/crop + VAE encode (+ opening the packshots); "
        "its denoise includes step 0's reference K/V extraction "
        f"({loop.extra['kv_extraction']:.1f} s beyond a cached step in the loop)."
    )
    repeated = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in top["repeated"].items())
    arithmetic = (
        "CPU ceiling (the per-image cached-step work is equal on both sides, so flowgen can only save what the "
        f"loop repeats): {n} images use {counts['prompts']} distinct prompts, {counts['packshots']} distinct packshots "
        f"({counts['packshot uses']} uses) in {counts['sets']} reference sets. Of the loop's {top['work']:.1f} s in its "
        f"calls (end to end − start-up − load) it repeats {repeated}, so flowgen's per-image work is at best "
        f"{top['best_seconds'] / n:.2f} s vs the loop's {top['work'] / n:.2f} s: **ceiling {top['ceiling']:.2f}×** "
        "(one-time costs aside)."
    )
    lines = ["", SECTION, "", f"`{command(args)}`", "", setup, "", *table(runs, loop), "", notes, "", arithmetic]
    for label, run in flowgen_runs:
        without_compile = run.seconds - run.compile
        phases = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in run.extra["phases"].items())
        cache = run.extra["cache"]
        lines.append(
            f"- {label}: per-image work (run record − load − compile) {run.steady_seconds / n:.2f} s = "
            f"{top['work'] / run.steady_seconds:.2f}× the loop's, {top['work'] / run.steady_seconds / top['ceiling']:.0%} "
            f"of the ceiling; end to end {loop.seconds / run.seconds:.2f}× the loop "
            f"({loop.seconds / without_compile:.2f}× without its compile). One-time: start-up {run.startup:.1f} s, "
            f"load {run.load:.1f} s (of which compile {run.extra['compile_in_load']:.1f}), compile {run.compile:.1f} s "
            f"({phases}; {run.extra['programs']} programs, persistent cache {cache['hits']} hits / {cache['misses']} "
            f"misses); the loop's start-up {loop.startup:.1f} s + load {loop.load:.1f} s.")
    lines.append("")
    return "\n".join(lines)


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def command(args) -> str:
    parts = ["JAX_PLATFORMS=cpu .venv/bin/python bench/workload.py", f"--repeats {args.repeats}"]
    if args.threads_given:
        parts.append(f"--threads {args.threads}")
    if args.warm_cache:
        parts.append("--warm-cache")
    if args.quick:
        parts.append("--quick")
    if args.size != 256:
        parts.append(f"--size {args.size}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (A B C per round)")
    parser.add_argument("--threads", type=int, help="CPUs per side (default: all this process may use)")
    parser.add_argument("--warm-cache", action="store_true", help="a cold flowgen run first; the rounds share its cache")
    parser.add_argument("--quick", action="store_true", help="2 SKUs × 2 prompts")
    parser.add_argument("--size", type=int, default=256, help="output width and height (multiple of 16)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    available = len(os.sched_getaffinity(0))
    args.threads_given = args.threads is not None
    args.threads = available if args.threads is None else args.threads
    if args.child == "flowgen":
        return flowgen_child(args.result, args.threads, args.cli_args)
    if args.child:
        return diffusers_child(args.spec, args.result)
    if args.cli_args:
        parser.error(f"unrecognized arguments: {' '.join(args.cli_args)}")
    if not 1 <= args.threads <= available:
        parser.error(f"--threads: {args.threads} is not allowed; use 1 to {available} (the CPUs this process may use)")
    if args.size % 16 or not 128 <= args.size <= 2048:
        parser.error(f"--size: {args.size} is not allowed; use a multiple of 16 from 128 to 2048")
    if args.repeats < 1:
        parser.error(f"--repeats: {args.repeats} is not allowed; use 1 or more")
    args.load_at_start = os.getloadavg()[0]

    from pipeline import write_model

    with tempfile.TemporaryDirectory(prefix="flowgen-workload-") as name:
        tmp = Path(name)
        print("writing the model and the workload ...", flush=True)
        model = write_model(tmp)
        workload = write_workload(tmp / "recipe", model, args.size, args.quick)
        edits = planned_edits(workload)

        def caches(tag: str) -> dict[str, str]:
            """Fresh cache folders per flowgen run (cold), or one shared set (--warm-cache)."""
            folder = tmp / ("cache-shared" if args.warm_cache else f"cache-{tag}")
            env = {"FLOWGEN_CACHE": str(folder / "flowgen")}
            if args.warm_cache:
                env["JAX_COMPILATION_CACHE_DIR"] = str(folder / "jax")
                for knob in ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
                    env.setdefault(knob, os.environ.get(knob, "0"))  # cache every program, not only slow ones
            return env

        if args.warm_cache:
            settings = ("the rounds share a JAX_COMPILATION_CACHE_DIR and FLOWGEN_CACHE that a first, cold run filled "
                        "(persistent-cache thresholds 0)")
        else:
            settings = "every run with empty JAX_COMPILATION_CACHE_DIR / FLOWGEN_CACHE settings (cold)"
        runs: dict[str, list[Run]] = {}
        if args.warm_cache:
            cold = run_flowgen(workload, tmp, "cold", args.threads, caches("cold"))
            runs["flowgen, cold cache"] = [cold]
            print(f"flowgen (cold cache): {cold.seconds:.1f} s, compile {cold.compile:.1f} s", flush=True)
        flowgen_label = "flowgen, warm cache" if args.warm_cache else "flowgen"
        for round_ in range(1, args.repeats + 1):  # interleaved: every side sees the same machine load
            for label in (flowgen_label, "diffusers loop", "diffusers batched per SKU"):
                if label == flowgen_label:
                    run = run_flowgen(workload, tmp, f"flowgen-{round_}", args.threads, caches(str(round_)))
                else:
                    mode = "loop" if label == "diffusers loop" else "batched"
                    run = run_diffusers(mode, workload, edits, tmp, f"{mode}-{round_}", args.threads, model, args.size)
                runs.setdefault(label, []).append(run)
                print(f"round {round_}/{args.repeats} {label}: {run.seconds:.1f} s end to end, "
                      f"{run.steady_rate:.3f} images/s steady", flush=True)
        fastest = [(label, min(rounds, key=lambda r: r.seconds)) for label, rounds in runs.items()]
        if args.repeats > 1:
            for label, rounds in runs.items():
                print(f"{label}: end to end median {statistics.median(r.seconds for r in rounds):.1f} s, "
                      f"min {min(r.seconds for r in rounds):.1f} s", flush=True)
        print(report(args, workload, edits, fastest, settings))


if __name__ == "__main__":
    main()
