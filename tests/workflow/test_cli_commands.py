"""The command line as a new user meets it: `models`, `init`, `python -m flowgen`, every command's
--help (examples, exit codes), the missing-weights note of validate/plan, and docs/cli.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen import __version__
from flowgen.cli import main
from flowgen.commands import run as run_module
from flowgen.commands.init import starter_files
from flowgen.engine.catalog.cards import list_cards
from flowgen.run.engine import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
SPEC_AIRS = {"runware:400@2", "runware:400@3", "runware:400@4", "runware:400@5", "runware:400@6"}  # spec's klein family

REAL_MODEL_RECIPE = """\
version: 1
name: real-model
model: {model}
datasets:
  things: {{values: [a cup, a lamp]}}
matrix: {{thing: things}}
task: {{positivePrompt: "a photo of {{thing}}", width: 256, height: 256}}
"""


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline, and an empty flowgen cache (to see the tiny model not written)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWGEN_CACHE", str(tmp_path / "flowgen-cache"))
    return cache


def fake_snapshot(cache: Path, repo: str) -> Path:
    """A complete-looking diffusers snapshot of `repo` in the HF cache layout (empty weight files)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("c" * 40)
    components = ["transformer", "text_encoder", "vae", "tokenizer", "scheduler"]
    snapshot.mkdir(parents=True)
    index = {"_class_name": "Flux2KleinPipeline", **{c: ["diffusers", "X"] for c in components}}
    (snapshot / "model_index.json").write_text(json.dumps(index))
    for component in components[:3]:
        (snapshot / component).mkdir()
        (snapshot / component / "model.safetensors").write_bytes(b"")
    (snapshot / "tokenizer").mkdir()
    (snapshot / "tokenizer" / "tokenizer.json").write_text("{}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("c" * 40)
    return snapshot


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


# --------------------------------------------------------------------------------------------
# flowgen models


def test_models_json_lists_every_card_with_its_air_kind_and_fetch_command(hf_cache, tmp_path):
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}

    assert set(rows) == {card.name for card in list_cards()}
    assert {row["air"] for row in rows.values() if row["air"]} == SPEC_AIRS
    assert [name for name, row in rows.items() if row["default"]] == ["klein-9b-kv"]
    for card in list_cards():
        row = rows[card.name]
        assert row["air"] == card.air and row["distilled"] == card.distilled and row["kv"] == card.kv
        assert ("step-distilled" in row["kind"]) == (card.distilled and card.tiny is None)
        assert ("base" in row["kind"]) == (not card.distilled)
        assert ("K/V" in row["kind"]) == (card.kv and card.tiny is None)
        if card.tiny is not None:  # the embedded model is always there, and listing it writes nothing
            assert row["weights"]["present"] and row["fetch"] is None
            continue
        assert row["weights"]["present"] is False and row["weights"]["path"] is None
        assert row["weights"]["looked_in"].startswith(str(hf_cache))
        assert row["fetch"]["command"] == f"hf download {card.weights.hf_repo}"
        assert ("HF_TOKEN" in row["fetch"]["note"]) == card.weights.gated
        assert row["weights"]["problem"] == card.missing_weights()  # the text `run` stops with
    assert "9B base" in rows["klein-base-9b"]["kind"] and "CFG 4" in rows["klein-base-9b"]["kind"]
    assert not (tmp_path / "flowgen-cache").exists()


def test_models_sees_weights_in_the_hf_cache(hf_cache):
    snapshot = fake_snapshot(hf_cache, "black-forest-labs/FLUX.2-klein-4B")

    rows = {row["name"]: row for row in json.loads(invoke("models", "--json").output)}
    assert rows["klein-4b"]["weights"]["present"] and rows["klein-4b"]["weights"]["path"] == str(snapshot)
    assert not rows["klein-9b-kv"]["weights"]["present"]

    text = invoke("models").output
    block = text.split("klein-4b  runware:400@4")[1].split("\nklein-")[0]
    assert f"weights: on this machine: {snapshot}" in block and "fetch:" not in block
    kv_block = text.split("klein-9b-kv  runware:400@6  [default]")[1].split("\nflux2-klein-tiny")[0]
    assert "not on this machine" in kv_block
    assert "fetch:   hf download black-forest-labs/FLUX.2-klein-9b-kv" in kv_block and "HF_TOKEN" in kv_block
    tiny_block = text.split("flux2-klein-tiny  flowgen:1@1 (in `flowgen serve`; a recipe's model: is flux2-klein-tiny)")[1].split("\nklein-")[0]
    assert "always present" in tiny_block and "fetch:" not in tiny_block


# --------------------------------------------------------------------------------------------
# validate / plan say what run would stop at


