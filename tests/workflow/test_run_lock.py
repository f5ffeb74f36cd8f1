"""One run per output folder: a second run is refused, a run killed with -9 is detected and taken over,
and a run recorded as ended lets the next one start at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from flowgen.commands.status import status_report
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.lock import FolderBusy, RunLock, folder_state, lock_path
from flowgen.run.manifest import Manifest, manifest_path
from flowgen.run.merge import fold_shards
from flowgen.run.shards import Shard
from tests.workflow.direct_runs import item, plan_of


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with RunLock(out, "run-A"):
        assert folder_state(out)[0] == "running"
        with pytest.raises(FolderBusy) as err:
            execute(against_folder(plan_of([item("k0")], out)), FakeEngine())
        message = str(err.value)
        assert "run-A" in message and f"pid {os.getpid()}" in message and "\n" not in message
        assert not (out / "img").exists()  # nothing rendered by the refused run
    assert folder_state(out)[0] == "idle"
    summary = execute(against_folder(plan_of([item("k0")], out)), FakeEngine())  # free again
    assert summary.rendered == 1


def test_the_heartbeat_moves_while_held_and_a_stopped_one_reads_stale(tmp_path):
    out = tmp_path / "out"
    with RunLock(out, "run-B", heartbeat_seconds=0.05):
        first = json.loads(lock_path(out).read_bytes())["heartbeat_at"]
        time.sleep(0.3)
        state, holder = folder_state(out)
        assert state == "running" and holder.heartbeat_at > first and holder.run_id == "run-B"
        assert folder_state(out, now=holder.heartbeat_at + 3600)[0] == "stale"


HOLD_AND_HANG = textwrap.dedent("""
    import sys, time
    from flowgen.run.lock import RunLock
    from flowgen.run.manifest import Manifest
    out = sys.argv[1]
    with RunLock(out, "run-killed"), Manifest(out) as manifest:
        manifest.start_run("run-killed", "r", "h", "p")
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_run_killed_with_minus_9_reads_died_and_the_next_run_takes_over(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AND_HANG, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "held"
        assert folder_state(out)[0] == "running"
        with pytest.raises(FolderBusy):
            execute(against_folder(plan_of([item("k0")], out)), FakeEngine())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with Manifest(out) as manifest:
        report = status_report(manifest)
    assert report["state"] == "idle" and report["last_run"]["status"] == "died"
    summary = execute(against_folder(plan_of([item("k0")], out)), FakeEngine())
    assert summary.rendered == 1 and summary.died_runs == ["run-killed"]
    with Manifest(out) as manifest:
        statuses = {run["run_id"]: run["status"] for run in manifest.runs()}
    assert statuses["run-killed"] == "died" and statuses[summary.run_id] == "ok"


@pytest.mark.parametrize("share", [None, Shard(0, 1)], ids=["plain run", "shard"])
def test_a_client_that_sees_the_run_ok_can_start_the_next_run_at_once(tmp_path, monkeypatch, share):
    """The run records its end a moment before it lets go of the folder (it still exports
    manifest.jsonl, here slowed down): a client that reads `ok` then starts the next run at once."""
    out = tmp_path / "out"
    export = Manifest.export_jsonl
    client: dict = {}

    def next_run():  # a client polling status, then starting the next run the moment it reads ok
        fold_shards(out)
        with Manifest(out, create=False) as manifest:
            client["report"] = status_report(manifest)
        try:
            client["next"] = execute(against_folder(plan_of([item("k0")], out)), FakeEngine(), share=share).unchanged
        except FolderBusy as err:
            client["next"] = str(err)

    def slow_export(manifest):
        if "thread" not in client and manifest.path == manifest_path(out):  # the first run's end: recorded
            client["thread"] = threading.Thread(target=next_run)
            client["thread"].start()
            time.sleep(1.0)  # longer than a start's retries (0.3 s)
        return export(manifest)

    monkeypatch.setattr(Manifest, "export_jsonl", slow_export)
    execute(against_folder(plan_of([item("k0")], out)), FakeEngine(), share=share)
    client["thread"].join(30)
    report = client["report"]
    assert report["last_run"]["status"] == "ok" and report["state"] == "idle"
    assert client["next"] == 1  # the next run took the folder (its one result unchanged), not refused
