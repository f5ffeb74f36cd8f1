"""Removed results — in the manifest, but no longer in the recipe: `plan` lists them, `run` says so,
`status` counts them apart, and `flowgen prune` lists them, then (--yes) removes their files and rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main
from flowgen.run.engine import FakeEngine
from flowgen.run.manifest import Manifest


class CliFakeEngine(FakeEngine):
    """FakeEngine in PipelineEngine's place (same constructor), so `flowgen run` renders in milliseconds."""

    load_seconds = 0.0

    def __init__(self, model=None, dtype="float32"):
        super().__init__(dtype=dtype)


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch):
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", CliFakeEngine)


def write_recipe(folder: Path, things=("a", "b", "c", "d"), name: str = "recipe.yaml", dataset: str | None = None) -> Path:
    path = folder / name
    path.write_text(f"""version: 1
name: prune
model: flux2-klein-tiny
seed: 1
datasets:
  things: {dataset or '{values: [' + ', '.join(things) + ']}'}
matrix: {{thing: things}}
task: {{positivePrompt: "a photo of {{thing}}", width: 128, height: 128, steps: 1, outputFormat: PNG}}
output: {{dir: out, filename: "{{thing}}_{{result}}.{{ext}}"}}
""")
    return path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def rows(out: Path, table: str) -> int:
    with Manifest(out) as manifest:
        return manifest.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_plan_run_and_status_tell_of_results_no_longer_in_the_recipe(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    assert cli("run", str(recipe)).exit_code == 0
    write_recipe(tmp_path, things=["a"])

    plan = cli("plan", str(recipe))
    assert f"3 result(s) in the manifest no longer in the recipe (flowgen prune {out} removes their files and rows):" in plan.output
    removed_lines = [line.strip() for line in plan.output.splitlines() if line.strip().startswith("removed ")]
    assert len(removed_lines) == 3 and any(line.endswith(" thing=b (b_0.png)") for line in removed_lines), plan.output
    report = json.loads(cli("plan", str(recipe), "--json").output)
    assert report["counts"]["removed"] == 3
    assert sorted((r["key"], r["path"]) for r in report["diff"]["removed_results"]) == [
        ("thing=b", "b_0.png"), ("thing=c", "c_0.png"), ("thing=d", "d_0.png")]

    ran = cli("run", str(recipe))
    assert ran.exit_code == 0
    assert f"3 result(s) no longer in the recipe: flowgen prune {out} removes them" in ran.output

    status = cli("status", str(out)).output.splitlines()
    assert status[0] == f"{out}: 1 planned: 1 ok, 0 failed, 0 not rendered yet", status
    assert f"  3 result(s) no longer in the recipe, not counted above (flowgen prune {out} removes them)" in status
    assert any(line.startswith("  no longer in the recipe (result): ") for line in status)


def test_prune_lists_first_then_removes_files_and_rows_and_records_it(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    assert cli("run", str(recipe)).exit_code == 0
    with Manifest(out) as manifest:  # what a result can have besides its row: deliveries, attempts, an expiry
        b = next(r for r in manifest.records() if r["item_key"] == "thing=b")
        manifest.set_delivery(b["item_id"], 0, "webhook", "failed", error="500")
        manifest.add_attempts(b["item_id"], 0, "webhook", "r", [{"attempt": 1, "started_at": "t", "outcome": "failed"}])
        manifest.expire(b["item_id"], 0, b["content_hash"])
    write_recipe(tmp_path, things=["a"])  # edited, not run yet: prune compares with the file as it is now

    listed = cli("prune", str(out))
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0:2] for line in listed.output.splitlines()[:3]] == [["would", "remove"]] * 3
    assert f"{out}: 3 result(s) no longer in recipe prune" in listed.output and "--yes` removes" in listed.output
    assert sorted(p.name for p in out.glob("*.png")) == ["a_0.png", "b_0.png", "c_0.png", "d_0.png"]  # a dry run
    assert rows(out, "results") == 4

    pruned = cli("prune", str(out), "--yes")
    assert pruned.exit_code == 0, pruned.output
    assert sum(line.startswith("removed ") for line in pruned.output.splitlines()) == 3
    assert sorted(p.name for p in out.glob("*.png")) == ["a_0.png"]
    assert [rows(out, t) for t in ("results", "deliveries", "delivery_attempts", "expirations")] == [1, 0, 0, 0]
    with Manifest(out) as manifest:
        (record,) = manifest.prunes()
    assert sorted(r[2] for r in record["results"]) == ["thing=b", "thing=c", "thing=d"]
    assert record["recipe"] == str(recipe.resolve()) and time.time() - record["pruned_at"] < 60
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 1

    assert "nothing to prune" in cli("prune", str(out), "--yes").output
    again = cli("run", str(recipe))
    assert again.exit_code == 0 and "0 rendered, 1 unchanged" in again.output and "no longer" not in again.output


