"""Batch size is a run setting: `--max-batch N` or FLOWGEN_MAX_BATCH (flag wins); bad values fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from flowgen.cli import main

QUICKSTART = str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")  # 4 results, one shape


def plan_json(tmp_path, *args, env=None):
    result = CliRunner().invoke(main, ["plan", QUICKSTART, "--out", str(tmp_path), "--json", *args], env=env or {})
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_flag_and_env_set_the_batch_size_and_the_flag_wins(tmp_path):
    unset = {"FLOWGEN_MAX_BATCH": None}
    assert plan_json(tmp_path, env=unset)["counts"]["batches"] == 1  # default 8: one batch of 4
    assert plan_json(tmp_path, "--max-batch", "2", env=unset)["counts"]["batches"] == 2
    assert plan_json(tmp_path, "--max-batch", "3", env=unset)["counts"]["batches"] == 2  # rounded down to 2
    assert plan_json(tmp_path, env={"FLOWGEN_MAX_BATCH": "1"})["counts"]["batches"] == 4
    assert plan_json(tmp_path, "--max-batch", "4", env={"FLOWGEN_MAX_BATCH": "1"})["counts"]["batches"] == 1


def test_batch_size_does_not_change_what_is_planned(tmp_path):
    small = plan_json(tmp_path, "--max-batch", "1", env={"FLOWGEN_MAX_BATCH": None})
    large = plan_json(tmp_path, "--max-batch", "8", env={"FLOWGEN_MAX_BATCH": None})
    assert small["plan_hash"] == large["plan_hash"]
    assert small["items"] == large["items"]


def test_bad_env_value_is_one_clear_line(tmp_path):
    for bad in ("abc", "0", "-4", "2.5"):
        result = CliRunner().invoke(main, ["plan", QUICKSTART, "--out", str(tmp_path)], env={"FLOWGEN_MAX_BATCH": bad})
        assert result.exit_code == 2, (bad, result.output)
        assert result.output.strip().splitlines() == [
            f"error: FLOWGEN_MAX_BATCH={bad!r} is not allowed: use a positive integer such as 8 or 16"
        ]
        assert not any(tmp_path.iterdir())  # nothing written


def test_bad_flag_value_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["run", QUICKSTART, "--out", str(tmp_path), "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output
    assert not any(tmp_path.iterdir())
