"""The compute dtype: `--dtype` / FLOWGEN_DTYPE, recorded per result, part of its identity (float32
hashes as before), replayed by regen; and per-step progress from inside a batch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main
from flowgen.plan import compile_plan
from flowgen.recipe.api import Item
from flowgen.run import engine as run_engine
from flowgen.run import regen as run_regen
from flowgen.run.engine import FakeEngine, PipelineEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import Manifest
from flowgen.run.progress import PlainProgress, RichProgress

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")  # 4 results of 4 steps, one batch
SMALL = ["--set", "task.width=128", "--set", "task.height=128"]
NO_ENV = {"FLOWGEN_DTYPE": None, "FLOWGEN_MAX_BATCH": None}


class CliFake(FakeEngine):
    """The FakeEngine where `flowgen run` builds its PipelineEngine(model, dtype)."""

    made: list[str] = []
    load_seconds = 0.0

    def __init__(self, model, dtype):
        super().__init__(dtype=dtype)
        CliFake.made.append(dtype)


@pytest.fixture
def fake_engines(monkeypatch):
    CliFake.made = []
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", CliFake)
    monkeypatch.setattr(run_regen, "_pipeline_engine", CliFake)
    return CliFake.made


def invoke(*args, env=None):
    return CliRunner().invoke(main, list(args), env={**NO_ENV, **(env or {})})


def records(out: Path) -> list[dict]:
    with Manifest(out, create=False) as manifest:
        return list(manifest.records())


def last_run(out: Path) -> dict:
    with Manifest(out, create=False) as manifest:
        return manifest.runs()[-1]["summary"]


def plan_json(out: Path, *args, env=None) -> dict:
    result = invoke("plan", QUICKSTART, "--out", str(out), "--json", *SMALL, *args, env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def item(key, **task):
    base = {"positivePrompt": f"prompt {key}", "width": 64, "height": 64, "steps": 4, "numberResults": 1,
            "outputFormat": "PNG"}
    return Item(key=key, values={}, task={**base, **task}, references=())


def plan_of(items, out, **kw):
    return compile_plan(recipe_name="r", recipe_seed=3, items=items, out_dir=out,
                        filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", model="tiny",
                        model_identity={"m": 1}, distilled=False, recipe_hash="h", max_batch=4, **kw)


# ---- the setting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_option_or_env_value_is_one_line_and_exit_2(tmp_path, command):
    out = tmp_path / "out"
    for args, env, expected in [
        (["--dtype", "bf16"], {}, "error: --dtype 'bf16' is not allowed: use auto, float32 or bfloat16"),
        ([], {"FLOWGEN_DTYPE": "fp16"}, "error: FLOWGEN_DTYPE='fp16' is not allowed: use auto, float32 or bfloat16"),
    ]:
        result = invoke(command, QUICKSTART, "--out", str(out), *args, env=env)
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [expected]
        assert not out.exists()  # nothing written


def test_regen_refuses_a_bad_dtype_before_reading_anything(tmp_path):
    result = invoke("regen", str(tmp_path / "nowhere"), "abc", "--dtype", "half")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --dtype 'half' is not allowed: use auto, float32 or bfloat16"]


def test_option_wins_over_env_and_dtype_is_part_of_the_plan_hash(tmp_path):
    f32 = plan_json(tmp_path, "--dtype", "float32")
    bf16 = plan_json(tmp_path, env={"FLOWGEN_DTYPE": "bfloat16"})
    assert (f32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert plan_json(tmp_path, "--dtype", "float32", env={"FLOWGEN_DTYPE": "bfloat16"})["plan_hash"] == f32["plan_hash"]
    assert plan_json(tmp_path, "--dtype", "bfloat16", env={"FLOWGEN_DTYPE": "nonsense"})["plan_hash"] == bf16["plan_hash"]
    assert f32["plan_hash"] != bf16["plan_hash"] and f32["items"] == bf16["items"]


def test_auto_is_float32_on_cpu_and_plan_still_imports_no_jax(tmp_path):
    code = ("import sys, json; from click.testing import CliRunner; from flowgen.cli import main\n"
            f"r = CliRunner().invoke(main, ['plan', {QUICKSTART!r}, '--out', {str(tmp_path)!r}, '--json', '--dtype', 'auto'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(json.dumps({'dtype': json.loads(r.output)['dtype'], 'jax': 'jax' in sys.modules}))")
    env = {k: v for k, v in os.environ.items() if k != "FLOWGEN_DTYPE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**env, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"dtype": "float32", "jax": False}


# ---- identity ----------------------------------------------------------------------------------------


def test_float32_hashes_are_those_from_before_the_setting_and_bfloat16_differs(tmp_path):
    items = [item("k0"), item("k1")]
    default, f32, bf16 = plan_of(items, tmp_path), plan_of(items, tmp_path, dtype="float32"), plan_of(items, tmp_path, dtype="bfloat16")
    # recorded with the code before dtype existed: float32 results must not re-render
    assert f32.results[0].content_hash == "bc2e465f7e9a95298cafbcea6f78d2791484710eeca6489f733ce112b44c29c1"
    assert f32.plan_hash == default.plan_hash == "a78f5c090a745c3b86454ae49060e879e8ea026727469bce257d27b0777d6212"
    assert [r.content_hash for r in default.results] == [r.content_hash for r in f32.results]
    assert not {r.content_hash for r in bf16.results} & {r.content_hash for r in f32.results}
    assert [r.seed for r in bf16.results] == [r.seed for r in f32.results]  # only the identity moves


def test_every_record_carries_the_plan_dtype(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    items = [item("ok"), Item(key="broken", values={}, task=item("x").task, references=(bad,))]
    summary = execute(against_folder(plan_of(items, tmp_path / "out", dtype="bfloat16")), FakeEngine(dtype="bfloat16"))
    assert (summary.rendered, summary.failed) == (1, 1)
    rows = {r["item_key"]: r for r in records(tmp_path / "out")}
    assert {k: r["dtype"] for k, r in rows.items()} == {"ok": "bfloat16", "broken": "bfloat16"}
    assert rows["ok"]["engine"]["dtype"] == "bfloat16"


def test_an_engine_in_another_dtype_than_the_plan_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        execute(against_folder(plan_of([item("a")], tmp_path)), FakeEngine(dtype="bfloat16"))
    assert not (tmp_path / "a_0.png").exists()


def test_bfloat16_after_float32_is_changed_dtype_rerenders_and_regen_follows_the_record(tmp_path, fake_engines):
    out = tmp_path / "out"
    assert invoke("run", QUICKSTART, "--out", str(out), *SMALL, "--dtype", "float32").exit_code == 0
    f32_rows = records(out)
    assert [r["dtype"] for r in f32_rows] == ["float32"] * 4 and fake_engines == ["float32"]
    assert plan_json(out, "--dtype", "float32")["counts"]["unchanged"] == 4

    plan = plan_json(out, "--dtype", "bfloat16")
    assert plan["counts"]["changed"] == plan["counts"]["to_run"] == 4
    assert [c["fields"] for c in plan["diff"]["changed"]] == [["dtype"]] * 4
    text = invoke("plan", QUICKSTART, "--out", str(out), *SMALL, "--dtype", "bfloat16").output
    assert text.splitlines()[0].endswith("(model flux2-klein-tiny, bfloat16)")
    assert sum(line.strip().startswith("changed ") and line.endswith(": dtype") for line in text.splitlines()) == 4

    result = invoke("run", QUICKSTART, "--out", str(out), *SMALL, env={"FLOWGEN_DTYPE": "bfloat16"})
    assert result.exit_code == 0, result.output
    assert (last_run(out)["rendered"], last_run(out)["unchanged"]) == (4, 0) and fake_engines[-1] == "bfloat16"
    bf16_rows = records(out)
    assert [r["dtype"] for r in bf16_rows] == ["bfloat16"] * 4
    assert {r["output"]["sha256"] for r in bf16_rows}.isdisjoint(r["output"]["sha256"] for r in f32_rows)
    assert invoke("run", QUICKSTART, "--out", str(out), *SMALL, "--dtype", "bfloat16").exit_code == 0
    assert last_run(out)["rendered"] == 0

    # regen renders in the recorded dtype (FLOWGEN_DTYPE does not move it) ...
    target = f"{bf16_rows[0]['item_id']}#0"
    del fake_engines[:]
    result = invoke("regen", str(out), target, "--verify", "--to", str(tmp_path / "again"), env={"FLOWGEN_DTYPE": "float32"})
    assert result.exit_code == 0, result.output
    assert fake_engines == ["bfloat16"] and result.output.startswith("identical") and "recorded at" not in result.output
    # ... unless --dtype says otherwise; then --verify says it compared across dtypes
    result = invoke("regen", str(out), target, "--verify", "--dtype", "float32", "--to", str(tmp_path / "other"))
    assert result.exit_code == 1 and fake_engines[-1] == "float32"
    assert result.output.startswith("DIFFERS") and "at float32, recorded at bfloat16" in result.output


def test_pipeline_engines_of_two_dtypes_load_and_cache_separately(monkeypatch):
    from flowgen.engine.pipeline import Pipeline

    class Loaded:
        def __init__(self, runtime):
            self.runtime = runtime

    loads = []

    def fake_load(source, runtime=None, max_sequence_length=512, *, dtype=None):
        loads.append((source, runtime.dtype, dtype))
        return Loaded(runtime)

    monkeypatch.setattr(Pipeline, "from_pretrained", staticmethod(fake_load))
    monkeypatch.setattr(run_engine, "_LOADED", {})
    f32, bf16 = PipelineEngine("some-model", "float32").pipe, PipelineEngine("some-model", "bfloat16").pipe
    assert PipelineEngine("some-model", "bfloat16").pipe is bf16 and f32 is not bf16
    assert loads == [("some-model", "float32", None), ("some-model", "bfloat16", None)]
    assert set(run_engine._LOADED) == {("some-model", "float32", ""), ("some-model", "bfloat16", "")}  # "": the automatic mesh


# ---- progress per step ---------------------------------------------------------------------------------


class Recording:
    def __init__(self, fail_steps: bool = False):
        self.events: list[tuple] = []
        self.fail_steps = fail_steps

    def start(self, total, batches):
        self.events.append(("start", total, batches))

    def step(self, steps_done, steps):
        self.events.append(("step", steps_done, steps))
        if self.fail_steps:
            raise RuntimeError("display gone")

    def advance(self, done, failed):
        self.events.append(("advance", done, failed))

    def note(self, message): ...

    def finish(self): ...


def test_each_sampling_step_reaches_the_progress_before_its_batch_completes(tmp_path):
    progress = Recording()
    summary = execute(against_folder(plan_of([item(f"k{i}") for i in range(6)], tmp_path)), FakeEngine(), progress=progress)
    assert summary.rendered == 6
    batch = [("step", k, 4) for k in (1, 2, 3, 4)]
    assert progress.events == [("start", 6, 2), *batch, ("advance", 4, 0), *batch, ("advance", 2, 0)]


def test_a_failing_step_report_neither_fails_the_batch_nor_the_run(tmp_path):
    progress = Recording(fail_steps=True)
    summary = execute(against_folder(plan_of([item(f"k{i}") for i in range(6)], tmp_path)), FakeEngine(), progress=progress)
    assert (summary.rendered, summary.failed, summary.exit_code) == (6, 0, 0)
    assert [e for e in progress.events if e[0] == "step"] == [("step", 1, 4)]  # reports stop after the failure


def test_plain_progress_prints_a_step_line_only_after_a_quiet_interval():
    stream = io.StringIO()
    quiet = PlainProgress(stream)
    quiet.start(4, 1)
    for k in range(1, 5):
        quiet.step(k, 4)
    assert stream.getvalue() == "rendering 4 result(s) in 1 batch(es)\n"

    stream = io.StringIO()
    chatty = PlainProgress(stream, step_interval=0.0)
    for k in range(1, 5):
        chatty.step(k, 4)
    assert stream.getvalue().splitlines() == ["  step 1/4", "  step 2/4", "  step 3/4"]  # the batch line follows


def test_rich_progress_shows_the_step_of_the_running_batch():
    progress = RichProgress()
    progress.start(8, 2)
    try:
        progress.step(3, 4)
        assert progress.bar.tasks[0].fields["step"] == "step 3/4"
        progress.advance(4, 0)
        assert progress.bar.tasks[0].fields["step"] == "" and progress.bar.tasks[0].completed == 4
    finally:
        progress.finish()
