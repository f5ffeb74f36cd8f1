"""End to end on the real tiny model (flux2-klein-tiny): recipes -> images + manifest -> regen.

One pipeline is loaded per process and shared (PipelineEngine caches it); every run uses 128x128,
2 steps and batches of 4, so the whole module compiles a handful of programs. Subprocesses only
where a process must die (kill -9) or must be checked for what it imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from flowgen.cli import main as cli
from flowgen.commands.regen import regen_command
from flowgen.commands.run import run_command
from flowgen.run.manifest import Manifest, manifest_path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model=flux2-klein-tiny", "task.width=128", "task.height=128", "task.steps=2"]
QUICK = SMALL + ["task.numberResults=4"]  # 4 results per item: one item fills one batch of 4
PRODUCTS = SMALL + ["datasets.products.filter.sku=[C-300, D-400]", "include=[]"]  # 8 items x 2 results


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """A private copy of recipes/ (YAML, data, reference images) and batches of 4."""
    folder = tmp_path_factory.mktemp("recipes")
    for name in ("quickstart.yaml", "product-photos.yaml", "data", "refs"):
        source = ROOT / "recipes" / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    saved = os.environ.get("FLOWGEN_MAX_BATCH")
    os.environ["FLOWGEN_MAX_BATCH"] = "4"
    yield folder
    if saved is None:
        os.environ.pop("FLOWGEN_MAX_BATCH", None)
    else:
        os.environ["FLOWGEN_MAX_BATCH"] = saved


@pytest.fixture(scope="module")
def quickstart(recipes, tmp_path_factory):
    """The quickstart rendered once; later tests compare against these files."""
    out = tmp_path_factory.mktemp("quick")
    assert run_command(str(recipes / "quickstart.yaml"), str(out), QUICK, None, False) == 0
    return out


def records(out: Path) -> list[dict]:
    with Manifest(out, create=False) as manifest:
        return list(manifest.records())


def files(out: Path) -> dict[str, str]:
    """Relative image path -> sha256 of every image under `out` (manifest state excluded)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.*")) if p.suffix in (".png", ".jpg", ".webp") and ".flowgen" not in p.parts}


def assert_valid_manifest(out: Path, expected: int) -> None:
    rows = records(out)
    assert len(rows) == expected == len({(r["item_id"], r["result_index"]) for r in rows})
    for row in rows:
        assert row["status"] == "ok", row
        assert hashlib.sha256((out / row["output"]["path"]).read_bytes()).hexdigest() == row["output"]["sha256"]
        assert row["engine"]["device_kind"] and row["engine"]["dtype"] == "float32"
        assert row["model"]["identity"]["name"] == "flux2-klein-tiny"
    exported = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["item_id"], r["result_index"]) for r in exported] == [(r["item_id"], r["result_index"]) for r in rows]


def last_run(out: Path) -> dict:
    with Manifest(out, create=False) as manifest:
        return manifest.runs()[-1]["summary"]


def test_quickstart_renders_then_rerun_skips(quickstart, recipes):
    assert_valid_manifest(quickstart, 16)
    assert len(files(quickstart)) == 16 and len(set(files(quickstart).values())) == 16
    assert {r["batch"]["size"] for r in records(quickstart)} == {4}
    assert run_command(str(recipes / "quickstart.yaml"), str(quickstart), QUICK, None, False) == 0
    assert last_run(quickstart)["rendered"] == 0 and last_run(quickstart)["unchanged"] == 16


def test_reordered_rows_give_identical_bytes_and_an_added_row_runs_alone(quickstart, recipes, tmp_path):
    data = yaml.safe_load((recipes / "quickstart.yaml").read_text())
    subjects = data["datasets"]["subjects"]["values"]
    reordered = tmp_path / "reordered.yaml"
    reordered.write_text(yaml.safe_dump({**data, "datasets": {"subjects": {"values": subjects[::-1]}}}))
    assert run_command(str(reordered), str(tmp_path / "out"), QUICK, None, False) == 0
    assert files(tmp_path / "out") == files(quickstart)

    grown = tmp_path / "grown.yaml"
    grown.write_text(yaml.safe_dump({**data, "datasets": {"subjects": {"values": subjects[:2] + ["a tin robot"] + subjects[2:]}}}))
    before = files(tmp_path / "out")
    assert run_command(str(grown), str(tmp_path / "out"), QUICK, None, False) == 0
    assert last_run(tmp_path / "out")["rendered"] == 4 and last_run(tmp_path / "out")["unchanged"] == 16
    after = files(tmp_path / "out")
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == 20
    assert_valid_manifest(tmp_path / "out", 20)


@pytest.mark.slow
def test_product_photos_with_references_and_regen_verify(recipes, tmp_path, capsys):
    out = tmp_path / "products"
    assert run_command(str(recipes / "product-photos.yaml"), str(out), PRODUCTS, None, False) == 0
    assert_valid_manifest(out, 16)
    rows = records(out)
    assert all(len(r["references"]) == 2 and r["output"]["path"].endswith(".webp") for r in rows)
    assert {r["batch"]["size"] for r in rows} == {4}
    # each batch of 4 holds two different items (one reference set): regen must not depend on that
    target = next(r for r in rows if r["batch"]["position"] == 3)
    assert regen_command(str(out), [f"{target['item_id']}#{target['result_index']}", str(out / rows[0]["output"]["path"])],
                         True, None) == 0
    assert capsys.readouterr().out.count("identical") == 2


