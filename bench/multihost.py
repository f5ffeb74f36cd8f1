"""Images per second of one plan run by 1 process, by 2 shard processes at once (`--shard K/N`),
and on a local Ray cluster (`--ray`), on this machine, with the fixed start-up costs listed apart.

    python bench/multihost.py [--results 32] [--json out.json]

Each configuration is fresh processes on a fresh output folder (the tiny model, 128x128, 2 steps,
batches of 4). "start-up" is wall time minus the run's own time (the summary line's seconds):
interpreter, imports, planning, and for Ray the cluster start; model loading and compiling fall
inside the run's time (each shard process and each Ray actor loads and compiles once). On a
2-core CPU no speed-up is expected: the figures are the overhead of spreading a plan.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r": (\d+) rendered, .* in ([\d.]+)s")


def _command(out: Path, results: int, *extra: str) -> list[str]:
    options = ["model=flux2-klein-tiny", "task.width=128", "task.height=128", "task.steps=2",
               f"task.numberResults={results // 4}"]
    return [sys.executable, "-m", "flowgen.cli", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out),
            *[a for o in options for a in ("--set", o)], *extra]


def _run_all(commands: list[list[str]]) -> tuple[float, list[tuple[int, float]]]:
    """Start every command at once; (wall seconds, [(rendered, run seconds)] per process)."""
    env = {**os.environ, "FLOWGEN_MAX_BATCH": "4", "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for c in commands]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    parsed = []
    for proc, output in zip(procs, outputs):
        match = SUMMARY.search(output)
        if proc.returncode != 0 or match is None:
            raise SystemExit(f"a run failed (exit {proc.returncode}):\n{output[-2000:]}")
        parsed.append((int(match[1]), float(match[2])))
    return wall, parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=32, help="results in the plan (a multiple of 4)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "1 process": [_command(Path(tmp, "one"), args.results)],
            "2 shards (--shard 0/2, 1/2 at once)": [_command(Path(tmp, "two"), args.results, "--shard", f"{k}/2")
                                                    for k in range(2)],
            "ray (local cluster, 2 actors)": [_command(Path(tmp, "ray"), args.results, "--ray")],
        }
        for name, commands in configs.items():
            wall, parsed = _run_all(commands)
            rendered = sum(n for n, _ in parsed)
            run_seconds = max(s for _, s in parsed)
            rows.append({"config": name, "rendered": rendered, "wall_s": round(wall, 2),
                         "run_s": round(run_seconds, 2), "startup_s": round(wall - run_seconds, 2),
                         "images_per_s_wall": round(rendered / wall, 3),
                         "images_per_s_run": round(rendered / run_seconds, 3)})
            print(f"{name:40s} {rendered:4d} images  wall {wall:6.1f}s  run {run_seconds:6.1f}s  "
                  f"start-up {wall - run_seconds:5.1f}s  {rendered / wall:.2f} img/s (wall)  "
                  f"{rendered / run_seconds:.2f} img/s (run)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
