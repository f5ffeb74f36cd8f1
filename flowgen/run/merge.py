"""Shard manifests and the main one: read as one (MergedView), folded into one (fold_shards).

A shard run (flowgen.run.shards) records into OUT/.flowgen/shards/K-of-N.sqlite, a manifest with
the main one's schema. `fold_shards` copies every shard into OUT/.flowgen/manifest.sqlite by
identity: results and deliveries by (item, result[, sink]) where the shard's row is newer, delivery
attempts once each, runs by id, canary verdicts by (run, item, result). Folding twice, or while a
shard still runs, adds nothing twice. A shard no process holds (its lock is free) is deleted once
folded, and its runs still marked running are recorded as died; a running one is folded as far as
it got and kept. An incremental dataset's watermarks move when every shard of one plan recorded
that it completed its share (ShardManifest.record_watermarks).

Who folds: `flowgen merge OUT`; every shard run as it ends; and, before they read the folder,
`run` (a plain run), `status`, `plan`, `report`, `regen` and `prune`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowgen.run.manifest import Manifest, manifest_path
from flowgen.run.shards import COMPLETE_KEY, shard_files, shards_dir


@dataclass
class Folded:
    """What one fold did."""

    folded: list[str] = field(default_factory=list)  # shards folded and removed (no process held them)
    running: list[str] = field(default_factory=list)  # shards folded as far as they got (still held)
    watermarks_moved: bool = False


def fold_shards(out_dir: str | Path) -> Folded:
    """Fold every shard manifest of `out_dir` into its main manifest (see the module doc)."""
    done = Folded()
    files = shard_files(out_dir)
    if not files:
        return done
    with Manifest(out_dir) as main:
        for path in files:
            with _held_if_idle(shards_dir(out_dir) / f"{path.stem}.lock") as idle:
                if not path.exists():  # another fold removed it meanwhile
                    continue
                _fold_one(main, path, idle)
                if idle:
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
                (done.folded if idle else done.running).append(path.stem)
        done.watermarks_moved = _move_watermarks(main)
    return done


def _fold_one(main: Manifest, path: Path, idle: bool) -> None:
    conn = main.conn
    conn.execute("ATTACH DATABASE ? AS shard", (str(path),))
    try:
        newest_main = conn.execute("SELECT MAX(started_at) FROM main.runs").fetchone()[0]
        newest_shard = conn.execute("SELECT MAX(started_at) FROM shard.runs").fetchone()[0]
        has_plan = conn.execute("SELECT 1 FROM shard.meta WHERE key='planned_recorded'").fetchone()
        with conn.transaction():
            _upsert_newer(conn, "results", ("item_id", "result_index"))
            _upsert_newer(conn, "deliveries", ("item_id", "result_index", "sink"))
            columns = [c for c in _columns(conn, "delivery_attempts") if c != "id"]
            names = ", ".join(columns)
            same = " AND ".join(f"m.{c} IS s.{c}" for c in ("item_id", "result_index", "sink", "run_id", "attempt"))
            conn.execute(
                f"INSERT INTO main.delivery_attempts ({names}) SELECT {names} FROM shard.delivery_attempts s "
                f"WHERE NOT EXISTS (SELECT 1 FROM main.delivery_attempts m WHERE {same}) ORDER BY s.id"
            )
            _upsert_all(conn, "runs", ("run_id",))
            if idle:  # nothing holds the shard: its runs that never ended died
                conn.execute(
                    "UPDATE main.runs SET status='died' WHERE status IN ('running', 'starting') "
                    "AND run_id IN (SELECT run_id FROM shard.runs)"
                )
            _upsert_all(conn, "canary", ("run_id", "item_id", "result_index"))
            if has_plan and (newest_main is None or (newest_shard or 0) >= newest_main):
                conn.execute("DELETE FROM main.planned")
                conn.execute("INSERT INTO main.planned SELECT item_id, result_index FROM shard.planned")
                conn.execute(
                    "INSERT OR REPLACE INTO main.meta SELECT key, value FROM shard.meta "
                    "WHERE key IN ('planned_recorded', 'recipe')"
                )
            conn.execute("INSERT OR IGNORE INTO main.meta SELECT key, value FROM shard.meta WHERE key='canary_items'")
            conn.execute(
                "INSERT OR REPLACE INTO main.meta SELECT key, value FROM shard.meta WHERE key LIKE ?",
                (f"{COMPLETE_KEY}:%",),
            )
    finally:
        conn.execute("DETACH DATABASE shard")


def shard_counts(main: Manifest, path: Path) -> tuple[int, int] | None:
    """(results a shard manifest holds, how many of those the main manifest does not hold yet as the
    shard does): what a fold would still bring in. None when the shard is gone (folded meanwhile)
    or cannot be read. Reads only."""
    try:
        shard = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        rows = shard.execute("SELECT item_id, result_index, updated_at FROM results").fetchall()
    except sqlite3.Error:
        return None
    finally:
        shard.close()
    merged = {
        (item_id, index): updated
        for item_id, index, updated in main.conn.execute("SELECT item_id, result_index, updated_at FROM results")
    }
    unmerged = sum(1 for item_id, index, updated in rows if merged.get((item_id, index), -1.0) < updated)
    return len(rows), unmerged


def _columns(conn, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA main.table_info({table})").fetchall()]


def _upsert_newer(conn, table: str, key: tuple[str, ...]) -> None:
    """The shard's rows of `table` into the main one where they are new or newer (updated_at)."""
    columns = _columns(conn, table)
    names = ", ".join(columns)
    sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    conn.execute(
        f"INSERT INTO main.{table} ({names}) SELECT {names} FROM shard.{table} WHERE true "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets} WHERE excluded.updated_at > {table}.updated_at"
    )