@pytest.mark.slow
def test_a_catalogue_of_distinct_packshots_batches_together_and_regens_identically(tmp_path, capsys):
    """Eight products, each its own packshot in one of three sizes: two batches of 4, one sampling
    loop each (the references are stacked per row), and every image replays bit for bit."""
    import numpy as np
    from PIL import Image

    from flowgen.run import engine as run_engine

    rng = np.random.default_rng(3)
    rows = ["sku,name,image"]
    for i in range(8):
        width, height = [(96, 128), (160, 112), (128, 128)][i % 3]
        coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        Image.fromarray(np.repeat(np.repeat(coarse, 16, 0), 16, 1)).save(tmp_path / f"p{i}.png")
        rows.append(f"S-{i},product {i},p{i}.png")
    (tmp_path / "products.csv").write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "catalogue.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "name": "catalogue", "model": "flux2-klein-tiny", "seed": 5,
        "datasets": {"products": {"csv": "products.csv", "key": "{sku}"}},
        "matrix": {"product": "products"},
        "task": {"positivePrompt": "{product.name} on marble", "width": 128, "height": 128, "steps": 2,
                 "inputs": {"referenceImages": ["{product.image}"]}},
        "output": {"filename": "{product.sku}.{ext}"},
    }))
    out = tmp_path / "out"
    loops_before = sum(p.counters["denoise"] for p in run_engine._LOADED.values())
    assert run_command(str(recipe), str(out), [], None, False) == 0
    rendered = records(out)
    assert len(rendered) == 8 and {r["batch"]["size"] for r in rendered} == {4}
    assert {r["batch"]["reference_layout"] for r in rendered} == {"rows"}
    assert sum(p.counters["denoise"] for p in run_engine._LOADED.values()) - loops_before == 2
    assert len({r["output"]["sha256"] for r in rendered}) == 8
    capsys.readouterr()
    assert regen_command(str(out), [r["item_id"] for r in rendered], True, None) == 0
    assert capsys.readouterr().out.count("identical") == 8


def test_quickstart_regen_by_item_id_is_identical(quickstart, tmp_path):
    item = records(quickstart)[5]["item_id"]
    result = CliRunner().invoke(cli, ["regen", str(quickstart), item, "--verify", "--to", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert result.output.count("identical") == 4


@pytest.mark.slow
def test_unreadable_reference_fails_its_items_only_and_fail_fast_stops(recipes, tmp_path):
    broken = tmp_path / "recipes"
    shutil.copytree(recipes, broken)
    (broken / "refs" / "D-400.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    out = tmp_path / "out"
    assert run_command(str(broken / "product-photos.yaml"), str(out), PRODUCTS, None, False) == 1
    status = {}
    for row in records(out):
        status.setdefault(row["item_key"].split("|")[0], set()).add((row["status"], row["error"] and "D-400.jpg" in row["error"]))
    assert status == {"product=C-300": {("ok", None)}, "product=D-400": {("failed", True)}}

    fast = tmp_path / "fast"
    assert run_command(str(broken / "product-photos.yaml"), str(fast), PRODUCTS, None, True) == 1
    assert files(fast) == {}  # stopped before rendering anything
    assert {r["status"] for r in records(fast)} == {"failed"}


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_completes_without_duplicates(quickstart, recipes, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "FLOWGEN_MAX_BATCH": "4", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "flowgen.cli", "run", str(recipes / "quickstart.yaml"), "--out", str(out)]
    args += [a for s in QUICK for a in ("--set", s)]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows_at_kill = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest_path(out).exists():
            try:
                conn = sqlite3.connect(manifest_path(out), timeout=1)
                rows_at_kill = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                conn.close()
            except sqlite3.OperationalError:
                rows_at_kill = 0
            if rows_at_kill:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = proc.stderr.read().decode()[-2000:]
    assert 0 < rows_at_kill < 16, f"rows at kill: {rows_at_kill}, exit {proc.returncode}\n{log}"

    assert run_command(str(recipes / "quickstart.yaml"), str(out), QUICK, None, False) == 0
    assert_valid_manifest(out, 16)
    assert last_run(out)["rendered"] + last_run(out)["unchanged"] == 16 and last_run(out)["unchanged"] >= rows_at_kill
    resumed, original = files(out), files(quickstart)
    assert resumed == original, sorted(set(resumed.items()) ^ set(original.items()))  # same bytes


def test_cli_plan_json_loads_no_jax_and_status_reports(quickstart, recipes):
    code = (
        "import sys, json; from click.testing import CliRunner; from flowgen.cli import main\n"
        f"r = CliRunner().invoke(main, ['plan', {str(recipes / 'quickstart.yaml')!r}, '--out', {str(quickstart)!r}, '--json'] + "
        f"[a for s in {QUICK!r} for a in ('--set', s)])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(json.dumps({'plan': json.loads(r.output), 'jax': 'jax' in sys.modules}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLOWGEN_MAX_BATCH": "4"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["jax"] is False
    assert report["plan"]["counts"]["unchanged"] == 16 and report["plan"]["counts"]["to_run"] == 0

    runner = CliRunner()
    status = runner.invoke(cli, ["status", str(quickstart), "--json"])
    assert status.exit_code == 0 and json.loads(status.output)["counts"] == {"ok": 16}
    assert runner.invoke(cli, ["run", str(recipes / "quickstart.yaml"), "--set", "task.steps=0"]).exit_code == 2
    assert runner.invoke(cli, ["status", str(recipes)]).exit_code == 2
