"""Inspecting runs as a new user would: `status` shows what is still to do and explains its words;
`validate` reports every problem at once; `plan` names each changed field once; a run refused
before it starts leaves nothing behind; results set aside are announced before rendering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flowgen.cli import main
from flowgen.commands.status import LEGEND
from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.interrupt import StopRequest
from flowgen.run.manifest import Manifest
from flowgen.run.progress import NullProgress


class CliFakeEngine(FakeEngine):
    """FakeEngine in PipelineEngine's place (same constructor), so `flowgen run` renders in milliseconds."""

    load_seconds = 0.0

    def __init__(self, model=None, dtype="float32"):
        super().__init__(dtype=dtype)


@pytest.fixture
def fake_engine(monkeypatch):
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", CliFakeEngine)


def write_recipe(folder: Path, things=("cup", "lamp"), results: int = 1, model: str = "flux2-klein-tiny",
                 width: int = 128, refs: str = "") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"""version: 1
name: inspect
model: {model}
seed: 1
datasets:
  things: {{values: [{', '.join(things)}]}}
matrix: {{thing: things}}
task:
  positivePrompt: "a photo of a {{thing}}"
  width: {width}
  height: 128
  steps: 1
  numberResults: {results}
  outputFormat: PNG
  {refs}
output: {{dir: out, filename: "{{thing}}_{{result}}.{{ext}}"}}
""")
    return path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- status --------------------------------------------------------------------------------------


def test_status_after_a_limited_run_counts_what_is_not_rendered_yet(tmp_path, fake_engine):
    recipe = write_recipe(tmp_path, things=[f"t{i}" for i in range(8)], results=4)
    out = tmp_path / "out"
    ran = cli("run", str(recipe), "--limit", "8")
    assert ran.exit_code == 0 and "8 rendered" in ran.output, ran.output

    status = cli("status", str(out))
    assert status.exit_code == 0, status.output
    first = status.output.splitlines()[0]
    assert first.startswith(f"{out}: 32 planned: 8 ok, 0 failed, 24 not rendered yet (flowgen run "), first
    assert "recipe.yaml renders them)" in first
    assert "not rendered yet (result): " + LEGEND["result"]["not rendered yet"] in status.output
    report = json.loads(cli("status", str(out), "--json").output)
    assert (report["planned"], report["not_rendered"], report["counts"]) == (32, 24, {"ok": 8})
    assert report["recipe"]["path"] == str(recipe.resolve())

    assert cli("run", str(recipe)).exit_code == 0
    after = cli("status", str(out)).output.splitlines()[0]
    assert after == f"{out}: 32 planned: 32 ok, 0 failed, 0 not rendered yet", after


def test_status_after_ctrl_c_shows_the_interrupted_run_and_what_is_left(tmp_path):
    recipe = write_recipe(tmp_path, things=["a", "b", "c", "d"], results=2)
    stop = StopRequest()

    class StopAfterFirstBatch(NullProgress):
        def advance(self, done, failed):
            stop.request()  # as the first Ctrl-C does: the run stops after this batch

    summary = execute(against_folder(plan_recipe(recipe, None, max_batch=2)), FakeEngine(), stop=stop, progress=StopAfterFirstBatch())
    assert summary.interrupted and summary.rendered == 2
    status = cli("status", str(tmp_path / "out"))
    lines = status.output.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'out'}: 8 planned: 2 ok, 0 failed, 6 not rendered yet"), lines[0]
    assert lines[1].endswith(": interrupted")
    assert "  interrupted (run): " + LEGEND["run"]["interrupted"] in lines


def test_status_explains_every_word_it_prints(tmp_path):
    recipe = write_recipe(tmp_path, things=["a", "b"])
    out = tmp_path / "out"
    plan = plan_recipe(recipe, None)
    execute(against_folder(plan), FakeEngine())
    with Manifest(out) as manifest:  # a failed result, a withheld delivery, and a run that died mid-way
        record = manifest.get(*plan.results[0].rid)
        record.update(status="failed", error="engine error: boom")
        manifest.upsert([record], [(record["item_id"], record["result_index"], "webhook", "withheld", None)])
        manifest.start_run("run-killed", "inspect", "h", "p")
    lines = cli("status", str(out)).output.splitlines()
    legend = lines[lines.index("what the words mean:") + 1:]
    explained = {line.split(":", 1)[0].strip() for line in legend}
    assert {"ok (result)", "failed (result)", "not rendered yet (result)", "died (run)", "withheld (delivery)"} <= explained
    body = "\n".join(lines[:lines.index("what the words mean:")])
    assert "1 ok, 1 failed, 0 not rendered yet" in body and ": died" in body and "deliveries: 1 withheld" in body
    for kind, words in LEGEND.items():  # and no word is explained that the text did not use
        for word in words:
            if f"{word} ({kind})" in explained:
                assert word in body, word


