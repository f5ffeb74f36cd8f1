"""Golden-seed canary: fixed items re-rendered before a run and compared with their first renders; with
shards, checked once before any shard renders; with --ray, by the driver before any batch leaves it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flowgen.cli import main as cli
from flowgen.run.canary import identity_changes, psnr_db
from flowgen.run.engine import FakeEngine
from flowgen.run.lock import read_holder
from flowgen.run.manifest import Manifest, load_watermarks
from flowgen.run.merge import fold_shards
from flowgen.run.shard_canary import _CanaryLock
from flowgen.run.shards import Shard, shards_dir
from tests.workflow.incremental_recipe import run, write_recipe, write_rows


class DriftingEngine(FakeEngine):
    """FakeEngine in PipelineEngine's place whose images can drift: every pixel + `shift`, and a
    `version` in its identity; notes each prompt it renders."""

    load_seconds = 0.0
    shift = 0
    version = 1
    prompts: list[str] = []

    def __init__(self, model=None, dtype="float32"):
        super().__init__(dtype=dtype)

    def generate_batch(self, request):
        output = super().generate_batch(request)
        DriftingEngine.prompts.extend(request.prompts)
        if self.shift:
            output.images = [np.clip(image.astype(np.int16) + self.shift, 0, 255).astype(np.uint8) for image in output.images]
        return output

    def identity(self):
        return {**super().identity(), "version": self.version}


@pytest.fixture
def engine(monkeypatch):
    DriftingEngine.shift, DriftingEngine.version, DriftingEngine.prompts = 0, 1, []
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", DriftingEngine)
    return DriftingEngine


CANARY = "canary: {items: 2, threshold_db: 40}"


def setup_first_run(tmp_path, engine):
    recipe = write_recipe(tmp_path, extra=CANARY)
    write_rows(tmp_path, [("A-1", "a"), ("B-2", "b"), ("C-3", "c")])
    assert run(recipe) == 0  # the first renders: the canary's baseline, nothing to compare yet
    out = tmp_path / "out" / "nightly"
    with Manifest(out) as manifest:
        assert manifest.canary_verdicts() == []
        fixed = manifest.canary_items()
        keys = {r["item_id"]: r["item_key"] for r in manifest.records()}
    assert [keys[i] for i in fixed] == ["product=A-1", "product=B-2"]  # the first 2 items in plan order
    return recipe, out, fixed


def files(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.png")}


def test_an_unchanged_engine_passes_and_the_fixed_items_stay_fixed(tmp_path, engine, capsys):
    recipe, out, fixed = setup_first_run(tmp_path, engine)
    write_rows(tmp_path, [("0-0", "zero"), ("A-1", "a"), ("B-2", "b"), ("C-3", "c")])  # sorts first: not a canary item
    engine.prompts.clear()
    assert run(recipe) == 0
    # 2 canary replays, each at the batch size of its first render (3 results: a batch of 4), then the new row
    assert engine.prompts == ["photo of a"] * 4 + ["photo of b"] * 4 + ["photo of zero"]
    with Manifest(out) as manifest:
        verdicts = manifest.canary_verdicts()
        assert manifest.canary_items() == fixed
    assert [v["item_id"] for v in verdicts] == fixed
    assert all(v["passed"] == 1 and v["psnr_db"] is None and v["threshold_db"] == 40 for v in verdicts)  # identical
    assert json.loads(verdicts[0]["engine"]) == json.loads(verdicts[0]["first_engine"]) == DriftingEngine().identity()
    assert "canary: 2 fixed item(s) render as their first renders did (>= 40 dB PSNR)" in capsys.readouterr().out


def test_a_changed_dtype_fails_the_run_before_anything_renders_naming_what_changed(tmp_path, engine, capsys):
    recipe, out, fixed = setup_first_run(tmp_path, engine)
    before = files(out)
    watermark = load_watermarks(out)
    write_rows(tmp_path, [("A-1", "a"), ("B-2", "b"), ("C-3", "c"), ("D-4", "d")])
    engine.prompts.clear()
    capsys.readouterr()
    assert run(recipe, dtype="bfloat16") == 1
    # only the canary rendered; the new row D-4 did not
    assert engine.prompts == ["photo of a"] * 4 + ["photo of b"] * 4
    assert files(out) == before
    err = capsys.readouterr().err.splitlines()
    failures = [line for line in err if line.startswith("error: canary: item")]
    assert len(failures) == 2
    assert failures[0].startswith(f"error: canary: item 'product=A-1' ({fixed[0]}#0) renders at ")
    assert "dB PSNR against its first render, below 40 dB; engine changed: dtype float32 → bfloat16" in failures[0]
    assert "nothing was rendered" in err[-1]
    with Manifest(out) as manifest:
        verdicts = manifest.canary_verdicts()
        last = manifest.runs()[-1]
        assert manifest.watermarks() == {k: {**v} for k, v in manifest.watermarks().items()}
    assert [(v["passed"], v["item_id"]) for v in verdicts] == [(0, fixed[0]), (0, fixed[1])]
    assert all(v["psnr_db"] < 20 for v in verdicts)  # unrelated noise: far below the threshold
    assert last["status"] == "failed" and last["summary"]["canary_failures"] and last["summary"]["rendered"] == 0
    assert load_watermarks(out) == watermark  # a failed run does not move the watermark: D-4 is still new
    assert watermark["products"]["entries"] == ["A-1", "B-2", "C-3"]


def test_a_deliberate_engine_change_is_accepted_by_rendering_the_canary_items_again(tmp_path, engine):
    recipe, out, fixed = setup_first_run(tmp_path, engine)
    assert run(recipe, dtype="bfloat16") == 1  # the canary stops the switch to bfloat16
    with Manifest(out) as manifest:
        for item_id in fixed:
            (out / manifest.get(item_id, 0)["output"]["path"]).unlink()  # accepted: drop their first renders
    assert run(recipe, "datasets.products.incremental=false", dtype="bfloat16") == 0  # old rows planned too
    with Manifest(out) as manifest:
        assert {r["dtype"] for r in manifest.records()} == {"bfloat16"}  # everything rendered again in bf16
        assert len(manifest.canary_verdicts()) == 2  # only the failed run's: this one had no baseline to compare
    assert run(recipe, dtype="bfloat16") == 0
    with Manifest(out) as manifest:
        assert [v["passed"] for v in manifest.canary_verdicts()[-2:]] == [1, 1]  # the new renders are the baseline


def test_the_canary_replays_the_face_pass_as_the_run_applied_it(tmp_path, engine):
    recipe = write_recipe(tmp_path, extra="canary: {items: 1}", task="ultralytics: {confidence: 0.5}")
    write_rows(tmp_path, [("A-1", "a")])
    assert run(recipe) == 0 and run(recipe) == 0
    with Manifest(tmp_path / "out" / "nightly") as manifest:
        assert [(v["passed"], v["psnr_db"]) for v in manifest.canary_verdicts()] == [(1, None)]  # identical


def expected_psnr(out, record_path, shift):
    """The PSNR a shift of every pixel gives against the first render, from the file itself."""
    first = np.asarray(Image.open(out / record_path).convert("RGB")).astype(np.float64)
    mse = np.mean((first - np.clip(first + shift, 0, 255)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


def test_a_drift_below_the_threshold_fails_and_one_above_it_passes(tmp_path, engine, capsys):
    recipe, out, fixed = setup_first_run(tmp_path, engine)
    with Manifest(out) as manifest:
        paths = [manifest.get(item_id, 0)["output"]["path"] for item_id in fixed]
    engine.shift, engine.version = 1, 2  # every pixel one level brighter: about 48 dB, above 40
    assert run(recipe) == 0
    with Manifest(out) as manifest:
        verdicts = manifest.canary_verdicts()
    assert [v["passed"] for v in verdicts] == [1, 1]
    assert [v["psnr_db"] for v in verdicts] == [pytest.approx(expected_psnr(out, p, 1), abs=1e-3) for p in paths]
    assert all(47 < v["psnr_db"] < 49 for v in verdicts)
    assert all(v["changed"] == "engine changed: version 1 → 2" for v in verdicts)

    engine.shift = 12  # about 26 dB: the engine drifted
    capsys.readouterr()
    assert run(recipe) == 1
    failures = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: canary: item")]
    assert len(failures) == 2 and "version 1 → 2" in failures[0]
    assert f"renders at {expected_psnr(out, paths[0], 12):.1f} dB PSNR" in failures[0]


def test_psnr_and_identity_changes():
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr_db(a, a) == float("inf")
    assert psnr_db(a, a + 1) == pytest.approx(48.13, abs=0.01)
    assert psnr_db(a, np.zeros((4, 8, 3), np.uint8)) == 0.0
    first = {"flowgen": "0.1.0", "jax": "0.7.0", "device_kind": "cpu", "dtype": "float32", "weights": {"a": "1"}}
    now = {**first, "jax": "0.7.2", "device_kind": "NVIDIA H200", "weights": {"a": "2"}, "attention": "cudnn"}
    assert identity_changes(first, now) == ["jax 0.7.0 → 0.7.2", "device_kind cpu → NVIDIA H200", "weights changed",
                                            "attention (none) → cudnn"]
    assert identity_changes(first, first) == []


# --- shards: the canary is checked once, before any shard renders (flowgen.run.shard_canary) ----------------------

SHARD_ROWS = [("A-1", "a"), ("B-2", "b"), ("C-3", "c")] + [(f"N-{i}", f"new {i}") for i in range(6)]


class GatedEngine(DriftingEngine):
    """DriftingEngine whose first engine call (the canary's first replay) waits for `gate`: the test
    holds the checking shard there while another one starts."""

    gate = threading.Event()
    entered = threading.Event()

    def generate_batch(self, request):
        if not GatedEngine.entered.is_set():
            GatedEngine.entered.set()
            assert GatedEngine.gate.wait(30), "the test never opened the gate"
        return super().generate_batch(request)


def _shard_in_thread(recipe, spec, results, **options):
    def target():
        try:
            results[spec] = run(recipe, shard=spec, max_batch=2, **options)
        except BaseException as err:  # noqa: BLE001 - the test reports it
            results[spec] = err

    thread = threading.Thread(target=target, name=f"shard {spec}")
    thread.start()
    return thread


def _waits_for_the_canary(out, shard):
    """Until `shard` holds its lock and says it is at the canary (bounded)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        holder = read_holder(shard.lock_path(out))
        if holder is not None and holder.progress == {"stage": "canary"}:
            return
        time.sleep(0.05)
    raise AssertionError(f"shard {shard} never reached the canary")


def _two_shards_with_the_first_held_in_its_check(tmp_path, engine, monkeypatch):
    """Shard 0/2 starts and is held inside its canary check; shard 1/2 starts and waits; both end."""
    recipe, out, fixed = setup_first_run(tmp_path, engine)
    write_rows(tmp_path, SHARD_ROWS)
    engine.prompts.clear()
    GatedEngine.gate, GatedEngine.entered = threading.Event(), threading.Event()
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", GatedEngine)
    results: dict = {}
    first = _shard_in_thread(recipe, "0/2", results)
    assert GatedEngine.entered.wait(30), "shard 0 never checked the canary"
    second = _shard_in_thread(recipe, "1/2", results)
    _waits_for_the_canary(out, Shard(1, 2))
    time.sleep(0.5)  # shard 1 had time to render, had it not waited
    held = list(engine.prompts)
    GatedEngine.gate.set()
    first.join(60)
    second.join(60)
    return recipe, out, fixed, held, results


def test_shards_check_the_canary_once_and_the_other_shard_renders_only_after_its_verdict(
    tmp_path, engine, monkeypatch, capsys
):
    recipe, out, fixed, held, results = _two_shards_with_the_first_held_in_its_check(tmp_path, engine, monkeypatch)
    assert held == []  # while shard 0 checked, nothing rendered: not shard 1 either
    assert results == {"0/2": 0, "1/2": 0}
    # the canary's 2 replays (each a batch of 4, as first rendered) once, then the 6 new rows once each
    canary = ["photo of a"] * 4 + ["photo of b"] * 4
    assert engine.prompts[:8] == canary and engine.prompts.count("photo of a") == 4
    assert sorted(engine.prompts[8:]) == sorted(f"photo of new {i}" for i in range(6))
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "waiting for the canary: shard 0/2 (run " in output
    assert "canary: passed as shard 0/2 (run " in output and "not checked again" in output
    fold_shards(out)
    with Manifest(out) as manifest:
        verdicts = manifest.canary_verdicts()
        assert manifest.counts() == {"ok": 9}
    assert [v["item_id"] for v in verdicts] == fixed and len({v["run_id"] for v in verdicts}) == 1

    engine.prompts.clear()  # a shard run later, alone: a new round, so it checks the canary itself
    assert run(recipe, shard="1/2", max_batch=2) == 0
    assert engine.prompts == canary


def test_a_drifted_canary_stops_every_shard_before_anything_renders(tmp_path, engine, monkeypatch, capsys):
    recipe, out, fixed = setup_first_run(tmp_path, engine)
    before = files(out)
    engine.shift = 12  # about 26 dB below the first renders
    write_rows(tmp_path, SHARD_ROWS)
    engine.prompts.clear()
    GatedEngine.gate, GatedEngine.entered = threading.Event(), threading.Event()
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", GatedEngine)
    results: dict = {}
    first = _shard_in_thread(recipe, "0/2", results)
    assert GatedEngine.entered.wait(30)
    second = _shard_in_thread(recipe, "1/2", results)
    _waits_for_the_canary(out, Shard(1, 2))
    GatedEngine.gate.set()
    first.join(60)
    second.join(60)
    assert results == {"0/2": 1, "1/2": 1}
    assert engine.prompts == ["photo of a"] * 4 + ["photo of b"] * 4  # the one check; no row rendered
    assert files(out) == before
    err = capsys.readouterr().err.splitlines()
    failures = [line for line in err if line.startswith("error: canary: item")]
    assert len(failures) == 4 and failures[:2] == failures[2:]  # both shards: the same two lines
    assert failures[0].startswith(f"error: canary: item 'product=A-1' ({fixed[0]}#0) renders at ")
    assert err.count("error: the canary failed, so nothing was rendered; see docs/recipes.md (Golden-seed canary)") == 2
    fold_shards(out)
    with Manifest(out) as manifest:
        assert manifest.counts() == {"ok": 3}
        assert [r["status"] for r in manifest.runs()[-2:]] == ["failed", "failed"]


def test_a_shard_waits_for_the_canary_at_most_canary_wait_then_stops_in_one_line(tmp_path, engine):
    recipe, out, _ = setup_first_run(tmp_path, engine)
    write_rows(tmp_path, SHARD_ROWS)
    engine.prompts.clear()
    with _CanaryLock(shards_dir(out), "checker-run", "0/2", 0, print):  # another shard checks, and hangs
        result = CliRunner().invoke(
            cli, ["run", str(recipe), "--shard", "1/2", "--max-batch", "2", "--canary-wait", "0.5"]
        )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: shard 1/2: shard 0/2 (run checker-run, pid {os.getpid()} on {socket.gethostname()}) is still "
        "checking the canary after 0.5 s, so this shard rendered nothing; raise --canary-wait, or stop that run "
        "and run this shard again (it then checks the canary itself)"
    ]
    assert engine.prompts == []
    fold_shards(out)
    with Manifest(out) as manifest:
        last = manifest.runs()[-1]
    assert last["status"] == "failed" and "still checking the canary" in last["summary"]["error"]


