"""Operating runs: a detached run polled to completion, ttl expiry with `gc`, `redeliver` from the
command line, and the plan's cost estimate."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from flowgen.cli import main as cli
from flowgen.commands.deliveries import gc_command
from flowgen.commands.status import status_report
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import Manifest
from tests.workflow.direct_runs import FAST, deliveries, item, plan_of

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=flux2-klein-tiny", "task.width=128", "task.height=128", "task.steps=1", "task.numberResults=2"]


@pytest.mark.slow
def test_a_detached_run_returns_its_id_at_once_and_status_shows_it_to_completion(tmp_path):
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    out = tmp_path / "out"
    args = ["run", str(tmp_path / "quickstart.yaml"), "--out", str(out), "--detach"] + [a for s in TINY for a in ("--set", s)]
    started = time.monotonic()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[0]
    assert time.monotonic() - started < 30  # it returned before rendering (loading JAX alone takes longer)
    seen_states = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # bounded polling, as a client of deliveryMethod async would
        status = CliRunner().invoke(cli, ["status", str(out), "--json"])
        if status.exit_code == 0:
            report = json.loads(status.stdout)
            seen_states.add(report["state"])
            last = report["last_run"]
            if last and last["run_id"] == run_id and last["status"] not in ("starting", "running"):
                break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the detached run did not finish; log: {list((out / '.flowgen' / 'logs').glob('*'))}")
    assert last["status"] == "ok" and report["counts"] == {"ok": 8}  # 4 items x 2
    assert "running" in seen_states  # status saw it while it rendered (compiling alone takes seconds)
    assert (out / ".flowgen" / "logs" / f"{run_id}.log").exists()
    # started the moment `ok` is read: the detached process may still be letting go of the folder (run/lock.py)
    again = CliRunner().invoke(cli, ["run", str(tmp_path / "quickstart.yaml"), "--out", str(out)]
                               + [a for s in TINY for a in ("--set", s)])
    assert again.exit_code == 0 and "0 rendered, 8 unchanged" in again.stdout


def test_gc_removes_url_results_past_their_ttl_and_a_rerun_leaves_them_gone(tmp_path):
    out = tmp_path / "out"
    items = [item("short", ttl=60), item("long", ttl=86400), item("kept"), item("b64", ttl=None, outputType="base64Data")]
    execute(against_folder(plan_of(items, out)), FakeEngine())
    with Manifest(out) as manifest:
        files = {r["item_key"]: out / r["output"]["path"] for r in manifest.records()}
    gc_command(str(out), dry_run=True, now=time.time() + 120)
    assert all(path.exists() for path in files.values())  # a dry run removes nothing
    gc_command(str(out), dry_run=False, now=time.time() + 120)
    assert not files["short"].exists() and files["long"].exists() and files["kept"].exists()
    with Manifest(out) as manifest:
        report = status_report(manifest)
    assert report["expired"] == 1 and not report["missing_outputs"]
    rerun = execute(against_folder(plan_of(items, out)), FakeEngine())
    assert rerun.rendered == 0 and not files["short"].exists()  # expired stays expired
    changed = [item("short", ttl=60, steps=3)] + items[1:]
    assert execute(against_folder(plan_of(changed, out)), FakeEngine()).rendered == 1 and files["short"].exists()  # a change renders again


def test_redeliver_from_the_command_line_sends_what_failed(tmp_path, httpserver):
    httpserver.expect_request("/hook").respond_with_data("no", status=500)
    out = tmp_path / "out"
    execute(against_folder(plan_of([item("k0", webhookURL=httpserver.url_for("/hook"))], out)), FakeEngine(), delivery_options=FAST)
    assert {d["state"] for d in deliveries(out).values()} == {"failed"}
    httpserver.clear()
    httpserver.expect_request("/hook").respond_with_data("ok")
    result = CliRunner().invoke(cli, ["redeliver", str(out)])
    assert result.exit_code == 0 and "1 delivered, 0 failed again" in result.stdout
    assert len(httpserver.log) == 1 and {d["state"] for d in deliveries(out).values()} == {"ok"}
    status = CliRunner().invoke(cli, ["status", str(out)])
    assert "deliveries: 1 ok" in status.stdout


def test_plan_estimates_cost_from_what_earlier_runs_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGEN_COST_PER_DEVICE_SECOND", "0.01")
    recipe = {"version": 1, "name": "c", "model": "flux2-klein-tiny", "seed": 1,
              "datasets": {"n": {"values": ["a", "b", "c", "d"]}}, "matrix": {"n": "n"},
              "task": {"positivePrompt": "a {n}", "width": 128, "height": 128, "steps": 1}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    first = CliRunner().invoke(cli, ["plan", str(path), "--out", str(out), "--json"])
    assert json.loads(first.stdout)["cost"]["results_without_estimate"] == 4  # nothing measured yet
    from flowgen.plan.from_recipe import plan_recipe

    plan = plan_recipe(str(path), str(out), ["datasets.n.values=[a, b]"])
    execute(against_folder(plan), FakeEngine(delay_per_image=0.05))
    with Manifest(out) as manifest:
        per_image = [r["timings"]["engine_per_image"] for r in manifest.records()]
    report = json.loads(CliRunner().invoke(cli, ["plan", str(path), "--out", str(out), "--json"]).stdout)
    estimate = report["cost"]
    assert estimate["results_without_estimate"] == 0 and report["counts"]["to_run"] == 2
    expected = sorted(per_image)[len(per_image) // 2 - 1:len(per_image) // 2 + 1]
    assert abs(estimate["engine_seconds"] - 2 * sum(expected) / len(expected)) < 1e-3
    assert abs(estimate["usd"] - estimate["engine_seconds"] * 0.01) < 1e-5  # engine_seconds is shown to 1 ms
