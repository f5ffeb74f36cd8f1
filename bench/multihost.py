"""Images per second of one plan run by 1 process, by 2 shard processes at once (`--shard K/N`),
by 2 processes of one multi-controller JAX job on one mesh of 4 forced CPU devices (`--distributed`,
a coordinator on 127.0.0.1; next to 1 process on the same 4-device mesh), and on a local Ray cluster (`--ray`), on this machine, with the fixed
start-up costs listed apart.

    python bench/multihost.py [--results 32] [--skip-ray] [--json out.json]

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
import socket
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


def _distributed(out: Path, results: int) -> list[tuple[list[str], dict[str, str]]]:
    """The two processes of a `--distributed` job (2 forced CPU devices each: one mesh of 4)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "FLOWGEN_COORDINATOR": f"127.0.0.1:{port}",
           "FLOWGEN_NUM_PROCESSES": "2"}
    return [(_command(out, results, "--distributed"), {**env, "FLOWGEN_PROCESS_ID": str(k)}) for k in range(2)]


def _run_all(commands: list) -> tuple[float, list[tuple[int, float]]]:
    """Start every command (a list, or (list, extra environment)) at once; (wall seconds, [(rendered,
    run seconds)] per process)."""
    env = {**os.environ, "FLOWGEN_MAX_BATCH": "4", "JAX_PLATFORMS": "cpu"}
    commands = [c if isinstance(c, tuple) else (c, {}) for c in commands]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for c, extra in commands]
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
    parser.add_argument("--skip-ray", action="store_true", help="leave the Ray row out (its cluster start is slow)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "1 process": [_command(Path(tmp, "one"), args.results)],
            "2 shards (--shard 0/2, 1/2 at once)": [_command(Path(tmp, "two"), args.results, "--shard", f"{k}/2")
                                                    for k in range(2)],
            "1 process, 4 forced CPU devices (data=4)": [
                (_command(Path(tmp, "four"), args.results), {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})],
            "--distributed (2 processes, one mesh of 4)": _distributed(Path(tmp, "dist"), args.results),
            "ray (local cluster, 2 actors)": [_command(Path(tmp, "ray"), args.results, "--ray")],
        }
        if args.skip_ray:
            del configs["ray (local cluster, 2 actors)"]
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