def _upsert_all(conn, table: str, key: tuple[str, ...]) -> None:
    """The shard's rows of `table` into the main one, the shard's version winning (it wrote them)."""
    columns = _columns(conn, table)
    names = ", ".join(columns)
    sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    conn.execute(
        f"INSERT INTO main.{table} ({names}) SELECT {names} FROM shard.{table} WHERE true "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
    )


def _move_watermarks(main: Manifest) -> bool:
    """Record an incremental plan's watermarks once every shard of it completed (then forget the marks)."""
    marks: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for key, value in main.conn.execute("SELECT key, value FROM meta WHERE key LIKE ?", (f"{COMPLETE_KEY}:%",)):
        _, plan_hash, name = key.split(":", 2)
        index, count = (int(n) for n in name.split("-of-"))
        marks.setdefault((plan_hash, count), {})[index] = json.loads(value)
    moved = False
    for (plan_hash, count), by_shard in marks.items():
        if len(by_shard) == count:
            last = by_shard[max(by_shard)]
            main.record_watermarks(last["watermarks"], last["run_id"])
            main.conn.execute("DELETE FROM meta WHERE key LIKE ?", (f"{COMPLETE_KEY}:{plan_hash}:%-of-{count}",))
            moved = True
    return moved


@contextmanager
def _held_if_idle(lock: Path) -> Iterator[bool]:
    """Hold a shard's lock while folding it when no process holds it (yields True), else yield False."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class MergedView:
    """The main manifest and every shard of a folder read as one (reading only): a result's row is
    the one of the newest shard holding it, else the main manifest's. Shard runs diff against it."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self._manifests: list[Manifest] = []  # oldest first: main, then shards by age

    def __enter__(self) -> MergedView:
        try:
            if manifest_path(self.out_dir).exists():
                self._manifests.append(Manifest(self.out_dir, create=False))
            for path in shard_files(self.out_dir):
                if path.exists():
                    self._manifests.append(Manifest(self.out_dir, create=False, path=path))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for manifest in self._manifests:
            manifest.close()
        self._manifests = []

    def index(self):
        merged: dict = {}
        for manifest in self._manifests:
            merged.update(manifest.index())
        return merged

    def canary_items(self) -> list[str]:
        """The canary's fixed items: the first manifest that fixed them (the main one first)."""
        for manifest in self._manifests:
            items = manifest.canary_items()
            if items:
                return items
        return []

    def get(self, item_id: str, result_index: int) -> dict[str, Any] | None:
        for manifest in reversed(self._manifests):
            record = manifest.get(item_id, result_index)
            if record is not None:
                return record
        return None
