"""`flowgen run --mesh` on 8 forced CPU devices, end to end (subprocesses: the device count is fixed
when JAX starts).

One recipe of 20 results (edits with mixed reference sets — two references, one, shared style
image — and text-to-image) rendered on one device, on the default mesh of 8 devices (data=8) and on
`--mesh data=4,model=2`: every image within 45 dB (and 2 levels) of the one-device render, the
manifests equal apart from timings and layout fields (batch layout, mesh, and the image bytes a
level changes), the mesh recorded with every result; batches are multiples of the "data" size;
`regen --verify` replays the recorded mesh bit for bit, and on a machine that cannot hold it says
which mesh it used. Bad `--mesh` values are one `error:` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    {"sku": "A", "name": "white sneaker", "inputs": {"referenceImages": ["refs/A-100.jpg", "refs/brand-style.jpg"]}},
    {"sku": "B", "name": "brown boot", "inputs": {"referenceImages": ["refs/B-200.jpg"]}},
    {"sku": "C", "name": "red high-top", "inputs": {"referenceImages": ["refs/C-300.jpg", "refs/brand-style.jpg"]}},
    {"sku": "D", "name": "a lighthouse", "inputs": {}},
    {"sku": "E", "name": "a paper crane", "inputs": {}},
]
RECIPE = """version: 1
name: mesh-proof
model: flux2-klein-tiny
seed: 11
datasets:
  products: {jsonl: rows.jsonl, key: "{sku}"}
  surfaces: {values: [marble, oak]}
matrix:
  product: products
  surface: surfaces
task:
  positivePrompt: "{product.name} on {surface}"
  width: 128
  height: 128
  steps: 2
  numberResults: 2
  outputFormat: PNG
  inputs: "{product.inputs}"
output:
  dir: out
  filename: "{product.sku}_{surface}_{result}.{ext}"
"""
# what may differ between meshes: how the batch was laid out and computed, and the bytes of an
# image whose pixels moved by a level (its sha256, size and the image UUID derived from them)
LAYOUT_FIELDS = {"timings", "batch", "cost", "imageUUID", "run_id"}
PER_FOLDER_FIELDS = {"updated_at", "imageURL"}  # when and where each run wrote it
OUTPUT_BYTES_FIELDS = {"sha256", "bytes"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mesh_recipe")
    shutil.copytree(ROOT / "recipes" / "refs", folder / "refs")
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "mixed.yaml").write_text(RECIPE)
    return folder / "mixed.yaml"


def _flowgen(args: list[str], devices: int, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FLOWGEN_MESH", "FLOWGEN_MAX_BATCH")}
    env.update(JAX_PLATFORMS="cpu", FLOWGEN_CACHE=str(cache))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, "-m", "flowgen", *args], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT
    )


def _records(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {f"{r['item_id']}#{r['result_index']}": r for r in rows}


def _comparable(record: dict) -> dict:
    kept = {k: v for k, v in record.items() if k not in LAYOUT_FIELDS | PER_FOLDER_FIELDS}
    kept["engine"] = {k: v for k, v in record["engine"].items() if k != "mesh"}
    kept["output"] = {k: v for k, v in record["output"].items() if k not in OUTPUT_BYTES_FIELDS}
    return kept


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def renders(recipe, tmp_path_factory) -> dict[str, Path]:
    """The recipe rendered on one device, on the default 8-device mesh and on data=4,model=2."""
    work = tmp_path_factory.mktemp("mesh_runs")
    outs = {}
    for name, devices, extra in (("one", 1, []), ("data8", 8, []), ("data4_model2", 8, ["--mesh", "data=4,model=2"])):
        outs[name] = work / name
        done = _flowgen(["run", str(recipe), "--out", str(outs[name]), *extra], devices, work / "cache")
        assert done.returncode == 0, done.stderr[-3000:]
    outs["cache"] = work / "cache"
    return outs


@pytest.mark.slow
def test_every_mesh_renders_the_one_device_images(renders):
    one = _records(renders["one"])
    assert len(one) == 20
    for name, mesh in (("data8", "data=8,model=1"), ("data4_model2", "data=4,model=2")):
        other = _records(renders[name])
        assert other.keys() == one.keys()
        for rid, record in other.items():
            assert _comparable(record) == _comparable(one[rid]), rid  # equal apart from layout fields
            assert record["engine"]["mesh"] == record["batch"]["mesh"] == mesh  # the mesh is recorded
            assert one[rid]["batch"]["mesh"] == "data=1,model=1"
            data = int(mesh.split(",")[0].split("=")[1])
            assert record["batch"]["size"] % data == 0  # whole rows for every device
            a = _pixels(renders[name] / record["output"]["path"])
            b = _pixels(renders["one"] / one[rid]["output"]["path"])
            assert _psnr(a, b) >= 45 and np.abs(a - b).max() <= 2, rid


@pytest.mark.slow
def test_regen_replays_the_recorded_mesh_and_says_when_it_cannot(renders, tmp_path):
    record = next(iter(_records(renders["data8"]).values()))
    target = f"{record['item_id']}#{record['result_index']}"
    same = _flowgen(
        ["regen", str(renders["data8"]), target, "--verify", "--to", str(tmp_path / "a")], 8, renders["cache"]
    )
    assert same.returncode == 0 and "identical" in same.stdout and "note:" not in same.stdout, same.stdout
    fewer = _flowgen(["regen", str(renders["data8"]), target, "--to", str(tmp_path / "b")], 1, renders["cache"])
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    assert "note: recorded on mesh data=8,model=1, which this machine cannot hold" in fewer.stdout
    written = _pixels(tmp_path / "b" / record["output"]["path"])
    assert _psnr(written, _pixels(renders["data8"] / record["output"]["path"])) >= 45


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, problem",
    [
        ("data=3", "error: mesh 'data=3': data=3 does not divide this machine's 8 devices"),
        ("model=0", "error: mesh 'model=0': model must be a whole number of devices >= 1"),
        ("tensor=2", "error: mesh 'tensor=2': unknown axis 'tensor' (allowed: data, model"),
        ("data=16", "error: mesh 'data=16': data=16 needs 16 devices; this machine has 8"),
    ],
)
def test_a_bad_mesh_is_one_line_and_writes_nothing(recipe, tmp_path, mesh, problem):
    out = tmp_path / "out"
    done = _flowgen(["run", str(recipe), "--out", str(out), "--mesh", mesh], 8, tmp_path / "cache")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(problem)
    assert not out.exists()
