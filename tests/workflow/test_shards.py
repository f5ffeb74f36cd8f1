"""`run --shard K/N` and `flowgen merge` on the FakeEngine: shares partition the plan and do not move,
sharded runs write what one process writes, merging is idempotent, locks exclude plain runs, a stopped
shard completes alone, watermarks wait for every shard, and bad --shard values are refused.
(The tiny model, concurrent processes and SIGKILL: test_shards_e2e.py.)"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main as cli
from flowgen.commands.run import run_command
from flowgen.commands.status import status_report
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.interrupt import StopRequest
from flowgen.run.lock import FolderBusy, RunLock
from flowgen.run.manifest import Manifest, manifest_path
from flowgen.run.merge import fold_shards
from flowgen.run.shards import Shard, canonical_batches, owners, shard_files
from tests.workflow.direct_runs import item, plan_of
from tests.workflow.incremental_recipe import run, write_recipe, write_rows


def _items(count=13):
    # two signatures (2 and 3 steps), two results each: 26 results, 7 canonical batches of <= 4
    return [item(f"k{i:02d}", numberResults=2, steps=2 + (i % 2)) for i in range(count)]


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.png")) if ".flowgen" not in p.parts}


def _results_table(out: Path) -> list[tuple]:
    conn = sqlite3.connect(manifest_path(out))
    try:
        return conn.execute("SELECT * FROM results ORDER BY item_id, result_index").fetchall()
    finally:
        conn.close()


def test_every_result_has_one_owner_shares_are_balanced_and_do_not_depend_on_positions(tmp_path):
    items = _items()
    plan = plan_of(items, tmp_path / "a")
    batches = canonical_batches(plan)
    for count in (1, 2, 3, 4, 7):
        owner = owners(plan, count)
        assert set(owner) == {r.rid for r in plan.results}
        per_shard = [sum(1 for b in batches if owner[b.results[0].rid] == k) for k in range(count)]
        assert max(per_shard) - min(per_shard) <= 1, per_shard
        for batch in batches:  # a canonical batch is never split between shards
            assert len({owner[r.rid] for r in batch.results}) == 1
    reordered = plan_of(list(reversed(items)), tmp_path / "b")
    assert owners(reordered, 3) == owners(plan, 3)


def test_shard_runs_write_what_one_process_writes_and_merging_twice_changes_nothing(tmp_path):
    items = _items()
    execute(against_folder(plan_of(items, tmp_path / "single")), FakeEngine())
    out = tmp_path / "sharded"
    engines = []
    for k in range(3):
        engines.append(FakeEngine())
        summary = execute(against_folder(plan_of(items, out)), engines[-1], share=Shard(k, 3))
        assert summary.failed == 0
    # every engine call of the shards is a call the single process made: same rows, same batch size
    single_engine = FakeEngine()
    execute(against_folder(plan_of(items, tmp_path / "again")), single_engine)
    calls = sorted((tuple(c.prompts), tuple(c.seeds)) for e in engines for c in e.calls)  # padded to the batch size
    assert calls == sorted((tuple(c.prompts), tuple(c.seeds)) for c in single_engine.calls)
    assert _files(out) == _files(tmp_path / "single") and len(_files(out)) == 26

    fold_shards(out)
    with Manifest(out) as manifest:
        manifest.export_jsonl()
        assert manifest.counts() == {"ok": 26}
        assert len(manifest.planned()) == 26
    first, jsonl = _results_table(out), (out / "manifest.jsonl").read_text()
    assert len({(r[0], r[1]) for r in first}) == len(first) == 26
    assert CliRunner().invoke(cli, ["merge", str(out)]).exit_code == 0
    assert CliRunner().invoke(cli, ["merge", str(out)]).exit_code == 0
    assert _results_table(out) == first and (out / "manifest.jsonl").read_text() == jsonl
    assert shard_files(out) == []  # folded and no process holds them: removed


def test_a_stopped_shard_rerun_alone_completes_only_its_own_results(tmp_path):
    items = _items()
    out = tmp_path / "out"
    execute(against_folder(plan_of(items, out)), FakeEngine(), share=Shard(0, 2))

    class StopAfterFirstBatch(FakeEngine):
        def generate_batch(self, request):
            stop.request()
            return super().generate_batch(request)

    stop = StopRequest()
    stopped = execute(against_folder(plan_of(items, out)), StopAfterFirstBatch(), share=Shard(1, 2), stop=stop)
    assert stopped.interrupted and stopped.batches == 1 and stopped.not_run > 0
    before = {(r[0], r[1]): r for r in _results_table(out)}  # shard 0 folded, shard 1 as far as it got
    engine = FakeEngine()
    rerun = execute(against_folder(plan_of(items, out)), engine, share=Shard(1, 2))
    assert rerun.rendered == stopped.not_run and rerun.failed == 0
    mine = {rid for rid, k in owners(plan_of(items, out), 2).items() if k == 1}
    assert len(engine.calls) == sum(1 for b in canonical_batches(plan_of(items, out))
                                    if b.results[0].rid in mine) - 1
    fold_shards(out)
    after = {(r[0], r[1]): r for r in _results_table(out)}
    assert len(after) == 26
    for rid, row in before.items():
        if rid not in mine:
            assert after[rid] == row  # the other shard's rows untouched
    with Manifest(out) as manifest:
        assert manifest.counts() == {"ok": 26}


def test_a_plain_run_and_a_shard_exclude_each_other_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    plan = plan_of(_items(3), out)
    with Shard(1, 2).lock(out, "shard-run"):
        with pytest.raises(FolderBusy, match=r"shard 1-of-2: run shard-run \(pid"):
            execute(against_folder(plan), FakeEngine())
        execute(against_folder(plan), FakeEngine(), share=Shard(0, 2))  # another shard may run meanwhile
    with RunLock(out, "plain-run"):
        with pytest.raises(FolderBusy, match=r"run plain-run .* \(not as a shard\)"):
            execute(against_folder(plan), FakeEngine(), share=Shard(1, 2))


def test_status_reads_the_shards_and_the_watermark_moves_only_when_every_shard_completed(tmp_path, engine):
    recipe = write_recipe(tmp_path)
    write_rows(tmp_path, [(f"S{i}", f"product {i}") for i in range(6)])
    out = tmp_path / "out" / "nightly"
    assert run(recipe, shard="0/2", max_batch=2) == 0  # 3 batches of 2: 2 for shard 0, 1 for shard 1
    with Manifest(out) as manifest:  # created by the fold at the end of shard 0
        assert manifest.watermarks() == {}
    report = status_report_of(out)
    assert report["not_rendered"] > 0 and report["counts"].get("ok", 0) < 6
    assert run(recipe, shard="1/2", max_batch=2) == 0
    report = status_report_of(out)
    assert report["counts"] == {"ok": 6} and report["not_rendered"] == 0
    with Manifest(out) as manifest:
        assert set(manifest.watermarks()["products"]["entries"]) == {f"S{i}" for i in range(6)}
    assert len(engine) == 6  # each row rendered once, by one shard


def status_report_of(out: Path) -> dict:
    fold_shards(out)
    with Manifest(out, create=False) as manifest:
        return status_report(manifest)


@pytest.mark.parametrize("value, message", [
    ("2/2", "--shard 2/2: K must be below N (shards are numbered 0 to 1)"),
    ("0/0", "--shard 0/0: N, the number of shards, must be at least 1"),
    ("garbage", "--shard 'garbage': expected K/N"),
])
def test_a_bad_shard_is_one_line_exit_2_and_nothing_is_written(tmp_path, engine, value, message):
    recipe = write_recipe(tmp_path)
    write_rows(tmp_path, [("S1", "one")])
    result = CliRunner().invoke(cli, ["run", str(recipe), "--shard", value])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
    assert not (tmp_path / "out").exists() and engine == []


def test_flowgen_shard_from_the_environment_and_combinations_refused(tmp_path, engine, monkeypatch):
    recipe = write_recipe(tmp_path)
    write_rows(tmp_path, [("S1", "one")])
    monkeypatch.setenv("FLOWGEN_SHARD", "5/3")
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 2 and result.output.strip() == (
        "error: $FLOWGEN_SHARD 5/3: K must be below N (shards are numbered 0 to 2)")
    monkeypatch.delenv("FLOWGEN_SHARD")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--shard", "0/2", "--distributed"])
    assert result.exit_code == 2 and result.output.startswith("error: --shard and --distributed cannot be combined")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and engine == []


def test_merge_without_a_manifest_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["merge", str(tmp_path)])
    assert result.exit_code == 2 and "no flowgen manifest here" in result.output


def test_jsonl_of_shard_runs_holds_each_result_once(tmp_path):
    items = _items(5)
    out = tmp_path / "out"
    for k in range(2):
        execute(against_folder(plan_of(items, out)), FakeEngine(), share=Shard(k, 2))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["item_id"], r["result_index"]) for r in rows) == sorted(
        {(r["item_id"], r["result_index"]) for r in rows}) and len(rows) == 10


def test_status_shows_every_running_shard_with_its_progress_and_what_is_merged(tmp_path):
    items = _items(5)
    out = tmp_path / "out"

    class StopAfterFirstBatch(FakeEngine):
        def generate_batch(self, request):
            stop.request()
            return super().generate_batch(request)

    stop = StopRequest()
    first = execute(against_folder(plan_of(items, out)), StopAfterFirstBatch(), share=Shard(0, 2), stop=stop).rendered
    with Shard(0, 2).lock(out, "run-zero") as zero, Shard(1, 2).lock(out, "run-one") as one:
        zero.progress = {"to_render": 6, "batches": 2, "batches_done": 1, "rendered": 4, "failed": 0}
        one.progress = {"stage": "canary"}
        zero.beat(), one.beat()
        result = CliRunner().invoke(cli, ["status", str(out)])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        shown = [line for line in lines if line.startswith("  shard ")]
        assert len(shown) == 2, result.output
        assert shown[0].startswith("  shard 0/2 running: run run-zero (pid ") and shown[0].endswith(
            f"heartbeat 0s ago: 4/6 rendered, 0 failed, batch 1/2; {first} result(s) in its manifest, all merged")
        assert shown[1].startswith("  shard 1/2 running: run run-one (pid ") and shown[1].endswith(
            "checking the canary (or waiting for the shard that checks it); nothing rendered yet; "
            "0 result(s) in its manifest, all merged")
        assert "not rendered yet (the shard runs in progress render them)" in lines[0]

        conn = sqlite3.connect(Shard(0, 2).db_path(out))  # the shard records two more after the fold
        conn.execute("UPDATE results SET updated_at = updated_at + 1 WHERE rowid IN "
                     "(SELECT rowid FROM results LIMIT 2)")
        conn.commit()
        conn.close()
        with Manifest(out, create=False) as manifest:
            report = status_report(manifest)
    assert [(s["shard"], s["state"], s["results"], s["unmerged"]) for s in report["shards"]] == [
        ("0/2", "running", first, 2), ("1/2", "running", 0, 0)]
    assert report["shards"][1]["progress"] == {"stage": "canary"} and report["shards"][0]["heartbeat_age_s"] < 5
    assert report["counts"] == {"ok": first} and report["not_rendered"] == 10 - first
    after = CliRunner().invoke(cli, ["status", str(out), "--json"])  # no process holds them: folded, gone
    assert json.loads(after.output)["shards"] == [] and shard_files(out) == []


def test_the_watermark_waits_for_a_shard_that_did_not_complete_its_share(tmp_path, engine):
    recipe = write_recipe(tmp_path)
    write_rows(tmp_path, [(f"S{i}", f"product {i}") for i in range(6)])
    out = tmp_path / "out" / "nightly"
    assert run(recipe, shard="0/2", max_batch=2) == 0
    assert run_command(str(recipe), None, [], 1, False, 2, shard="1/2") == 0  # --limit 1: part of its share
    fold_shards(out)
    with Manifest(out) as manifest:
        assert manifest.watermarks() == {}  # shard 1 did not complete: every row is still new
        assert 0 < manifest.counts()["ok"] < 6
    assert run(recipe, shard="1/2", max_batch=2) == 0  # the rest of its share
    with Manifest(out) as manifest:
        assert set(manifest.watermarks()["products"]["entries"]) == {f"S{i}" for i in range(6)}
    assert sorted(engine) == sorted(f"photo of product {i}" for i in range(6))  # each row once
