"""Plan diff against a manifest: new / unchanged / changed (which fields) / removed."""

from __future__ import annotations

from flowgen.plan import compile_plan, diff_plan
from flowgen.recipe.api import Item
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import Manifest


def item(key, **task):
    base = {"positivePrompt": f"prompt {key}", "width": 64, "height": 64, "steps": 2, "numberResults": 1, "outputFormat": "PNG"}
    base.update(task)
    return Item(key=key, values={}, task=base, references=())


def plan_of(items, out):
    return compile_plan(recipe_name="r", recipe_seed=0, items=items, out_dir=out,
                        filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", model="tiny",
                        model_identity={"m": 1}, distilled=False, recipe_hash="h")


def diff_against(out, items):
    plan = plan_of(items, out)
    with Manifest(out) as manifest:
        return plan, diff_plan(plan, manifest.index(), manifest.get)


def test_diff_names_new_unchanged_changed_removed(tmp_path):
    execute(against_folder(plan_of([item("a"), item("b"), item("c"), item("gone")], tmp_path)), FakeEngine())
    (tmp_path / "c_0.png").unlink()
    _, diff = diff_against(tmp_path, [item("a"), item("b", steps=3, positivePrompt="other"), item("c"), item("new", numberResults=2)])
    assert [r.item.key for r in diff.unchanged] == ["a"]
    assert sorted((r.item.key, r.result_index) for r in diff.new) == [("new", 0), ("new", 1)]
    changed = {r.item.key: reasons for r, reasons in diff.changed}
    assert changed["b"] == ["positivePrompt", "steps"]
    assert changed["c"] == ["output missing"]
    assert [r for r in diff.removed] == [(plan_of([item("gone")], tmp_path).results[0].item.item_id, 0)]
    assert {r.item.key for r in diff.to_run} == {"b", "c", "new"}


def test_modified_output_file_is_changed(tmp_path):
    execute(against_folder(plan_of([item("a")], tmp_path)), FakeEngine())
    (tmp_path / "a_0.png").write_bytes(b"tampered")
    _, diff = diff_against(tmp_path, [item("a")])
    assert [reasons for _, reasons in diff.changed] == [["output modified"]]