def test_status_of_a_manifest_without_a_recorded_plan_says_so(tmp_path):
    recipe = write_recipe(tmp_path, things=["a", "b"])
    execute(against_folder(plan_recipe(recipe, None)), FakeEngine())
    with Manifest(tmp_path / "out") as manifest:  # as an older flowgen left it: no planned set
        manifest.conn.execute("DELETE FROM meta WHERE key='planned_recorded'")
    first = cli("status", str(tmp_path / "out")).output.splitlines()[0]
    assert first == f"{tmp_path / 'out'}: 2 result(s): 2 ok, 0 failed (what the recipe plans is recorded from the next run on)"


# --- validate ------------------------------------------------------------------------------------


def test_validate_reports_load_template_and_reference_problems_at_once(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"sku": "A", "colour": "red", "image": "missing-a.png"}\n'
                                         '{"sku": "B", "image": "b.png"}\n'
                                         '{"sku": "C", "image": "b.png"}\n'
                                         '{"sku": "D", "image": "b.png"}\n')
    Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(tmp_path / "b.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""version: 1
name: v
model: flux2-klein-tiny
datasets:
  products: {jsonl: rows.jsonl, key: "{sku}"}
matrix: {product: products}
task:
  positivePrompt: "a {product.colour} shoe"
  width: 100000
  height: 128
  inputs: {referenceImages: ["{product.image}"]}
output: {dir: out, filename: "{product.sku}_{result}.{ext}"}
""")
    result = cli("validate", str(recipe))
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, result.output
    assert errors[0].startswith("error: task.width: must be a multiple of 16")  # the loading stage
    assert errors[1].startswith("error: task.positivePrompt: template names unknown field 'product.colour' (row B")
    assert errors[1].endswith("[and 2 more items with this problem]")  # rows C and D, said what it counts
    assert errors[2].startswith("error: task.inputs.referenceImages: ") and errors[2].endswith("missing-a.png does not exist (item 'product=A')")


# --- plan ----------------------------------------------------------------------------------------


def test_plan_names_each_changed_field_once(tmp_path):
    recipe = write_recipe(tmp_path, things=["a"])
    execute(against_folder(plan_recipe(recipe, None)), FakeEngine())
    write_recipe(tmp_path, things=["a"], model="runware:400@4", width=256)  # another model, another width
    report = json.loads(cli("plan", str(recipe), "--json").output)
    fields = report["diff"]["changed"][0]["fields"]
    assert "model" in fields and "width" in fields and len(fields) == len(set(fields)), fields
    text = cli("plan", str(recipe)).output
    changed = [line for line in text.splitlines() if line.strip().startswith("changed ")]
    assert len(changed) == 1 and changed[0].count("model") == 1, changed


# --- refused runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["missing-weights", "bad-dtype", "zero-budget"])
def test_a_refused_run_leaves_no_output_folder(tmp_path, monkeypatch, problem):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, model="runware:400@6" if problem == "missing-weights" else "flux2-klein-tiny")
    if problem != "missing-weights":
        monkeypatch.setattr("flowgen.commands.run.PipelineEngine", CliFakeEngine)
    extra = {"missing-weights": [], "bad-dtype": ["--dtype", "float8"], "zero-budget": ["--budget", "0"]}[problem]
    result = cli("run", str(recipe), *extra)
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    assert not (tmp_path / "out").exists()


def test_a_refused_run_leaves_an_existing_folder_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, things=["a", "b"])
    execute(against_folder(plan_recipe(recipe, None)), FakeEngine())
    out = tmp_path / "out"
    before = tree(out)
    write_recipe(tmp_path, things=["a", "b"], model="runware:400@6")  # weights not on this machine
    result = cli("run", str(recipe))
    assert result.exit_code == 2 and "hf download" in result.output, result.output
    assert tree(out) == before  # no run row, no lock rewritten, no export: nothing touched


# --- results set aside ---------------------------------------------------------------------------


def test_results_set_aside_are_announced_before_rendering(tmp_path):
    recipe = write_recipe(tmp_path, things=["a", "b", "c"], refs="inputs: {referenceImages: [\"{thing}.png\"]}")
    for name in ("b", "c"):
        Image.fromarray(np.full((128, 128, 3), 60, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    events: list[tuple[str, str]] = []

    class Recording(NullProgress):
        def note(self, message):
            events.append(("note", message))

        def start(self, total, batches):
            events.append(("start", f"{total}"))

        def advance(self, done, failed):
            events.append(("advance", f"{done}"))

    plan = plan_recipe(recipe, None)
    assert [bool(item.error) for item in plan.items] == [True, False, False]  # a.png is unreadable
    summary = execute(against_folder(plan), FakeEngine(), progress=Recording())
    assert summary.failed == 1 and summary.rendered == 2
    assert events[0][0] == "note" and events[1] == ("start", "2"), events
    assert events[0][1].startswith("1 result(s) set aside (recorded as failed, not rendered): ")
    assert "a.png" in events[0][1] and "(item 'thing=a')" in events[0][1]
