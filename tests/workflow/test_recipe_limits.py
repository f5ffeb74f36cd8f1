"""A recipe from someone else cannot make flowgen read forever, eat memory or crash (issue 18, item 13).

The hostile cases run `flowgen validate` in a child process with a time limit and an address-space
limit, so that on code without the bounds they fail quickly instead of hanging the test run.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowgen.errors import RecipeError
from flowgen.limits import MAX_DATASET_BYTES, MAX_DEPTH, MAX_RECIPE_BYTES, MAX_VALUES
from flowgen.recipe.api import expand_items, load_recipe

ROOT = Path(__file__).parents[2]
HEAD = "version: 1\nname: t\nmodel: flux2-klein-tiny\ntask: {positivePrompt: a cat, width: 256, height: 256}\n"


def _bounded() -> None:  # the child may use 2 GiB at most (the bomb took 5.7 GB)
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def validate(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowgen", "validate", str(path), *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, preexec_fn=_bounded,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def problems_of(path: Path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as err:
        expand_items(load_recipe(path, list(overrides)))
    return err.value.problems


# --- YAML: aliases, depth, size ------------------------------------------------------------------


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    # "billion laughs": 9 levels of 9 aliases each = 9^9 (387 million) strings from 650 bytes
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n" + HEAD + "defaults: {lora: *i}\n")
    assert len(path.read_bytes()) < 1000
    line = one_line_error(validate(path))
    assert line.startswith(f"error: {path}:") and f"more than {MAX_VALUES:,} values with its aliases expanded" in line


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    path = write(tmp_path, HEAD + "defaults: &d {lora: [*d]}\n")
    line = one_line_error(validate(path))
    assert line.startswith(f"error: {path}:5:") and "refers to the list or mapping that contains it" in line


def test_ordinary_aliases_still_work(tmp_path):
    path = write(tmp_path, "version: 1\nname: t\nmodel: flux2-klein-tiny\ndefaults: {width: &side 256, height: *side}\n"
                 "matrix: {style: [oil, &ink ink]}\ntask: {positivePrompt: '{style} cat', negativePrompt: *ink}\n")
    items = expand_items(load_recipe(path))
    assert [(item.task["width"], item.task["height"], item.task["positivePrompt"], item.task["negativePrompt"])
            for item in items] == [(256, 256, "ink cat", "ink"), (256, 256, "oil cat", "ink")]


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    path = write(tmp_path, HEAD + "defaults: {lora: " + "[" * 50_000 + "]" * 50_000 + "}\n")
    line = one_line_error(validate(path))
    # "defaults: {lora: " is 17 characters; its mapping is level 2, so level MAX_DEPTH + 1 opens at 17 + MAX_DEPTH - 1
    assert line == f"error: {path}:5:{17 + MAX_DEPTH - 1}: nests deeper than {MAX_DEPTH} levels; recipes are limited to {MAX_DEPTH}"


def test_depth_built_from_aliases_counts_too(tmp_path):
    # each anchor nests the previous one 10 levels deeper, so a{i} is 11 + 10 i levels deep, under 64 as
    # written: a5 is 61; in a6, "[*a5]" (column 18) is 62 and the list that opens at column 15 is 65
    lines = ["a0: &a0 " + "[" * 10 + "1" + "]" * 10]
    lines += [f"a{i}: &a{i} " + "[" * 9 + f"[*a{i - 1}]" + "]" * 9 for i in range(1, 10)]
    path = write(tmp_path, "\n".join(lines) + "\n" + HEAD)
    assert problems_of(path) == [f"{path}:7:15: nests deeper than {MAX_DEPTH} levels with its aliases "
                                 f"expanded; recipes are limited to {MAX_DEPTH}"]


def test_a_deep_set_value_is_one_line(tmp_path):
    path = write(tmp_path, HEAD)
    line = one_line_error(validate(path, "--set", "task.lora=" + "[" * 5000 + "]" * 5000))
    assert line.startswith("error: --set 'task.lora=[[[") and f"nests deeper than {MAX_DEPTH} levels" in line


def test_a_huge_recipe_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as file:  # sparse: 50 MB that take no disk and no time to write
        file.write(HEAD.encode())
        file.truncate(50 * 1024 * 1024)
    line = one_line_error(validate(path))
    assert line == (f"error: {path}: is 52,428,800 bytes, over the limit of {MAX_RECIPE_BYTES // 1024} KiB for a recipe; "
                    "put long lists in a dataset file")


def test_a_recipe_at_the_limit_is_read(tmp_path):
    path = write(tmp_path, HEAD + "#" * (MAX_RECIPE_BYTES - len(HEAD) - 1) + "\n")
    assert path.stat().st_size == MAX_RECIPE_BYTES
    assert len(expand_items(load_recipe(path))) == 1


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink to a device"])
def test_a_recipe_that_is_not_a_file_is_refused_without_reading(tmp_path, kind):
    path = tmp_path / "recipe.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.symlink_to("/dev/zero")
    line = one_line_error(validate(path))
    assert line == f"error: {path}: is not a regular file (a device, FIFO or socket); expected a file"


# --- datasets ----------------------------------------------------------------------------------


def dataset_recipe(tmp_path: Path, source: str, relative: str) -> Path:
    return write(tmp_path, yaml.safe_dump({
        "version": 1, "name": "t", "model": "flux2-klein-tiny", "datasets": {"rows": {source: relative}},
        "matrix": {"row": "rows"}, "task": {"positivePrompt": "a {row}", "width": 256, "height": 256}}))


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_a_dataset_over_the_limit_is_refused_before_it_is_read(tmp_path, source):
    data = tmp_path / f"rows.{source}"
    with data.open("wb") as file:
        file.truncate(MAX_DATASET_BYTES + 1)
    path = dataset_recipe(tmp_path, source, data.name)
    assert problems_of(path) == [f"datasets.rows.{source}: rows.{source} is {MAX_DATASET_BYTES + 1:,} bytes, over the "
                                 f"limit of {MAX_DATASET_BYTES // 1024 // 1024} MiB for a dataset file"]


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_dataset_that_is_not_a_file_is_refused(tmp_path, target):
    data = tmp_path / "rows.csv"
    if target == "fifo":
        os.mkfifo(data)
    else:
        data.symlink_to(target)
    line = one_line_error(validate(dataset_recipe(tmp_path, "csv", "rows.csv")))
    assert line == "error: datasets.rows.csv: rows.csv is not a regular file (a device, FIFO or socket); expected a file"


def test_a_deeply_nested_json_line_is_one_problem(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"k": "a"}\n{"k": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
                                         '{"k": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}\n")
    path = dataset_recipe(tmp_path, "jsonl", "rows.jsonl")
    assert problems_of(path) == [
        f"datasets.rows.jsonl: line {n} of rows.jsonl nests deeper than {MAX_DEPTH} levels; rows are limited to {MAX_DEPTH}"
        for n in (2, 3)]


def test_a_csv_cell_over_the_csv_field_limit_is_one_problem(tmp_path):
    (tmp_path / "rows.csv").write_text('k,text\na,"' + "x" * 200_000 + '"\n')
    path = dataset_recipe(tmp_path, "csv", "rows.csv")
    assert problems_of(path) == ["datasets.rows.csv: line 2 of rows.csv: field larger than field limit (131072)"]
