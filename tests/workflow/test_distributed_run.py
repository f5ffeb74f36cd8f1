"""`flowgen run --distributed`: two local processes (2 forced CPU devices each) joined through a JAX
coordinator on 127.0.0.1 render one plan on ONE mesh of 4 devices (recorded as "data=4,model=1 over 2
processes"), each recording the rows its devices computed; process 0 merges. The merged manifest
equals a single-process run's apart from timings, run ids and layout, images within 2 uint8 levels
(>= 45 dB); a process killed mid-run makes the other exit with one `error:` line within the heartbeat
timeout; a rerun completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowgen.commands.run import run_command
from flowgen.run.manifest import Manifest
from flowgen.run.merge import MergedView
from flowgen.run.shards import Shard

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ["model=flux2-klein-tiny", "task.width=128", "task.height=128", "task.steps=2", "task.numberResults=6"]
HEARTBEAT = 15  # seconds: --heartbeat-timeout of these runs (5 s missed a live peer once, under a loaded suite)
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(recipe: Path, out: Path, port: int, process_id: int, count: int = 2, options=OPTIONS) -> subprocess.Popen:
    env = {**os.environ, "FLOWGEN_MAX_BATCH": "4", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "FLOWGEN_COORDINATOR": f"127.0.0.1:{port}",
           "FLOWGEN_NUM_PROCESSES": str(count), "FLOWGEN_PROCESS_ID": str(process_id)}
    args = [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(out), "--distributed",
            "--heartbeat-timeout", str(HEARTBEAT), "--init-timeout", "120"]
    args += [a for option in options for a in ("--set", option)]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pair(recipe: Path, out: Path, options=OPTIONS) -> list[tuple[int, str, str]]:
    port = _free_port()
    procs = [_start(recipe, out, port, k, options=options) for k in range(2)]
    return [(p.wait(timeout=TIMEOUT), *p.communicate()) for p in procs]


def _kill_mid_run(recipe: Path, out: Path, victim: int) -> tuple[int, float, str]:
    """Start both processes on `out`, SIGKILL `victim` once it recorded a batch this time; the
    survivor's (exit code, seconds it took to exit after the kill, stderr)."""
    port = _free_port()
    procs = [_start(recipe, out, port, k) for k in range(2)]
    victim_db = Shard(victim, 2).db_path(out)
    before = _recorded(victim_db)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and procs[victim].poll() is None and _recorded(victim_db) <= before:
        time.sleep(0.05)
    procs[victim].send_signal(signal.SIGKILL)  # the command and, with it, its JAX process
    killed_at = time.monotonic()
    procs[victim].communicate()
    code = procs[1 - victim].wait(timeout=TIMEOUT)
    return code, time.monotonic() - killed_at, procs[1 - victim].communicate()[1]


