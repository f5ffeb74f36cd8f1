"""Golden-seed canary: fixed items re-rendered before a run and compared with their first renders."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from flowgen.run.canary import identity_changes, psnr_db
from flowgen.run.engine import FakeEngine
from flowgen.run.manifest import Manifest, load_watermarks
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
