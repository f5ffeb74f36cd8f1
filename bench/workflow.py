"""Workflow benchmark: plan compile at scale, per-result overhead, and tiny-model throughput.

    python bench/workflow.py            # all three figures, appended to bench/RESULTS.md
    python bench/workflow.py --no-append --products 100 --results 32
    python bench/workflow.py --plan-only --repeat 3 --no-append   # the plan figure, best of 3

1. Compile a plan of PRODUCTS x SURFACES items (generated CSVs -> recipe -> load, expand, plan):
   target ≤ 5 s for 100k items.
2. Per-result overhead (encode + atomic write + manifest) as a share of engine time, on the tiny
   model (target ≤ 5 %).
3. A RESULTS-result tiny run's images/s.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

RECIPE = """\
version: 1
name: bench
model: {model}
seed: 1
datasets:
  products: {{csv: products.csv, key: "{{sku}}"}}
  surfaces: {{csv: surfaces.csv, key: "{{surface}}"}}
matrix:
  product: products
  surface: surfaces
task:
  positivePrompt: "a {{product.name}} on {{surface.surface}}, studio light"
  width: {size}
  height: {size}
  steps: {steps}
  outputFormat: {fmt}
output:
  filename: "{{product.sku}}/{{surface.surface}}_{{result}}.{{ext}}"
"""


def write_recipe(folder: Path, products: int, surfaces: int, model: str, size: int, steps: int, fmt: str = "JPG") -> Path:
    with open(folder / "products.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "name"])
        writer.writerows([f"P{i:05d}", f"product {i}"] for i in range(products))
    with open(folder / "surfaces.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["surface"])
        writer.writerows([f"surface{j:03d}"] for j in range(surfaces))
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, size=size, steps=steps, fmt=fmt))
    return path


def bench_compile(products: int, surfaces: int, model: str) -> dict:
    """Time each stage of `flowgen plan` on a PRODUCTS x SURFACES recipe (wall clock, and this
    process's CPU time in `cpu_s`, which other jobs on a shared machine inflate less)."""
    import hashlib

    from flowgen.commands.plan import load_run_plan
    from flowgen.plan.compile import compile_plan
    from flowgen.plan.from_recipe import _reference_check, model_facts
    from flowgen.plan.hashing import canonical_json
    from flowgen.recipe.api import expand_items, load_recipe
    from flowgen.run.settings import max_batch_setting

    with tempfile.TemporaryDirectory() as tmp:
        path = write_recipe(Path(tmp), products, surfaces, model, 128, 2)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        recipe = load_recipe(path)
        t1 = time.perf_counter()
        items = expand_items(recipe)
        t2 = time.perf_counter()
        name, identity, distilled = model_facts(recipe)
        plan = compile_plan(recipe_name=recipe.name, recipe_seed=recipe.seed, items=items, out_dir=Path(tmp) / "out",
                            filename=recipe.filename_renderer(), model=name, model_identity=identity, distilled=distilled,
                            recipe_hash=hashlib.sha256(canonical_json(recipe.raw).encode()).hexdigest(),
                            max_batch=max_batch_setting(), reference_check=_reference_check())
        t3 = time.perf_counter()
        run_plan = load_run_plan(plan)[0]
        batches = run_plan.batches()
        t4 = time.perf_counter()
        cpu = time.process_time() - cpu0
    return {"items": len(plan.items), "results": len(plan.results), "batches": len(batches),
            "load_s": t1 - t0, "expand_s": t2 - t1, "compile_s": t3 - t2, "diff_batch_s": t4 - t3, "total_s": t4 - t0,
            "cpu_s": cpu}


def best_compile(products: int, surfaces: int, model: str, repeat: int) -> dict:
    """bench_compile `repeat` times, each in a fresh process (no warm caches); the run with the
    lowest total wall time (the least disturbed by other jobs) is kept."""
    if repeat <= 1:
        return bench_compile(products, surfaces, model)
    import json
    import subprocess

    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import workflow; "
            f"print(json.dumps(workflow.bench_compile({products}, {surfaces}, {model!r})))")
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
            for _ in range(repeat)]
    return min(runs, key=lambda run: run["total_s"])


