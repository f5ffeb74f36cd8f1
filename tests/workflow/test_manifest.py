"""The SQLite manifest: WAL mode, upsert without duplicates, schema version, atomic JSONL export."""

from __future__ import annotations

import json
import sqlite3

import pytest

from flowgen.errors import FlowgenError
from flowgen.run.manifest import SCHEMA_VERSION, Manifest, manifest_path


def record(item_id, index, status="ok", sha="s1", **extra):
    return {"item_id": item_id, "result_index": index, "item_key": f"k={item_id}", "status": status,
            "content_hash": "c" + sha, "output": {"path": f"{item_id}_{index}.png", "sha256": sha},
            "run_id": "run", "error": None, **extra}


def test_upsert_never_duplicates_and_last_write_wins(tmp_path):
    with Manifest(tmp_path) as manifest:
        manifest.upsert([record("a", 0), record("a", 1), record("b", 0)])
        manifest.upsert([record("a", 0, status="failed", sha="s2"), record("b", 0)])
        rows = list(manifest.records())
        assert [(r["item_id"], r["result_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0)]
        assert manifest.get("a", 0)["status"] == "failed" and manifest.get("a", 0)["output"]["sha256"] == "s2"
        assert manifest.counts() == {"ok": 2, "failed": 1}
        assert manifest.index()[("a", 1)] == ("ok", "cs1", "a_1.png", "s1")
    conn = sqlite3.connect(manifest_path(tmp_path))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_a_failing_batch_commits_nothing(tmp_path):
    with Manifest(tmp_path) as manifest:
        manifest.upsert([record("a", 0)])
        with pytest.raises(KeyError):
            manifest.upsert([record("b", 0), {"item_id": "broken"}])
        assert [r["item_id"] for r in manifest.records()] == ["a"]


def test_status_values_are_checked(tmp_path):
    with Manifest(tmp_path) as manifest, pytest.raises(sqlite3.IntegrityError):
        manifest.upsert([record("a", 0, status="done")])


def test_jsonl_export_is_complete_and_leaves_no_temp_files(tmp_path):
    with Manifest(tmp_path) as manifest:
        manifest.upsert([record("b", 0), record("a", 0, params={"positivePrompt": "café"})])
        path = manifest.export_jsonl()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["item_id"] for r in lines] == ["a", "b"] and lines[0]["params"]["positivePrompt"] == "café"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".flowgen", "manifest.jsonl"]


def test_runs_are_recorded(tmp_path):
    with Manifest(tmp_path) as manifest:
        manifest.start_run("r1", "recipe", "rh", "ph")
        manifest.finish_run("r1", "ok", {"rendered": 3})
        (run,) = manifest.runs()
    assert run["status"] == "ok" and run["summary"] == {"rendered": 3} and run["plan_hash"] == "ph"


def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(FlowgenError, match="no flowgen manifest"):
        Manifest(tmp_path / "nothing", create=False)


def test_newer_schema_is_refused(tmp_path):
    Manifest(tmp_path).close()
    conn = sqlite3.connect(manifest_path(tmp_path))
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(FlowgenError, match="newer"):
        Manifest(tmp_path)
