"""Incremental datasets: a watermark in the manifest after each successful run; the next plan holds
only the rows (files) new since, and the items it leaves out are kept, not removed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from flowgen.cli import main
from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import Manifest, load_watermarks
from tests.workflow.incremental_recipe import run, write_recipe, write_rows


def plan_json(recipe: Path) -> dict:
    result = CliRunner().invoke(main, ["plan", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_second_run_renders_only_the_rows_added_since_and_plan_shows_the_watermark(tmp_path, engine):
    recipe = write_recipe(tmp_path)
    write_rows(tmp_path, [("A-1", "white sneaker"), ("B-2", "brown boot")])
    first = plan_json(recipe)
    assert first["incremental"] == [{"dataset": "products", "kind": "keys", "rows": 2, "new_rows": 2,
                                      "watermark_rows": 0, "recorded_at": None, "run_id": None}]

    assert run(recipe) == 0
    assert sorted(engine) == ["photo of brown boot", "photo of white sneaker"]
    out = tmp_path / "out" / "nightly"
    assert load_watermarks(out)["products"]["entries"] == ["A-1", "B-2"]

    write_rows(tmp_path, [("A-1", "white sneaker with new text"), ("B-2", "brown boot"), ("C-3", "red sandal")])
    shown = plan_json(recipe)
    watermark = shown["incremental"][0]
    assert (watermark["rows"], watermark["new_rows"], watermark["watermark_rows"]) == (3, 1, 2)
    assert watermark["recorded_at"] is not None and watermark["run_id"]
    assert shown["counts"]["items"] == 1 and shown["counts"]["to_run"] == 1 and shown["retained_items"] == 2
    text = CliRunner().invoke(main, ["plan", str(recipe)]).stdout
    assert "incremental products: watermark of " in text and "holds 2 rows; 1 of 3 rows new (planned), 2 item(s) left" in text

    engine.clear()
    assert run(recipe) == 0
    assert engine == ["photo of red sandal"]  # A-1 changed its name but its key was seen: not rendered again
    with Manifest(out) as manifest:
        assert sorted(r["item_key"] for r in manifest.records()) == ["product=A-1", "product=B-2", "product=C-3"]
        assert manifest.watermarks()["products"]["entries"] == ["A-1", "B-2", "C-3"]


def test_the_items_left_out_are_retained_not_removed(tmp_path, engine):
    recipe = write_recipe(tmp_path)
    write_rows(tmp_path, [("A-1", "a"), ("B-2", "b")])
    assert run(recipe) == 0
    write_rows(tmp_path, [("A-1", "a"), ("B-2", "b"), ("C-3", "c")])
    out = tmp_path / "out" / "nightly"
    plan = plan_recipe(recipe, None, watermarks=load_watermarks)
    with Manifest(out) as manifest:
        earlier = {r["item_id"] for r in manifest.records()}
    assert plan.retained_item_ids == earlier and len(earlier) == 2
    assert [item.key for item in plan.items] == ["product=C-3"]
    # without a watermark reader every row is planned, as before incremental datasets
    assert len(plan_recipe(recipe, None).items) == 3
    write_rows(tmp_path, [("A-1", "a")])  # a row that leaves the dataset is no longer the recipe's
    assert plan_recipe(recipe, None, watermarks=load_watermarks).retained_item_ids == {
        i for i in earlier if i in {item.item_id for item in plan_recipe(recipe, None).items}}


def test_a_run_that_does_not_finish_everything_keeps_the_old_watermark(tmp_path, engine):
    recipe = write_recipe(tmp_path)
    write_rows(tmp_path, [("A-1", "a"), ("B-2", "b")])
    assert run(recipe, max_batch=1) == 0
    write_rows(tmp_path, [("A-1", "a"), ("B-2", "b"), ("C-3", "c"), ("D-4", "d")])
    out = tmp_path / "out" / "nightly"
    plan = plan_recipe(recipe, None, max_batch=1, watermarks=load_watermarks)
    summary = execute(against_folder(plan), FakeEngine(), limit=1)  # one of the two new rows held back
    assert (summary.rendered, summary.not_run, summary.exit_code) == (1, 1, 0)
    assert load_watermarks(out)["products"]["entries"] == ["A-1", "B-2"]  # not advanced
    again = plan_recipe(recipe, None, watermarks=load_watermarks)
    assert [item.key for item in again.items] == ["product=C-3", "product=D-4"]  # both still new
    engine.clear()
    assert run(recipe) == 0 and engine == ["photo of d"]  # C-3 is done and unchanged; D-4 renders
    assert load_watermarks(out)["products"]["entries"] == ["A-1", "B-2", "C-3", "D-4"]


def picture(path: Path, value: int) -> None:
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path)


def test_an_images_dataset_watermarks_paths_mtimes_and_content_hashes(tmp_path, engine):
    (tmp_path / "refs").mkdir()
    for name, value in (("a", 10), ("b", 20)):
        picture(tmp_path / "refs" / f"{name}.png", value)
    recipe = write_recipe(tmp_path, dataset="shots: {images: 'refs/*.png', incremental: true}", matrix="shot: shots",
                          prompt="shot {shot.name}", filename="{shot.name}_{result}.{ext}",
                          task="inputs: {referenceImages: ['{shot.path}']}")
    assert run(recipe) == 0 and sorted(engine) == ["shot a", "shot b"]
    out = tmp_path / "out" / "nightly"
    entries = load_watermarks(out)["shots"]["entries"]
    assert sorted(entries) == ["refs/a.png", "refs/b.png"]
    mtime, size, digest = entries["refs/a.png"]
    stat = (tmp_path / "refs" / "a.png").stat()
    assert (mtime, size) == (stat.st_mtime_ns, stat.st_size) and len(digest) == 64

    os.utime(tmp_path / "refs" / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    picture(tmp_path / "refs" / "b.png", 99)  # new content under an old name: new
    picture(tmp_path / "refs" / "c.png", 30)  # a new file
    plan = plan_recipe(recipe, None, watermarks=load_watermarks)
    assert [item.key for item in plan.items] == ["shot=b", "shot=c"]
    assert plan.incremental.datasets[0].kind == "files" and plan.incremental.datasets[0].new_rows == 2
    engine.clear()
    assert run(recipe) == 0 and sorted(engine) == ["shot b", "shot c"]
    assert plan_recipe(recipe, None, watermarks=load_watermarks).items == []  # nothing new: nothing planned


def test_a_jsonl_dataset_with_a_key_column_and_a_plain_dataset_beside_it(tmp_path, engine):
    (tmp_path / "rows.jsonl").write_text('{"title": "x", "id": "r1"}\n')
    recipe = write_recipe(tmp_path, dataset="rows: {jsonl: rows.jsonl, key: '{id}', incremental: true}",
                          matrix="row: rows\n  light: [soft, hard]", prompt="{row.title} in {light} light",
                          filename="{row.id}_{light}_{result}.{ext}")
    assert run(recipe) == 0 and len(engine) == 2
    (tmp_path / "rows.jsonl").write_text('{"title": "x", "id": "r1"}\n{"title": "y", "id": "r2"}\n')
    engine.clear()
    assert run(recipe) == 0
    assert sorted(engine) == ["y in hard light", "y in soft light"]  # every combination of the new row only
