"""A real model card whose weights are absent stops the run before anything is recorded (exit 2)."""

import sqlite3

from click.testing import CliRunner

from flowgen.cli import main

RECIPE = """\
version: 1
name: needs-real-weights
model: runware:400@6
seed: 1
datasets:
  things: {values: [a cup, a lamp]}
matrix: {thing: things}
task: {positivePrompt: "a photo of {thing}", width: 256, height: 256}
output: {dir: out, filename: "{slug}_{result}.{ext}"}
"""


def test_missing_real_weights_is_one_user_error_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)

    result = CliRunner().invoke(main, ["run", str(recipe)])

    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hf download" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not [p for p in (tmp_path / "out").glob("*") if p.suffix in (".jpg", ".png", ".webp")]
    manifest = tmp_path / "out" / ".flowgen" / "manifest.sqlite"
    if manifest.exists():
        assert sqlite3.connect(manifest).execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
