"""The executor on the FakeEngine: skip-if-unchanged, failure isolation, fail-fast, limit, stop, regen."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.interrupt import StopRequest
from flowgen.run.manifest import Manifest
from flowgen.run.outputs import read_metadata
from flowgen.run.regen import regenerate, resolve_targets
from tests.workflow.direct_runs import item, plan_of, reference


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_run_writes_images_and_manifest_then_rerun_skips_everything(tmp_path):
    out = tmp_path / "out"
    items = [item(f"k{i}", numberResults=2, outputFormat=fmt) for i, fmt in enumerate(["PNG", "JPG", "WEBP"])]
    engine = FakeEngine()
    summary = execute(against_folder(plan_of(items, out)), engine)
    assert (summary.rendered, summary.failed, summary.exit_code) == (6, 0, 0)
    assert [len(c.prompts) for c in engine.calls] == [4, 2]  # 6 results of one signature: batches of 4 and 2
    with Manifest(out) as manifest:
        records = list(manifest.records())
    assert len(records) == 6
    for rec in records:
        path = out / rec["output"]["path"]
        assert sha(path) == rec["output"]["sha256"] and rec["status"] == "ok"
        assert read_metadata(path)["item_id"] == rec["item_id"]
        assert rec["params"]["positivePrompt"] == f"prompt {rec['item_key']}" and rec["batch"]["size"] in (4, 2)
        assert rec["engine"]["engine"] == "fake" and rec["model"]["identity"] == {"m": 1}
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6

    again = FakeEngine()
    summary = execute(against_folder(plan_of(items, out)), again)
    assert (summary.rendered, summary.unchanged, again.calls) == (0, 6, [])


def test_changed_item_reruns_alone_and_images_ignore_batch_company(tmp_path):
    out = tmp_path / "out"
    items = [item(f"k{i}") for i in range(5)]
    execute(against_folder(plan_of(items, out)), FakeEngine())
    before = {p.name: sha(p) for p in (out / "img").iterdir()}
    items[2] = item("k2", steps=3)
    engine = FakeEngine()
    summary = execute(against_folder(plan_of(items + [item("k9")], out)), engine)
    assert summary.rendered == 2 and sorted(s for c in engine.calls for s in c.prompts) == ["prompt k2", "prompt k9"]
    after = {p.name: sha(p) for p in (out / "img").iterdir()}
    assert {k: v for k, v in after.items() if k not in ("k2_0.png", "k9_0.png")} == {k: v for k, v in before.items() if k != "k2_0.png"}
    with Manifest(out) as manifest:
        assert len(list(manifest.records())) == 6


def test_unreadable_reference_fails_only_its_item(tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    good = reference(tmp_path)
    items = [item("a", refs=(good,)), item("b", refs=(bad,)), item("c")]
    summary = execute(against_folder(plan_of(items, out)), FakeEngine())
    assert (summary.rendered, summary.failed, summary.exit_code) == (2, 1, 1)
    with Manifest(out) as manifest:
        status = {r["item_key"]: (r["status"], r["error"]) for r in manifest.records()}
    assert status["a"] == ("ok", None) and status["c"] == ("ok", None)
    assert status["b"][0] == "failed" and "bad.png" in status["b"][1]
    # the next run retries only the failed item (and fails it again)
    engine = FakeEngine()
    assert execute(against_folder(plan_of(items, out)), engine).failed == 1 and engine.calls == []


def test_engine_error_fails_the_batch_and_the_run_goes_on(tmp_path):
    class Flaky(FakeEngine):
        def generate_batch(self, request):
            if request.width == 128:
                raise RuntimeError("out of memory\nlong trace")
            return super().generate_batch(request)

    summary = execute(against_folder(plan_of([item("a"), item("b", width=128), item("c")], tmp_path)), Flaky())
    assert (summary.rendered, summary.failed) == (2, 1)
    assert summary.failures == [("b", 0, "engine error: RuntimeError: out of memory")]


def test_fail_fast_stops_and_marks_the_rest_skipped(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    items = [item("a"), item("b", refs=(bad,)), item("c", width=128)]
    engine = FakeEngine()
    summary = execute(against_folder(plan_of(items, tmp_path / "out")), engine, fail_fast=True)
    assert summary.stopped_early and summary.exit_code == 1 and engine.calls == []


def test_fail_fast_after_a_failed_batch(tmp_path):
    ref = reference(tmp_path)
    items = [item("a", width=128), item("b", refs=(ref,)), item("c", height=128)]  # three signatures
    plan = plan_of(items, tmp_path / "out")
    ref.write_bytes(ref.read_bytes()[:60])  # truncated after planning: the decode at run time fails
    summary = execute(against_folder(plan), FakeEngine(), fail_fast=True)
    assert summary.stopped_early and (summary.rendered, summary.failed, summary.not_run) == (1, 1, 1)
    with Manifest(tmp_path / "out") as manifest:
        statuses = {r["item_key"]: r["status"] for r in manifest.records()}
    assert statuses == {"a": "ok", "b": "failed", "c": "skipped"}


def test_limit_and_stop_request(tmp_path):
    out = tmp_path / "out"
    items = [item(f"k{i}", width=64 + 16 * (i % 3)) for i in range(9)]
    summary = execute(against_folder(plan_of(items, out)), FakeEngine(), limit=4)
    assert summary.rendered == 4 and summary.not_run == 5 and summary.exit_code == 0
    stop = StopRequest()
    stop.request()
    summary = execute(against_folder(plan_of(items, out)), FakeEngine(), stop=stop)
    assert summary.interrupted and summary.exit_code == 130 and summary.rendered == 0
    summary = execute(against_folder(plan_of(items, out)), FakeEngine())
    assert (summary.rendered, summary.unchanged) == (5, 4)


def test_regen_matches_recorded_sha_by_id_and_by_file(tmp_path):
    out = tmp_path / "out"
    ref = reference(tmp_path)
    items = [item(f"k{i}", refs=(ref,) if i % 2 else (), CFGScale=2.5, negativePrompt="blur", outputFormat="JPG") for i in range(5)]
    plan = plan_of(items, out)
    execute(against_folder(plan), FakeEngine())
    with Manifest(out) as manifest:
        target = plan.results[3]
        records = resolve_targets(manifest, [target.item.item_id, str(plan.results[0].output_path)])
    assert [(r["item_id"], r["result_index"]) for r in records] == [target.rid, plan.results[0].rid]
    outcomes = regenerate(records, tmp_path / "regen", engine_for=lambda model, dtype: FakeEngine(dtype=dtype))
    assert all(o.matches for o in outcomes), outcomes
    assert outcomes[0].path == tmp_path / "regen" / "img" / "k3_0.jpg"


def test_sigint_stops_after_the_current_batch(tmp_path):
    import signal

    class Interrupting(FakeEngine):
        def generate_batch(self, request):
            if not self.calls:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C while the first batch renders
            return super().generate_batch(request)

    items = [item(f"k{i}") for i in range(12)]
    stop = StopRequest()
    with stop:
        summary = execute(against_folder(plan_of(items, tmp_path)), Interrupting(), stop=stop)
    assert summary.interrupted and summary.exit_code == 130
    assert (summary.rendered, summary.not_run) == (4, 8)
    with Manifest(tmp_path) as manifest:
        assert [r["status"] for r in manifest.records()] == ["ok"] * 4
        assert manifest.runs()[-1]["status"] == "interrupted"