def test_validate_and_plan_note_missing_weights_in_the_words_run_refuses_with(hf_cache, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(REAL_MODEL_RECIPE.format(model="runware:400@6"))

    refused = invoke("run", str(recipe))
    assert refused.exit_code == 2
    run_error = refused.output.strip().removeprefix("error: ")
    assert "hf download black-forest-labs/FLUX.2-klein-9b-kv" in run_error

    validated = invoke("validate", str(recipe))
    assert validated.exit_code == 0, validated.output
    lines = validated.output.splitlines()
    assert lines[0].startswith("ok: ") and len(lines) == 2
    assert lines[1].startswith(f"note: {run_error}") and "error" not in lines[1].split(":")[0]

    planned = invoke("plan", str(recipe))
    assert planned.exit_code == 0, planned.output
    assert planned.output.splitlines()[-1].startswith(f"note: {run_error}")
    as_json = json.loads(invoke("plan", str(recipe), "--json").output)
    assert as_json["weights_note"].startswith(run_error)


def test_no_weights_note_when_the_weights_are_here_or_the_model_is_embedded(hf_cache, tmp_path):
    fake_snapshot(hf_cache, "black-forest-labs/FLUX.2-klein-9b-kv")
    for model in ("runware:400@6", "flux2-klein-tiny"):
        recipe = tmp_path / f"{model.replace(':', '_')}.yaml"
        recipe.write_text(REAL_MODEL_RECIPE.format(model=model))
        for command in ("validate", "plan"):
            result = invoke(command, str(recipe))
            assert result.exit_code == 0 and "note:" not in result.output, (model, command, result.output)
        assert json.loads(invoke("plan", str(recipe), "--json").output)["weights_note"] is None


# --------------------------------------------------------------------------------------------
# flowgen init


class QuickEngine(FakeEngine):
    """FakeEngine in PipelineEngine's place: same constructor, nothing to load."""

    load_seconds = 0.0

    def __init__(self, model, dtype):
        super().__init__(dtype=dtype)


def test_init_writes_a_starter_that_validates_plans_and_runs(tmp_path, monkeypatch):
    folder = tmp_path / "starter"
    result = invoke("init", str(folder))
    assert result.exit_code == 0, result.output
    for relative in starter_files():
        assert (folder / relative).is_file() and f"wrote {folder / relative}" in result.output
    for command in ("validate", "plan", "run"):
        assert f"flowgen {command} {folder / 'recipe.yaml'}" in result.output
    refs = sorted((folder / "refs").glob("*.png"))
    assert 2 <= len(refs) <= 3
    from PIL import Image

    sizes = {Image.open(ref).size for ref in refs}
    assert min(min(size) for size in sizes) >= 64  # usable as references
    assert len({ref.read_bytes() for ref in refs}) == len(refs)  # distinct pictures

    recipe = str(folder / "recipe.yaml")
    validated = invoke("validate", recipe)
    assert validated.exit_code == 0 and "note:" not in validated.output, validated.output
    plan = json.loads(invoke("plan", recipe, "--json").output)
    assert plan["model"] == "flux2-klein-tiny" and plan["counts"]["errors"] == 0
    assert plan["counts"]["items"] == 6 and all(item["references"] == 1 for item in plan["items"])

    # the whole run path (references loaded, files and manifest written) with the fake engine: the
    # tiny model's compile would add ~10 s; `flowgen run` of the starter with it was checked by hand
    monkeypatch.setattr(run_module, "PipelineEngine", QuickEngine)
    ran = invoke("run", recipe)
    assert ran.exit_code == 0, ran.output
    assert len(list((folder / "out" / "starter").glob("*.png"))) == 6
    assert "6 rendered" in ran.output and invoke("status", str(folder / "out" / "starter")).exit_code == 0


def test_init_refuses_to_overwrite_and_writes_nothing_without_force(tmp_path):
    folder = tmp_path / "starter"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "shapes.csv").write_text("mine\n")

    refused = invoke("init", str(folder))
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [refused.output.strip()]
    assert refused.output.startswith(f"error: {folder / 'data' / 'shapes.csv'}: already exists") and "--force" in refused.output
    assert (folder / "data" / "shapes.csv").read_text() == "mine\n"
    assert sorted(p.name for p in folder.rglob("*")) == ["data", "shapes.csv"]  # nothing else written

    forced = invoke("init", str(folder), "--force")
    assert forced.exit_code == 0, forced.output
    assert (folder / "data" / "shapes.csv").read_bytes() == starter_files()["data/shapes.csv"]


def test_init_into_a_file_is_one_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    result = invoke("init", str(target))
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# python -m flowgen, --help


def test_python_m_flowgen_is_the_cli():
    version = subprocess.run([sys.executable, "-m", "flowgen", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert version.returncode == 0 and version.stdout.strip() == f"flowgen, version {__version__}"
    helped = subprocess.run([sys.executable, "-m", "flowgen", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: flowgen ")
    assert all(f"  {name} " in helped.stdout for name in main.commands)


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_help_has_examples_and_exit_codes(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0
    examples = result.output.split("Examples:\n")[1].split("\n\n")[0].splitlines()
    assert examples and all(line.startswith(f"    flowgen {name}") for line in examples), result.output
    codes = result.output.split("Exit codes:\n")[1].strip().splitlines()
    numbers = [int(line.split()[0]) for line in codes]
    assert numbers[0] == 0 and 2 in numbers and numbers == sorted(numbers), result.output


def test_set_says_it_repeats_and_regen_names_the_result_form():
    for name in ("validate", "plan", "run"):
        text = " ".join(invoke(name, "--help").output.split())
        assert "--set KEY=VALUE Override a recipe field (repeatable), e.g. --set task.steps=8 --set seed=3" in text
    regen = invoke("regen", "--help").output
    assert re.search(r"^\s+ID#N\s+one result of the item", regen, re.M)
    assert "35f25bbdf15c#1" in regen


# --------------------------------------------------------------------------------------------
# docs/cli.md


def test_docs_cli_describes_every_command_and_environment_variable():
    docs = (ROOT / "docs" / "cli.md").read_text()
    headings = set(re.findall(r"^## `flowgen (\w+)", docs, re.M))
    assert headings == {name for name, command in main.commands.items() if not command.hidden}
    source = "\n".join(path.read_text() for path in (ROOT / "flowgen").rglob("*.py"))
    variables = set(re.findall(r"\b(FLOWGEN_[A-Z_]+[A-Z])\b", source))
    assert {"FLOWGEN_MAX_BATCH", "FLOWGEN_DTYPE", "FLOWGEN_WEBHOOK_SECRET"} <= variables
    assert not {v for v in variables if f"`{v}`" not in docs}, "undocumented environment variables"
    assert "docs/cli.md" in (ROOT / "README.md").read_text()
