"""Start-up: time to the first image in a fresh process, cold (empty compile cache) vs warm (the
cache a previous process filled), and weight load time from the released safetensors vs from the
Orbax checkpoint `flowgen convert` writes.

Each start is a fresh `flowgen run` process on the quickstart recipe (4 images, one batch), its
numbers read from the run record (`startup`: load, compile, first_image); `process` is the
process's wall time (imports, planning and writing included). Cold and warm starts alternate;
the cold one empties the compile cache first. Loads are timed in fresh processes too
(`Pipeline.from_pretrained`, weights in the card's dtype), alternating safetensors and Orbax.

    JAX_PLATFORMS=cpu .venv/bin/python bench/startup.py                 # tiny model
    JAX_PLATFORMS=cpu .venv/bin/python bench/startup.py --mid           # + a mid-size random model
    .venv/bin/python bench/startup.py --model /path/to/klein-9b --repeats 1   # a real model (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_LOAD = """
import json, sys, time
start = time.perf_counter()
from flowgen.engine import Pipeline
pipe = Pipeline.from_pretrained(sys.argv[1])
print("LOAD " + json.dumps({"seconds": time.perf_counter() - start}))
"""


def _env(cache: Path, compile_cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWGEN_COMPILE_CACHE")}
    env.update(FLOWGEN_CACHE=str(cache), FLOWGEN_COMPILE_CACHE=str(compile_cache))
    return env


def start_once(recipe: Path, model: str, out: Path, env: dict) -> dict:
    """One fresh `flowgen run`: its run record's startup, and the process's wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flowgen", "run", str(recipe), "--out", str(out), "--set", f"model={model}"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"flowgen run failed: {done.stderr[-2000:]}")
    sys.path.insert(0, str(REPO))
    from flowgen.run.manifest import Manifest

    with Manifest(out, create=False) as manifest:
        startup = manifest.runs()[-1]["summary"]["startup"]
    shutil.rmtree(out)
    return {**startup, "process": round(wall, 3)}


def load_once(model: str, env: dict) -> float:
    done = subprocess.run([sys.executable, "-c", _LOAD, model], env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"load failed: {done.stderr[-2000:]}")
    return json.loads(next(x for x in done.stdout.splitlines() if x.startswith("LOAD "))[5:])["seconds"]


def weights_folder(model: str, env: dict) -> str:
    """The pipeline folder a card name (or a folder) stands for."""
    code = "import sys; from flowgen.engine import resolve_model; print(resolve_model(sys.argv[1]).weights_path())"
    done = subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"cannot find the weights of {model}: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def convert(model: str, out: Path, env: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowgen", "convert", model, str(out)], env=env, capture_output=True, text=True, cwd=REPO
    )
    if done.returncode != 0:
        raise SystemExit(f"flowgen convert failed: {done.stderr[-2000:]}")


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def measure(model: str, repeats: int, work: Path) -> dict:
    cache, compile_cache = work / "cache", work / "compile-cache"
    env = _env(cache, compile_cache)
    recipe = REPO / "recipes" / "quickstart.yaml"
    start_once(recipe, model, work / "warmup", env)  # writes the tiny model, warms the OS file cache
    cold, warm = [], []
    for _ in range(repeats):
        shutil.rmtree(compile_cache, ignore_errors=True)
        cold.append(start_once(recipe, model, work / "out", env))
        warm.append(start_once(recipe, model, work / "out", env))
    result = {"model": model, "cold": cold, "warm": warm}
    if _has_convert():
        folder = weights_folder(model, env)
        orbax = work / "orbax"
        convert(folder, orbax, env)
        from_safetensors, from_orbax = [], []
        for _ in range(repeats):
            from_safetensors.append(load_once(folder, env))
            from_orbax.append(load_once(str(orbax), env))
        result.update(load_safetensors=from_safetensors, load_orbax=from_orbax)
    return result


def _has_convert() -> bool:
    return (REPO / "flowgen" / "commands" / "convert.py").is_file()


def report(result: dict) -> None:
    cold, warm = result["cold"], result["warm"]
    print(f"model {result['model']}: {len(cold)} cold and {len(warm)} warm starts (medians, seconds)")
    print(f"{'':8} {'process':>8} {'first image':>12} {'load':>6} {'compile':>8} {'programs':>9} {'cache hits':>11}")
    for name, rows in (("cold", cold), ("warm", warm)):
        print(
            f"{name:8} {median(rows, 'process'):8.2f} {median(rows, 'first_image'):12.2f} {median(rows, 'load'):6.2f} "
            f"{median(rows, 'compile'):8.2f} {median(rows, 'programs'):9.0f} {median(rows, 'cache_hits'):11.0f}"
        )
    print(
        f"warm/cold: first image {median(warm, 'first_image') / median(cold, 'first_image'):.2f}, "
        f"process {median(warm, 'process') / median(cold, 'process'):.2f}"
    )
    if "load_orbax" in result:
        st, ob = statistics.median(result["load_safetensors"]), statistics.median(result["load_orbax"])
        print(
            f"load (Pipeline.from_pretrained, fresh process, warm compile cache): safetensors {st:.2f} s, "
            f"Orbax {ob:.2f} s ({ob / st:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux2-klein-tiny", help="a model card name or a pipeline folder")
    parser.add_argument("--mid", action="store_true", help="also a mid-size random model (bench/pipeline.py's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="flowgen-startup-") as tmp:
        work = Path(tmp)
        models = [args.model]
        if args.mid:
            sys.path.insert(0, str(REPO / "bench"))
            from pipeline import write_model

            models.append(str(write_model(work / "mid")))
        for model in models:
            (work / "run").mkdir(exist_ok=True)
            result = measure(model, args.repeats, work / "run")
            report(result)
            results.append(result)
            shutil.rmtree(work / "run")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