def bench_run(results: int, model: str, size: int, steps: int) -> dict:
    from flowgen.plan.from_recipe import plan_recipe
    from flowgen.run.engine import PipelineEngine
    from flowgen.run.executor import against_folder, execute
    from flowgen.run.settings import max_batch_setting

    with tempfile.TemporaryDirectory() as tmp:
        products = max(1, results // 10)
        path = write_recipe(Path(tmp), products, results // products, model, size, steps)
        plan = plan_recipe(path, Path(tmp) / "out", [], max_batch_setting())
        engine = PipelineEngine(plan.engine_model)
        warm = plan_recipe(write_recipe(Path(tmp), 1, plan.max_batch, model, size, steps), Path(tmp) / "warm", [],
                           plan.max_batch)
        execute(against_folder(warm), engine)  # load + compile outside the timed run
        summary = execute(against_folder(plan), engine)
    stages = summary.stage_seconds
    overhead = stages["encode"] + stages["write"] + stages["manifest"]
    return {"results": summary.rendered, "seconds": summary.seconds, "images_per_s": summary.images_per_second,
            "engine_s": stages["engine"], "overhead_s": overhead,
            "overhead_share": overhead / stages["engine"] if stages["engine"] else float("nan"),
            "per_result_overhead_ms": 1000 * overhead / max(1, summary.rendered), "load_s": engine.load_seconds,
            "size": size, "steps": steps, "max_batch": plan.max_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--surfaces", type=int, default=100)
    parser.add_argument("--results", type=int, default=200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default="flux2-klein-tiny")
    parser.add_argument("--skip-run", "--plan-only", dest="skip_run", action="store_true", help="only the plan-compile figure")
    parser.add_argument("--repeat", type=int, default=1, help="plan compile: best of N runs, each in a fresh process")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    lines = []
    c = best_compile(args.products, args.surfaces, args.model, args.repeat)
    best = f", best of {args.repeat} runs" if args.repeat > 1 else ""
    lines.append(f"- plan compile: {c['items']} items / {c['results']} results -> {c['batches']} batches in "
                 f"{c['total_s']:.2f} s (CPU {c['cpu_s']:.2f} s{best}; target ≤ 5 s): load_recipe {c['load_s']:.2f} s, "
                 f"expand_items {c['expand_s']:.2f} s (recipe layer); compile_plan {c['compile_s']:.2f} s (ids, seeds, hashes, "
                 f"output paths), diff + batching {c['diff_batch_s']:.2f} s")
    print(lines[-1], flush=True)
    if not args.skip_run:
        r = bench_run(args.results, args.model, args.size, args.steps)
        lines.append(f"- tiny run ({args.model}, {r['size']}x{r['size']}, {r['steps']} steps, max batch {r['max_batch']}): "
                     f"{r['results']} results in {r['seconds']:.2f} s = {r['images_per_s']:.1f} images/s "
                     f"(model load {r['load_s']:.1f} s, not counted)")
        lines.append(f"- per-result overhead (encode + atomic write + manifest): {r['per_result_overhead_ms']:.2f} ms "
                     f"= {100 * r['overhead_share']:.1f} % of engine time (engine {r['engine_s']:.2f} s; target ≤ 5 %)")
        print("\n".join(lines[-2:]), flush=True)
    if not args.no_append:
        machine = f"{platform.machine()}, {os.cpu_count()} CPU, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
        append_section(ROOT / "bench" / "RESULTS.md", f"Run on {machine}:\n\n" + "\n".join(lines) + "\n")


def append_section(results: Path, block: str, header: str = "## Workflow (bench/workflow.py)") -> None:
    """Add `block` at the end of our section (created at the end of the file if missing),
    leaving the other teammates' sections alone."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if header not in text:
        text = text.rstrip("\n") + f"\n\n{header}\n\n{block}"
    else:
        start = text.index(header) + len(header)
        end = text.find("\n## ", start)
        end = len(text) if end < 0 else end + 1
        text = text[:end].rstrip("\n") + "\n\n" + block + ("\n" + text[end:] if end < len(text) else "")
    results.write_text(text)

if __name__ == "__main__":
    main()
