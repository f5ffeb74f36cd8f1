"""Data values that would make an unusable output file name are refused up front (issue 18, item 11).

A NUL in a data value used in output.filename passed `validate` and crashed `run` with a traceback
after an image was on disk; a value could also move results into `.flowgen` or a hidden file, or
into another folder with a '/'. `validate`, `plan` and `run` now refuse them with one line naming
output.filename and the item, before anything is rendered or written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main
from flowgen.errors import RecipeError
from flowgen.recipe.api import expand_items, load_recipe

RECIPE = """\
version: 1
name: names
model: flux2-klein-tiny
datasets:
  products: {{csv: products.csv, key: "{{id}}"}}
matrix: {{product: products}}
task: {{positivePrompt: "a photo of a {{product.name}}", width: 256, height: 256}}
output: {{dir: out, filename: "{filename}"}}
"""


def recipe_with(tmp_path: Path, value: str, filename: str = "{product.name}_{result}.{ext}") -> Path:
    (tmp_path / "products.csv").write_text(f'id,name\nok,cup\nbad,"{value}"\n', newline="")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(filename=filename))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as err:
        expand_items(load_recipe(path))
    return err.value.problems


@pytest.mark.parametrize(("value", "shown", "problem"), [
    ("cup\x00x", "'cup\\x00x_0.jpg'", "contains the control character '\\x00'; names may not contain NUL, line breaks or tabs"),
    ("cup\tx", "'cup\\tx_0.jpg'", "contains the control character '\\t'; names may not contain NUL, line breaks or tabs"),
    ("cup\nx", "'cup\\nx_0.jpg'", "contains the control character '\\n'; names may not contain NUL, line breaks or tabs"),
    (".hidden", "'.hidden_0.jpg'", "has a part starting with '.', which would be hidden (and '.flowgen' holds the run's records)"),
    ("a/b", "'a/b_0.jpg'", "gets a path separator from {product.name} = 'a/b'; values may not contain '/' or '\\' "
                           "(write subfolders into output.filename itself)"),
    ("a\\b", "'a\\\\b_0.jpg'", "gets a path separator from {product.name} = 'a\\\\b'; values may not contain '/' or '\\' "
                               "(write subfolders into output.filename itself)"),
])
def test_a_value_that_spoils_the_file_name_is_one_problem_naming_the_item(tmp_path, value, shown, problem):
    assert problems_of(recipe_with(tmp_path, value)) == [f"output.filename: {shown} for item 'product=bad' {problem}"]


def test_a_value_cannot_put_a_result_into_the_flowgen_folder(tmp_path):
    path = recipe_with(tmp_path, ".flowgen", filename="{product.name}/{result}.{ext}")
    assert problems_of(path) == ["output.filename: '.flowgen/0.jpg' for item 'product=bad' has a part starting with '.', "
                                 "which would be hidden (and '.flowgen' holds the run's records)"]


def test_a_leading_dot_in_the_template_itself_is_reported_once(tmp_path):
    path = recipe_with(tmp_path, "mug", filename=".cache/{product.name}_{result}.{ext}")
    assert problems_of(path) == ["output.filename: '.cache/{product.name}_{result}.{ext}' has a part starting with '.', "
                                 "which would be hidden (and '.flowgen' holds the run's records)"]


def test_subfolders_written_in_the_template_and_dots_inside_names_still_work(tmp_path):
    path = recipe_with(tmp_path, "mug.v2", filename="{product.id}/{product.name}_{result}.{ext}")
    recipe = load_recipe(path)
    assert [recipe.render_filename(item, 0, "jpg") for item in expand_items(recipe)] == ["bad/mug.v2_0.jpg", "ok/cup_0.jpg"]


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_validate_plan_and_run_refuse_a_nul_before_writing_anything(tmp_path, command):
    path = recipe_with(tmp_path, "cup\x00x")
    result = CliRunner().invoke(main, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: output.filename: 'cup\\x00x_0.jpg' for item 'product=bad' contains the control character "
                     "'\\x00'; names may not contain NUL, line breaks or tabs"]
    assert not (tmp_path / "out").exists()


def test_a_quoted_csv_cell_keeps_its_line_break_and_a_json_string_its_u2028(tmp_path):
    (tmp_path / "products.csv").write_text('id,name\nok,"two\nlines"\n', newline="")
    (tmp_path / "more.jsonl").write_text('{"id": "j", "name": "a\u2028b"}\n', newline="")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(filename="{slug}_{result}.{ext}").replace(
        "products: {csv: products.csv", "more: {jsonl: more.jsonl}\n  products: {csv: products.csv").replace(
        "matrix: {product: products}", "zip: [{product: products, extra: more}]").replace(
        "{product.name}\"", "{product.name} {extra.name}\""))
    [item] = expand_items(load_recipe(path))
    assert item.task["positivePrompt"] == "a photo of a two\nlines a\u2028b"
