"""`flowgen run` and the commands around it when things go wrong (issue 18): a crash is recorded as a
failed run with its traceback logged, a corrupt manifest or a full disk is one `error:` line, a
detached run is refused before detaching and its death recorded, symlinked folders never lead
outside OUT, killed runs' temp files are cleaned, hints keep their options, and exit codes say
what happened."""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flowgen.cli import main
from flowgen.commands import run as run_module
from flowgen.commands.status import status_report
from flowgen.run import render  # where the executor encodes (flowgen.run.render.finish_image)
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.lock import RunLock
from flowgen.run.manifest import Manifest, manifest_path
from flowgen.run.progress import PlainProgress
from tests.workflow.direct_runs import FAST, item, plan_of

ROOT = Path(__file__).resolve().parents[2]


class CliFakeEngine(FakeEngine):
    """FakeEngine in PipelineEngine's place (same constructor), so `flowgen run` renders in milliseconds."""

    load_seconds = 0.0

    def __init__(self, model=None, dtype="float32"):
        super().__init__(dtype=dtype)


@pytest.fixture
def fake_engine(monkeypatch):
    monkeypatch.setattr(run_module, "PipelineEngine", CliFakeEngine)


def write_recipe(folder: Path, things=("a", "b", "c"), task_extra: str = "", name: str = "recipe.yaml",
                 filename: str = "{thing}_{result}.{ext}") -> Path:
    path = folder / name
    path.write_text(f"""version: 1
name: hardening
model: flux2-klein-tiny
seed: 1
datasets:
  things: {{values: [{', '.join(things)}]}}
matrix: {{thing: things}}
task: {{positivePrompt: "a photo of {{thing}}", width: 128, height: 128, steps: 1, outputFormat: PNG{task_extra}}}
output: {{dir: out, filename: "{filename}"}}
""")
    return path


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def images(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png") if ".flowgen" not in p.parts)


def status_json(out: Path) -> dict:
    result = cli("status", out, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- 11: a crash in the batch loop ---------------------------------------------------------------


def test_a_crash_is_recorded_failed_with_its_reason_logged_and_leaves_no_unrecorded_image(tmp_path, fake_engine,
                                                                                          monkeypatch):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    real_encode = render.encode_image
    calls = []

    def encode_then_crash(*args, **kwargs):  # the first image is written, the second one crashes the loop
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("embedded null byte")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(render, "encode_image", encode_then_crash)
    result = cli("run", recipe)

    assert result.exit_code == 70, result.output
    assert "Traceback" not in result.output
    [line] = error_lines(result)
    run_id = status_json(out)["last_run"]["run_id"]
    log = out / ".flowgen" / "logs" / f"{run_id}.log"
    assert "crashed: ValueError: embedded null byte" in line and str(log) in line
    assert "Traceback" in log.read_text() and "embedded null byte" in log.read_text()
    assert images(out) == []  # the image written before the crash had no row: removed
    report = status_json(out)
    assert report["last_run"]["status"] == "failed" and report["counts"] == {}
    assert report["last_run"]["summary"]["error"] == "ValueError: embedded null byte"
    shown = cli("status", out).stdout
    assert f"last run {run_id} (hardening): failed: ValueError: embedded null byte (log: {log})" in shown

    monkeypatch.setattr(render, "encode_image", real_encode)
    again = cli("run", recipe)
    assert again.exit_code == 0 and "3 rendered" in again.stdout and len(images(out)) == 3


def test_a_second_ctrl_c_mid_batch_is_recorded_interrupted_and_its_images_removed(tmp_path, monkeypatch):
    real_encode = render.encode_image
    calls = []

    def encode_then_abort(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(render, "encode_image", encode_then_abort)
    with pytest.raises(KeyboardInterrupt):
        execute(against_folder(plan_of([item("a"), item("b"), item("c")], tmp_path)), FakeEngine())
    with Manifest(tmp_path) as manifest:
        assert manifest.runs()[-1]["status"] == "interrupted" and list(manifest.records()) == []
    assert images(tmp_path) == []


# --- 16: a corrupt manifest, a full disk ---------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database " * 64)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"\0" * 512 + data[4608:8192])  # header intact, pages gone


@pytest.mark.parametrize("damage", [_garbage, _truncated], ids=["garbage", "truncated"])
@pytest.mark.parametrize("command", ["run", "plan", "status", "redeliver", "prune", "gc"])
def test_a_corrupt_manifest_is_one_error_line_naming_it_and_stays_as_it_was(tmp_path, fake_engine, command, damage):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    assert cli("run", recipe).exit_code == 0
    database = manifest_path(out)
    for leftover in database.parent.glob("manifest.sqlite-*"):
        leftover.unlink()
    damage(database)
    before = database.read_bytes()
    args = {"run": ["run", recipe], "plan": ["plan", recipe], "status": ["status", out], "redeliver": ["redeliver", out],
            "prune": ["prune", out, "--recipe", recipe, "--yes"], "gc": ["gc", out]}[command]

    result = cli(*args)

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    [line] = error_lines(result)
    assert str(database) in line and ("not a readable flowgen manifest" in line or "cannot use" in line), line
    assert database.read_bytes() == before
    assert len(images(out)) == 3  # no image removed or added


def test_a_full_disk_while_writing_an_image_is_one_line_and_keeps_what_was_recorded(tmp_path, fake_engine, monkeypatch):
    recipe = write_recipe(tmp_path, things=("a", "b"))
    out = tmp_path / "out"
    assert cli("run", recipe).exit_code == 0
    export = (out / "manifest.jsonl").read_bytes()
    write_recipe(tmp_path, things=("a", "b", "c", "d"))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # every atomic write (images, manifest.jsonl) fails
    result = cli("run", recipe)
    monkeypatch.undo()

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "During handling" not in result.output
    [line] = error_lines(result)
    assert "the disk is full" in line and re.search(r"out/(c|d)_0\.png", line), line
    assert images(out) == ["a_0.png", "b_0.png"] and not list(out.glob(".*.tmp"))
    assert (out / "manifest.jsonl").read_bytes() == export
    with Manifest(out) as manifest:
        assert sorted(r["item_key"] for r in manifest.records()) == ["thing=a", "thing=b"]
        last = manifest.runs()[-1]
    assert last["status"] == "failed" and "the disk is full" in last["summary"]["error"]


def test_status_on_a_full_disk_still_shows_the_folder_and_notes_the_export_it_could_not_refresh(tmp_path, monkeypatch):
    out = tmp_path / "out"
    execute(against_folder(plan_of([item("a")], out)), FakeEngine())
    export = (out / "manifest.jsonl").read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    result = cli("status", out)
    monkeypatch.undo()

    assert result.exit_code == 0, result.output
    assert f"{out}: 1 planned: 1 ok" in result.stdout and "Traceback" not in result.output
    assert result.stderr.startswith("note: manifest.jsonl was not refreshed: ") and "the disk is full" in result.stderr
    assert (out / "manifest.jsonl").read_bytes() == export and not list(out.glob(".*.tmp"))


def test_a_full_database_is_one_line_and_its_rows_stay_as_they_were(tmp_path, monkeypatch):
    out = tmp_path / "out"
    execute(against_folder(plan_of([item("a"), item("b")], out)), FakeEngine())
    before = sorted(json.dumps(r, sort_keys=True) for r in Manifest(out).records())
    real_connect = sqlite3.connect

    class FullDisk(sqlite3.Connection):  # SQLite's own "database or disk is full": no page can be added
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pages = self.execute("PRAGMA page_count").fetchone()[0]
            self.execute(f"PRAGMA max_page_count = {pages}")

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=FullDisk, **k))
    bigger = [item("a"), item("b"), item("c", width=128), item("d", steps=3), item("e", height=128)]
    with pytest.raises(Exception) as raised:
        execute(against_folder(plan_of(bigger, out)), FakeEngine())
    monkeypatch.undo()

    assert type(raised.value).__name__ == "StorageError" and raised.value.exit_code == 2
    message = str(raised.value)
    assert str(manifest_path(out)) in message and "the disk is full" in message and "\n" not in message
    assert raised.value.__suppress_context__  # no chained traceback behind it
    assert sorted(json.dumps(r, sort_keys=True) for r in Manifest(out).records()) == before
    assert images(out) == ["img/a_0.png", "img/b_0.png"]  # the images it could not record: removed


# --- 14: --detach --------------------------------------------------------------------------------


REAL_MODEL = "runware:400@6"


def test_detach_refuses_missing_weights_before_detaching(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("flux2-klein-tiny", REAL_MODEL))
    spawned = []
    monkeypatch.setattr(run_module.subprocess, "Popen", lambda *a, **k: spawned.append(a))

    result = cli("run", recipe, "--detach")

    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert "hf download" in line and result.stdout.strip() == "" and spawned == []
    assert not (tmp_path / "out").exists()  # nothing behind: no manifest, no log


def test_a_detached_run_whose_process_dies_at_once_reads_died_in_status(tmp_path, fake_engine, monkeypatch):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    assert cli("run", recipe, "--limit", "1").exit_code == 0  # an earlier run that was fine
    monkeypatch.setattr(run_module, "child_args", lambda *a, **k: [sys.executable, "-c", "import sys; sys.exit(3)"])

    result = cli("run", recipe, "--detach")

    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    pid = status_json(out)["last_run"]["summary"]["pid"]
    try:
        os.waitpid(pid, 0)  # reaped, as it is once `flowgen run --detach` has exited
    except ChildProcessError:
        pass  # already reaped: subprocess reaps a dropped Popen's child when any later Popen starts
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        last = status_json(out)["last_run"]
        if last["status"] != "starting":
            break
        time.sleep(0.1)
    assert last["run_id"] == run_id and last["status"] == "died", last
    assert "ended before the run started" in last["summary"]["error"]
    assert str(out / ".flowgen" / "logs" / f"{run_id}.log") == last["summary"]["log"]
    assert "not rendered yet (flowgen run" in cli("status", out).stdout
    after = cli("run", recipe)  # the next run records the death for good
    assert after.exit_code == 0
    with Manifest(out) as manifest:
        assert {r["run_id"]: r["status"] for r in manifest.runs()}[run_id] == "died"


def test_a_detached_run_refused_in_its_process_records_why(tmp_path, fake_engine, monkeypatch):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    spawned = []

    class Child:
        pid = os.getpid()  # alive: status waits for it to start

    monkeypatch.setattr(run_module.subprocess, "Popen", lambda args, **k: spawned.append(args) or Child())
    result = cli("run", recipe, "--detach")
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    assert status_json(out)["last_run"]["status"] == "starting"
    [args] = spawned
    assert args[args.index("--run-id") + 1] == run_id and "--out-from-recipe" in args  # the user gave no --out

    with RunLock(out, "someone-else"):  # the background process finds the folder taken
        child = cli(*args[3:])
    assert child.exit_code == 2
    last = status_json(out)["last_run"]
    assert last["run_id"] == run_id and last["status"] == "failed" and "someone-else" in last["summary"]["error"]
    assert f"last run {run_id} (hardening): failed: " in cli("status", out).stdout


# --- 17: symlinked folders inside OUT ------------------------------------------------------------


def test_a_symlinked_folder_inside_out_is_never_written_through(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "img").symlink_to(elsewhere, target_is_directory=True)

    summary = execute(against_folder(plan_of([item("a"), item("b")], out)), FakeEngine())

    assert (summary.rendered, summary.failed) == (0, 2)
    assert list(elsewhere.iterdir()) == []
    assert all("is outside the output folder" in error and str(elsewhere) in error for _, _, error in summary.failures)


def _moved_behind_a_symlink(out: Path, elsewhere: Path) -> None:
    """OUT/img moved away, a symlink to it in its place: the manifest's paths now lead outside OUT."""
    (out / "img").rename(elsewhere)
    (out / "img").symlink_to(elsewhere, target_is_directory=True)


def test_prune_leaves_a_file_behind_a_symlinked_folder_in_place_and_says_so(tmp_path, fake_engine):
    recipe = write_recipe(tmp_path, things=("a", "b"), filename="img/{thing}_{result}.{ext}")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert cli("run", recipe).exit_code == 0
    _moved_behind_a_symlink(out, elsewhere)
    write_recipe(tmp_path, things=("a",), filename="img/{thing}_{result}.{ext}")

    pruned = cli("prune", out, "--yes")

    assert pruned.exit_code == 0, pruned.output
    assert (elsewhere / "b_0.png").exists()
    assert "removed the row of" in pruned.stdout and "its file was left in place" in pruned.stdout
    assert not re.search(r"^removed \S+ thing=b \(img/b_0.png\)$", pruned.stdout, re.MULTILINE)
    assert "0 of their files (1 left in place, listed above)" in pruned.stdout
    with Manifest(out) as manifest:
        assert [r["item_key"] for r in manifest.records()] == ["thing=a"]


def test_gc_leaves_a_file_behind_a_symlinked_folder_in_place(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    execute(against_folder(plan_of([item("short", ttl=60)], out)), FakeEngine())
    _moved_behind_a_symlink(out, elsewhere)

    from flowgen.commands.deliveries import gc_command

    gc_command(str(out), dry_run=False, now=time.time() + 120)

    assert (elsewhere / "short_0.png").exists()
    with Manifest(out) as manifest:
        assert status_report(manifest)["expired"] == 0


# --- 18: temp files of killed runs ---------------------------------------------------------------


def test_the_next_run_removes_temp_files_of_dead_processes_only(tmp_path):
    out = tmp_path / "out"
    execute(against_folder(plan_of([item("a")], out)), FakeEngine())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [out / "img" / f".b_0.png.{dead_pid}.tmp", out / f".manifest.jsonl.{dead_pid}.tmp"]
        kept = out / "img" / f".c_0.png.{live.pid}.tmp"
        for path in stale + [kept]:
            path.write_bytes(b"half an image")
        summary = execute(against_folder(plan_of([item("a"), item("b")], out)), FakeEngine())
        assert summary.rendered == 1
        assert not any(path.exists() for path in stale) and kept.exists()
    finally:
        live.kill()
        live.wait(timeout=30)


# --- 19: hints keep their options --------------------------------------------------------------


def test_hints_keep_the_options_that_matter(tmp_path, fake_engine):
    recipe = write_recipe(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    assert cli("run", recipe, "--out", elsewhere, "--limit", "1").exit_code == 0
    shown = cli("status", elsewhere).stdout
    assert f"2 not rendered yet (flowgen run {recipe} --out {elsewhere} renders them)" in shown

    other = write_recipe(tmp_path, things=("b",), name="other.yaml")
    listed = cli("prune", elsewhere, "--recipe", other)
    assert listed.exit_code == 0, listed.output
    assert f"`flowgen prune {elsewhere} --yes --recipe {other}` removes" in listed.stdout
    planned = cli("plan", other, "--out", elsewhere)
    assert f"flowgen prune {elsewhere} --recipe {other} removes" in planned.stdout


def test_status_does_not_suggest_running_again_while_a_run_is_in_progress(tmp_path):
    out = tmp_path / "out"
    plan = plan_of([item("a"), item("b")], out)
    with RunLock(out, "run-now") as lock, Manifest(out) as manifest:
        manifest.record_plan([r.rid for r in plan.results], (), {"path": str(tmp_path / "r.yaml"), "overrides": []})
        manifest.start_run("run-now", "r", "h", "p")
        lock.progress = {"to_render": 2, "batches": 1, "batches_done": 0, "rendered": 0, "failed": 0}
        lock.beat()
        shown = cli("status", out).stdout
    assert "2 not rendered yet (the run in progress renders them)" in shown and "flowgen run" not in shown


# --- 20: every item needs one missing input ----------------------------------------------------


def test_a_missing_input_every_item_needs_is_refused_before_rendering(tmp_path, fake_engine):
    recipe = write_recipe(tmp_path, task_extra=", inputs: {referenceImages: [missing.png]}")

    result = cli("run", recipe)

    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert "missing.png" in line and "every item of the recipe needs it (3 item(s)), so nothing was run" in line
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- 24: --require-delivery ----------------------------------------------------------------------


def test_require_delivery_makes_a_run_whose_deliveries_gave_up_exit_3(tmp_path, fake_engine, monkeypatch, httpserver):
    httpserver.expect_request("/hook").respond_with_data("down", status=500)
    monkeypatch.setattr(run_module, "execute", functools.partial(execute, delivery_options=FAST))
    recipe = write_recipe(tmp_path, things=("a",), task_extra=f", webhookURL: '{httpserver.url_for('/hook')}'")

    plain = cli("run", recipe)
    assert plain.exit_code == 0 and "deliveries: 0 ok, 1 failed" in plain.stdout
    (tmp_path / "out" / "a_0.png").unlink()  # rendered again, delivered again
    strict = cli("run", recipe, "--require-delivery")
    assert strict.exit_code == 3, strict.output
    assert error_lines(strict) == ["error: 1 delivery(ies) gave up (--require-delivery: exit 3)"]
    assert "--require-delivery" in cli("run", "--help").stdout


# --- 25: the progress line and the summary agree ----------------------------------------------


def test_the_progress_line_counts_the_results_set_aside(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    good = tmp_path / "good.png"
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(good)
    stream = io.StringIO()
    items = [item("a"), item("b", refs=(bad,)), item("c"), item("d")]
    summary = execute(against_folder(plan_of(items, tmp_path / "out")), FakeEngine(), progress=PlainProgress(stream))
    assert (summary.rendered, summary.failed) == (3, 1)
    last = stream.getvalue().strip().splitlines()[-1]
    assert last.startswith("[3/3]") and last.endswith(", 1 failed"), stream.getvalue()


# --- docs: run's exit codes ----------------------------------------------------------------------


def test_run_exit_codes_agree_in_help_docs_and_readme():
    help_text = cli("run", "--help").stdout
    codes = re.findall(r"^\s+(\d+)\s", help_text.split("Exit codes:")[1], re.MULTILINE)
    assert codes == ["0", "1", "2", "3", "70", "130"]
    docs = (ROOT / "docs" / "cli.md").read_text()
    run_section = docs.split("## `flowgen run`")[1].split("\n## ")[0]
    table = docs.split("## Exit codes")[1].split("\n## ")[0]
    readme = (ROOT / "README.md").read_text()
    for code in codes:
        assert re.search(rf"\b{code}\b", run_section.split("Exit codes")[1]), code
        assert re.search(rf"^\| {code} \|", table, re.MULTILINE), code
        assert re.search(rf"\b{code}: ", readme), code
