"""Shards on the real tiny model, as array jobs run them: `--shard 0/2` and `--shard 1/2` at the same
time on one output folder (two processes), one of them SIGKILLed mid-batch and run again alone.

The proof: every result once in the manifest and in manifest.jsonl, `status` all ok, every image
byte-identical to a single-process run of the same recipe, the surviving shard's rows untouched by
the rerun, and `flowgen merge` twice leaving the same manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main as cli
from flowgen.commands.run import run_command
from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.manifest import manifest_path
from flowgen.run.shards import Shard, owners

ROOT = Path(__file__).resolve().parents[2]
# 4 subjects x 6 results = 24 results; batches of 4: 6 engine calls, 3 per shard
OPTIONS = ["model=flux2-klein-tiny", "task.width=128", "task.height=128", "task.steps=2", "task.numberResults=6"]
ENV = {**os.environ, "FLOWGEN_MAX_BATCH": "4", "JAX_PLATFORMS": "cpu"}
TIMEOUT = 300  # seconds any one process may take


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.png")) if ".flowgen" not in p.parts}


def _rows(path: Path) -> dict[tuple[str, int], tuple]:
    conn = sqlite3.connect(path, timeout=5)
    try:
        return {(r[0], r[1]): r for r in conn.execute("SELECT * FROM results")}
    finally:
        conn.close()


def _shard(recipe: Path, out: Path, spec: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(out), "--shard", spec]
    args += [a for option in OPTIONS for a in ("--set", option)]
    return subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _output(proc: subprocess.Popen) -> str:
    return proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")[-3000:]


@pytest.mark.slow
def test_two_shards_at_once_one_killed_and_rerun_equal_a_single_process_run(tmp_path, monkeypatch):
    recipe = tmp_path / "quickstart.yaml"
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", recipe)
    monkeypatch.setenv("FLOWGEN_MAX_BATCH", "4")
    single = tmp_path / "single"
    assert run_command(str(recipe), str(single), OPTIONS, None, False) == 0
    expected = _files(single)
    assert len(expected) == 24

    out = tmp_path / "sharded"
    first, second = _shard(recipe, out, "0/2"), _shard(recipe, out, "1/2")
    killed_db = Shard(1, 2).db_path(out)
    rows_at_kill = 0
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and second.poll() is None:  # shard 1 recorded a batch: kill it in its next
        if killed_db.exists():
            try:
                rows_at_kill = len(_rows(killed_db))
            except sqlite3.OperationalError:
                rows_at_kill = 0
            if rows_at_kill:
                time.sleep(0.3)
                break
        time.sleep(0.05)
    ended_itself = second.poll()  # None: still running, as it must be until killed
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert ended_itself is None, f"shard 1 ended by itself ({ended_itself}) before recording a batch:\n{_output(second)}"
    rows_at_kill = len(_rows(killed_db))  # what it committed before it died
    assert 0 < rows_at_kill < 12, f"shard 1 held {rows_at_kill} rows when killed:\n{_output(second)}"
    log = _output(first)
    assert first.returncode == 0, log

    survivor = {rid: row for rid, row in _rows(manifest_path(out)).items()}  # shard 0 folded itself as it ended
    owner = owners(plan_recipe(str(recipe), str(out), OPTIONS, 4, "float32"), 2)
    assert {rid for rid, row in survivor.items() if owner[rid] == 0} == {rid for rid in owner if owner[rid] == 0}

    rerun = _shard(recipe, out, "1/2")
    log = _output(rerun)
    assert rerun.returncode == 0, log
    assert f": {12 - rows_at_kill} rendered, {rows_at_kill} unchanged, 0 failed" in log, log  # only what it left undone

    status = CliRunner().invoke(cli, ["status", str(out), "--json"])
    report = json.loads(status.output)
    assert report["counts"] == {"ok": 24} and report["not_rendered"] == 0 and report["planned"] == 24
    rows = _rows(manifest_path(out))
    assert len(rows) == 24
    for rid, row in survivor.items():
        if owner[rid] == 0:
            assert rows[rid] == row  # shard 0's rows untouched by shard 1's rerun
    exported = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["item_id"], r["result_index"]) for r in exported) == sorted(rows)
    assert _files(out) == expected  # byte-identical to the single-process run

    merged_once = (_rows(manifest_path(out)), (out / "manifest.jsonl").read_text())
    for _ in range(2):
        assert CliRunner().invoke(cli, ["merge", str(out)]).exit_code == 0
    assert (_rows(manifest_path(out)), (out / "manifest.jsonl").read_text()) == merged_once


@pytest.mark.slow
def test_two_shards_at_once_check_the_canary_once_and_a_drifted_canary_stops_both(tmp_path):
    """The canary runs once, before any shard renders: of two shards started together one checks it
    and the other takes its verdict; with another dtype the canary drifts and neither renders."""
    recipe = tmp_path / "quickstart.yaml"
    # 99 dB: only identical renders pass (the replays of an unchanged engine are byte-identical)
    recipe.write_text((ROOT / "recipes" / "quickstart.yaml").read_text() + "canary: {items: 2, threshold_db: 99}\n")
    out = tmp_path / "out"
    first = subprocess.run(
        [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(out)]
        + [a for option in OPTIONS[:-1] + ["task.numberResults=1"] for a in ("--set", option)],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert first.returncode == 0, first.stdout + first.stderr  # the canary's first renders

    def together(*extra: str) -> list[tuple[int, str]]:
        procs = [_shard(recipe, out, spec) if not extra else subprocess.Popen(
            [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(out), "--shard", spec, *extra]
            + [a for option in OPTIONS for a in ("--set", option)],
            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for spec in ("0/2", "1/2")]
        return [(proc.wait(TIMEOUT), _output(proc)) for proc in procs]

    def verdicts() -> list[tuple]:
        CliRunner().invoke(cli, ["merge", str(out)])
        conn = sqlite3.connect(manifest_path(out))
        try:
            return conn.execute("SELECT run_id, item_id, passed FROM canary ORDER BY checked_at").fetchall()
        finally:
            conn.close()

    ran = together()
    assert [code for code, _ in ran] == [0, 0], ran
    assert sum("not checked again" in log for _, log in ran) == 1, ran  # one shard took the other's verdict
    checked = verdicts()
    assert len(checked) == 2 and len({run for run, _, _ in checked}) == 1 and {p for *_, p in checked} == {1}
    report = json.loads(CliRunner().invoke(cli, ["status", str(out), "--json"]).output)
    assert report["counts"] == {"ok": 24} and report["not_rendered"] == 0
    files = _files(out)

    drifted = together("--dtype", "bfloat16")  # the engine changed: the canary fails, on one check
    assert [code for code, _ in drifted] == [1, 1], drifted
    for _, log in drifted:
        lines = log.splitlines()
        assert sum(line.startswith("error: canary: item ") for line in lines) == 2, log
        assert "dtype float32 → bfloat16" in log and "0 rendered" in log
    assert sum("not checked again" in log for _, log in drifted) == 1, drifted
    new = verdicts()[len(checked):]
    assert len(new) == 2 and len({run for run, _, _ in new}) == 1 and {p for *_, p in new} == {0}
    assert _files(out) == files  # nothing rendered