def _recorded(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not there yet
        return 0


def _essentials(out: Path) -> dict[tuple[str, int], tuple]:
    """What a result is, without timings, run ids or layout: status, content hash, file, seed, batch size."""
    with Manifest(out, create=False) as manifest:
        return {(r["item_id"], r["result_index"]): (r["status"], r["content_hash"], r["output"]["path"], r["seed"],
                                                    r["batch"]["size"]) for r in manifest.records()}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _meshes(out: Path) -> set[str]:
    with Manifest(out, create=False) as manifest:
        return {r["batch"]["mesh"] for r in manifest.records()} | {r["engine"]["mesh"] for r in manifest.records()}


@pytest.mark.slow
def test_two_processes_render_one_plan_and_a_killed_peer_ends_the_other_with_one_line(tmp_path, monkeypatch):
    recipe = tmp_path / "quickstart.yaml"
    recipe.write_text((ROOT / "recipes" / "quickstart.yaml").read_text() + "canary: {items: 2, threshold_db: 40}\n")
    monkeypatch.setenv("FLOWGEN_MAX_BATCH", "4")
    single = tmp_path / "single"
    assert run_command(str(recipe), str(single), OPTIONS, None, False) == 0
    expected = _essentials(single)
    assert len(expected) == 24

    out = tmp_path / "distributed"
    for code, _stdout, stderr in _pair(recipe, out):
        assert code == 0, stderr[-3000:]
        assert not [line for line in stderr.splitlines() if line.startswith("error:")]
    assert _essentials(out) == expected
    assert _meshes(out) == {"data=4,model=1 over 2 processes"}  # one mesh over both processes' devices
    for path in {v[2] for v in expected.values()}:
        ours, theirs = _pixels(out / path), _pixels(single / path)
        assert np.abs(ours - theirs).max() <= 2 and _psnr(ours, theirs) >= 45, path
    with Manifest(out, create=False) as manifest:  # each process recorded (under its run) the rows it computed
        runs = Counter(r["run_id"] for r in manifest.records())
    assert sorted(runs.values()) == [12, 12], runs
    assert list(Path(out, ".flowgen", "shards").glob("*.sqlite")) == []  # process 0 folded both
    for code, stdout, stderr in _pair(recipe, out):  # again: nothing to render; the canary, on both, together
        assert code == 0, stderr[-3000:]
        assert "0 rendered, 24 unchanged" in stdout and "canary: 2 fixed item(s) render as their first" in stdout
    with Manifest(out, create=False) as manifest:  # a row process 1's devices computed (position 3 of 4) ...
        row = next(r for r in manifest.records() if r["batch"]["position"] == 3)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    replay = subprocess.run(  # ... replays bit for bit in one process on the same axes (data=4,model=1)
        [sys.executable, "-m", "flowgen.cli", "regen", str(out), f"{row['item_id']}#{row['result_index']}",
         "--verify", "--to", str(tmp_path / "regen")], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=TIMEOUT)
    assert replay.returncode == 0 and replay.stdout.startswith("identical"), replay.stdout + replay.stderr[-2000:]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 24

    killed_out = tmp_path / "killed"
    for victim in (1, 0):  # process 1: process 0 finds it gone; process 0: the coordination service goes with it
        survivor = 1 - victim
        code, waited, stderr = _kill_mid_run(recipe, killed_out, victim)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, stderr[-3000:]
        assert "Traceback" not in stderr and "Check failure" not in stderr and "GRPC" not in stderr, stderr[-3000:]
        assert waited < HEARTBEAT + 30, waited  # at most the heartbeat timeout and the batch in progress
        # the next gather of a batch's images fails at once (either way), the watcher sees no heartbeats
        # (process 1 gone), or XLA ends the survivor at once (process 0 gone: its supervisor says so)
        assert errors[0].startswith(f"error: distributed run, process {survivor} of 2"), errors[0]
        reasons = ["a process of the device mesh cannot be reached", "process 1 stopped sending heartbeats",
                   f"process {survivor} of 2 stopped: Terminating process because the JAX distributed service"]
        assert any(reason in errors[0] for reason in reasons[: 2 if victim == 1 else 3]), errors[0]
        with MergedView(killed_out) as view:
            assert 0 < len(view.index()) < 24  # what completed batches recorded is kept

    for code, _stdout, stderr in _pair(recipe, killed_out):  # the rerun completes the plan
        assert code == 0, stderr[-3000:]
    assert _essentials(killed_out) == expected
    rows = [json.loads(line) for line in (killed_out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 == len({(r["item_id"], r["result_index"]) for r in rows})


EDITS = """version: 1
name: edits
model: flux2-klein-tiny
seed: 11
datasets:
  products: {jsonl: rows.jsonl, key: "{sku}"}
  surfaces: {values: [marble, oak]}
matrix: {product: products, surface: surfaces}
task:
  positivePrompt: "{product.name} on {surface}"
  width: 128
  height: 128
  steps: 2
  numberResults: 2
  outputFormat: PNG
  inputs: "{product.inputs}"
output: {dir: out, filename: "{product.sku}_{surface}_{result}.{ext}"}
"""
EDIT_ROWS = [  # two references, one, a shared style image, none: per-row and shared reference K/V on the mesh
    {"sku": "A", "name": "white sneaker", "inputs": {"referenceImages": ["refs/A-100.jpg", "refs/brand-style.jpg"]}},
    {"sku": "B", "name": "brown boot", "inputs": {"referenceImages": ["refs/B-200.jpg"]}},
    {"sku": "D", "name": "a lighthouse", "inputs": {}},
]


@pytest.mark.slow
def test_references_on_the_mesh_over_two_processes_render_as_one_process_on_the_same_axes(tmp_path):
    shutil.copytree(ROOT / "recipes" / "refs", tmp_path / "refs")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in EDIT_ROWS))
    recipe = tmp_path / "edits.yaml"
    recipe.write_text(EDITS)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FLOWGEN_MAX_BATCH": "4",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    one = subprocess.run([sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(tmp_path / "one")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    for code, _stdout, stderr in _pair(recipe, tmp_path / "two", options=[]):
        assert code == 0, stderr[-3000:]
    with Manifest(tmp_path / "one", create=False) as a, Manifest(tmp_path / "two", create=False) as b:
        ones = {(r["item_id"], r["result_index"]): r for r in a.records()}
        twos = {(r["item_id"], r["result_index"]): r for r in b.records()}
    assert ones.keys() == twos.keys() and len(ones) == 12
    for rid, record in twos.items():  # the same per-device program on the same rows: the same bytes
        assert record["batch"]["mesh"] == "data=4,model=1 over 2 processes", record["batch"]
        assert ones[rid]["batch"]["mesh"] == "data=4,model=1"
        assert {k: v for k, v in record["batch"].items() if k != "mesh"} == {
            k: v for k, v in ones[rid]["batch"].items() if k != "mesh"}
        assert record["output"]["sha256"] == ones[rid]["output"]["sha256"], rid


def test_a_process_id_out_of_range_is_one_line_and_nothing_is_written(tmp_path):
    recipe = tmp_path / "quickstart.yaml"
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", recipe)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FLOWGEN_COORDINATOR": "127.0.0.1:1", "FLOWGEN_NUM_PROCESSES": "2",
           "FLOWGEN_PROCESS_ID": "2"}
    result = subprocess.run([sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(tmp_path / "out"),
                             "--distributed"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: $FLOWGEN_PROCESS_ID=2: must be below $FLOWGEN_NUM_PROCESSES=2 "
                                     "(processes are numbered 0 to 1)")
    assert not (tmp_path / "out").exists()