def test_prune_replays_the_last_runs_overrides_and_takes_another_recipe(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    assert cli("run", str(recipe), "--set", "task.numberResults=2").exit_code == 0
    # without the recorded --set, results #1 would look removed
    assert "nothing to prune" in cli("prune", str(out)).output
    other = write_recipe(tmp_path, things=["a", "b"], name="other.yaml")
    listed = cli("prune", str(out), "--recipe", str(other))
    assert f"{out}: 6 result(s) no longer in recipe prune ({other})" in listed.output, listed.output


def test_prune_keeps_what_an_incremental_watermark_retains(tmp_path):
    csv = tmp_path / "things.csv"
    dataset = "{csv: things.csv, key: '{id}', incremental: true}"
    recipe = write_recipe(tmp_path, dataset=dataset).read_text().replace('{thing}"', '{thing.id}"')
    recipe = recipe.replace('"{thing}_{result}', '"{thing.id}_{result}')
    (tmp_path / "recipe.yaml").write_text(recipe)
    csv.write_text("id\na\nb\n")
    out = tmp_path / "out"
    assert cli("run", str(tmp_path / "recipe.yaml")).exit_code == 0
    csv.write_text("id\na\nb\nc\n")  # a and b are left to the first run by the watermark: still the recipe's
    ran = cli("run", str(tmp_path / "recipe.yaml"))
    assert ran.exit_code == 0 and "1 rendered" in ran.output and "no longer in the recipe" not in ran.output, ran.output
    assert "nothing to prune" in cli("prune", str(out)).output
    assert cli("status", str(out)).output.splitlines()[0] == f"{out}: 3 planned: 3 ok, 0 failed, 0 not rendered yet"
    csv.write_text("id\na\nc\n")  # b leaves the dataset: now it is removed
    listed = cli("prune", str(out), "--yes")
    assert "removed " in listed.output and "thing=b" in listed.output and sorted(p.name for p in out.glob("*.png")) == ["a_0.png", "c_0.png"]


def test_prune_needs_a_manifest_and_a_recipe(tmp_path):
    missing = cli("prune", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "no flowgen manifest" in missing.output
    from flowgen.plan import compile_plan
    from flowgen.recipe.api import Item
    from flowgen.run.executor import against_folder, execute

    item = Item(key="k", values={}, task={"positivePrompt": "p", "width": 64, "height": 64, "steps": 1, "numberResults": 1,
                                         "outputFormat": "PNG"}, references=())
    plan = compile_plan(recipe_name="r", recipe_seed=1, items=[item], out_dir=tmp_path / "bare",
                        filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", model="tiny", model_identity={"m": 1},
                        distilled=False, recipe_hash="h", max_batch=1)
    execute(against_folder(plan), FakeEngine())  # a run with no recipe file behind it (as from Python)
    result = cli("prune", str(tmp_path / "bare"))
    assert result.exit_code == 2 and "--recipe RECIPE" in result.output, result.output
