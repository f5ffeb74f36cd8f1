"""Runs keep no delivery secret in what they write (issue 18 item 15), and refuse internal
destinations unless allowed (item 4): a presigned upload's signature, a webhook's token or secret
path, and the dataset value that carried them reach neither the manifest, manifest.jsonl nor the
image files; the URLs as given live only in OUT/.flowgen/sink-urls.sqlite (0600) until sent.

Receivers are pytest-httpserver on loopback (allowed per test); the engine is FakeEngine.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from werkzeug import Response

from flowgen.delivery.http import RetryPolicy
from flowgen.delivery.sink_urls import FILE_NAME
from flowgen.net import ALLOW_ENV
from flowgen.recipe.api import Item
from flowgen.run.deliver import resend
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import STATE_DIR, Manifest
from tests.workflow.direct_runs import item, plan_of

FAST = {"policy": RetryPolicy(max_attempts=2, base_delay_s=0.0, timeout_s=2.0, sleep=lambda s: None)}
SIGNATURE, TOKEN, HOOK_PATH_SECRET = "UPLOADSIG0123456789", "HOOKTOKEN0123456789", "T00SECRETPATH0123456789"


def files_holding(folder: Path, *secrets: str) -> list[str]:
    """Every file under `folder` (database, its WAL, images, jsonl) whose bytes hold a secret."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets))


def deliveries(out) -> dict[str, dict]:
    with Manifest(out) as manifest:
        return {d["sink"]: d for d in manifest.deliveries()}


def test_no_signature_or_webhook_secret_is_written_outside_the_0600_sink_url_file(tmp_path, httpserver):
    puts, hooks = [], []
    httpserver.expect_request("/bucket/a_0.png", method="PUT").respond_with_handler(
        lambda r: puts.append(r.args.get("X-Amz-Signature")) or Response("", status=200))
    # the webhook is down at first: its URL must survive the run for redeliver
    httpserver.expect_request(f"/hooks/{HOOK_PATH_SECRET}", method="POST").respond_with_handler(
        lambda r: hooks.append(r.args.get("token")) or Response("down", status=503))
    upload = httpserver.url_for("/bucket/") + "{filename}?X-Amz-Signature=" + SIGNATURE + "&X-Amz-Expires=600"
    hook = httpserver.url_for(f"/hooks/{HOOK_PATH_SECRET}") + "?token=" + TOKEN
    task = item("a").task
    # the per-item presigned URL comes from a dataset column, as it must (one signature per object)
    items = [Item(key="a", values={"upload_url": upload, "sku": "a"},
                  task={**task, "uploadEndpoint": upload.replace("{filename}", "a_0.png"), "webhookURL": hook})]
    out = tmp_path / "out"
    summary = execute(against_folder(plan_of(items, out)), FakeEngine(), delivery_options=FAST)
    assert summary.deliveries == {"ok": 1, "failed": 1, "withheld": 0}
    assert puts == [SIGNATURE] and hooks == [TOKEN, TOKEN]  # sent exactly as given

    side = out / STATE_DIR / FILE_NAME
    assert files_holding(out, SIGNATURE, TOKEN, HOOK_PATH_SECRET) == [f"{STATE_DIR}/{FILE_NAME}"]
    assert stat.S_IMODE(side.stat().st_mode) == 0o600
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["params"]["uploadEndpoint"] == httpserver.url_for("/bucket/a_0.png")
    assert row["params"]["webhookURL"] == f"http://{httpserver.host}:{httpserver.port}/..."
    assert row["values"] == {"upload_url": httpserver.url_for("/bucket/") + "{filename}", "sku": "a"}
    state = deliveries(out)
    assert state["upload"]["url"] == httpserver.url_for("/bucket/a_0.png") and state["webhook"]["state"] == "failed"
    assert state["webhook"]["target"] == f"http://{httpserver.host}:{httpserver.port}/..."

    # redeliver has what it needs from the side file; once everything went through, it is forgotten
    httpserver.clear()
    httpserver.expect_request(f"/hooks/{HOOK_PATH_SECRET}", method="POST").respond_with_handler(
        lambda r: hooks.append(r.args.get("token")) or Response("ok", status=200))
    with Manifest(out) as manifest:
        counts = resend(manifest, "redeliver-1", out, ("failed",), **FAST)
        manifest.export_jsonl()
    assert counts["ok"] == 1 and hooks[-1] == TOKEN
    assert files_holding(out, SIGNATURE, TOKEN, HOOK_PATH_SECRET) == []


def test_runs_refuse_internal_destinations_unless_allowed_and_redeliver_sends_them_once_allowed(
        tmp_path, httpserver, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    out = tmp_path / "out"
    summary = execute(against_folder(plan_of([item("a", webhookURL=httpserver.url_for("/hook"))], out)), FakeEngine(),
                      delivery_options=FAST)
    assert summary.deliveries["failed"] == 1 and httpserver.log == []
    webhook = deliveries(out)["webhook"]
    assert webhook["attempts"] == 1 and webhook["error"].startswith(f"{httpserver.host}: no public address to connect to")
    assert ALLOW_ENV in webhook["error"]

    monkeypatch.setenv(ALLOW_ENV, httpserver.host)
    with Manifest(out) as manifest:
        assert resend(manifest, "redeliver-1", out, ("failed",), **FAST)["ok"] == 1
    assert len(httpserver.log) == 1 and deliveries(out)["webhook"]["state"] == "ok"


def test_a_bad_allow_list_entry_stops_the_run_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "10.0.0.0/8, not a host")
    from flowgen.errors import FlowgenError

    with pytest.raises(FlowgenError) as err:
        execute(against_folder(plan_of([item("a", webhookURL="https://hooks.example/x")], tmp_path / "out")), FakeEngine(),
                delivery_options=FAST)
    assert "FLOWGEN_ALLOW_HOSTS: 'not a host' is not a host name" in str(err.value)
    assert "\n" not in str(err.value)