def test_with_ray_the_driver_checks_the_canary_before_any_batch_goes_to_the_actors(tmp_path, engine, monkeypatch):
    """--ray is a plain run whose batches render elsewhere: the driver's engine checks the canary
    first; a drifted one sends no batch to the actor pool (Ray itself stands in here)."""
    from flowgen.run.batch_rendering import render_locally

    recipe, out, _ = setup_first_run(tmp_path, engine)
    write_rows(tmp_path, [("A-1", "a"), ("B-2", "b"), ("C-3", "c"), ("D-4", "d")])
    handed: list[tuple[int, list[str]]] = []  # (batches given to the pool, what the driver had rendered by then)

    class FakePool:
        load_seconds = 0.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def __call__(self, runner, batches):
            handed.append((len(batches), list(engine.prompts)))
            return render_locally(runner, batches)

    monkeypatch.setattr("flowgen.run.ray_runner.RayRendering.connect", lambda plan, address, progress: FakePool())
    engine.shift = 12
    engine.prompts.clear()
    assert run(recipe, ray_address="local") == 1
    assert handed == [(0, ["photo of a"] * 4 + ["photo of b"] * 4)]  # checked first; nothing handed on
    engine.shift = 0
    engine.prompts.clear()
    handed.clear()
    assert run(recipe, ray_address="local") == 0
    assert handed == [(1, ["photo of a"] * 4 + ["photo of b"] * 4)]
