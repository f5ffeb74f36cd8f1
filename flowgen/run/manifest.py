"""The run manifest: one record per result, in SQLite (WAL) so it survives kill -9 at any moment.

`<out>/.flowgen/manifest.sqlite` holds the authoritative records, keyed by (item_id,
result_index) and upserted, so a rerun never duplicates a row. Each engine batch is committed in
one transaction after its images are on disk (an image without a row is simply rendered again).
`<out>/manifest.jsonl` is a human/tool-friendly export, rewritten atomically at the end of a run
and by `flowgen status`.
A corrupt or unreadable database, or a full disk, is a one-line StorageError naming the file; what
could not be committed is rolled back, so the data stays as it was.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flowgen.delivery.log import DeliveryTable, SinkOutcome, SinkState
from flowgen.errors import FlowgenError, storage_errors
from flowgen.run.atomic import atomic_write_bytes

SCHEMA_VERSION = 1
STATE_DIR = ".flowgen"
DB_NAME = "manifest.sqlite"
JSONL_NAME = "manifest.jsonl"
LOGS_DIR = "logs"
KIND = "flowgen manifest"  # what StorageError calls the file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    item_id       TEXT    NOT NULL,
    result_index  INTEGER NOT NULL,
    item_key      TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('ok', 'failed', 'skipped')),
    content_hash  TEXT    NOT NULL,
    output_path   TEXT,
    output_sha256 TEXT,
    run_id        TEXT    NOT NULL,
    updated_at    REAL    NOT NULL,
    record        TEXT    NOT NULL,
    PRIMARY KEY (item_id, result_index)
);
CREATE TABLE IF NOT EXISTS expirations (  -- results whose file `flowgen gc` removed when their ttl ran out
    item_id      TEXT    NOT NULL,
    result_index INTEGER NOT NULL,
    content_hash TEXT    NOT NULL,  -- what expired: a changed result renders again
    expired_at   REAL    NOT NULL,
    PRIMARY KEY (item_id, result_index)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    started_at  REAL NOT NULL,
    finished_at REAL,
    recipe_name TEXT,
    recipe_hash TEXT,
    plan_hash   TEXT,
    status      TEXT NOT NULL,
    summary     TEXT
);
CREATE TABLE IF NOT EXISTS planned (  -- the results the recipe held when the latest run started
    item_id      TEXT    NOT NULL,    -- (its plan's, plus those an incremental watermark left to earlier runs)
    result_index INTEGER NOT NULL,
    PRIMARY KEY (item_id, result_index)
);
CREATE TABLE IF NOT EXISTS prunes (  -- what `flowgen prune` removed: results the recipe no longer held
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    pruned_at REAL    NOT NULL,
    recipe    TEXT,
    results   TEXT    NOT NULL    -- JSON: [[item_id, result_index, item_key, output path], ...]
);
CREATE TABLE IF NOT EXISTS watermarks (  -- incremental datasets: what the last successful run had seen
    dataset     TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,  -- keys: row keys | files: relative path -> [mtime_ns, size, sha256]
    entries     TEXT NOT NULL,  -- JSON
    recorded_at REAL NOT NULL,
    run_id      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schedule_runs (  -- what `flowgen schedule` did with each due time
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    due_at      REAL NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    outcome     TEXT NOT NULL,  -- ok | failed | interrupted | refused | error | skipped
    run_id      TEXT,
    detail      TEXT
);
CREATE TABLE IF NOT EXISTS canary (  -- golden-seed canary verdicts, one per run and fixed item
    run_id       TEXT    NOT NULL,
    item_id      TEXT    NOT NULL,
    result_index INTEGER NOT NULL,
    item_key     TEXT,
    psnr_db      REAL,             -- NULL: identical files (infinite PSNR)
    threshold_db REAL    NOT NULL,
    passed       INTEGER NOT NULL,
    engine       TEXT,             -- JSON: the engine identity now
    first_engine TEXT,             -- JSON: the identity recorded with the render compared against
    changed      TEXT,             -- what differs between the two, or the failure's reason
    checked_at   REAL    NOT NULL,
    PRIMARY KEY (run_id, item_id, result_index)
);
"""

_UPSERT = """
INSERT INTO results (item_id, result_index, item_key, status, content_hash, output_path,
                     output_sha256, run_id, updated_at, record)
VALUES (:item_id, :result_index, :item_key, :status, :content_hash, :output_path,
        :output_sha256, :run_id, :updated_at, :record)
ON CONFLICT (item_id, result_index) DO UPDATE SET
    item_key = excluded.item_key, status = excluded.status, content_hash = excluded.content_hash,
    output_path = excluded.output_path, output_sha256 = excluded.output_sha256,
    run_id = excluded.run_id, updated_at = excluded.updated_at, record = excluded.record
"""


def manifest_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / STATE_DIR / DB_NAME


def run_log_path(out_dir: str | Path, run_id: str) -> Path:
    """Where a run's log goes: a detached run's output, and the traceback of a run that crashed."""
    return Path(out_dir) / STATE_DIR / LOGS_DIR / f"{run_id}.log"


def load_watermarks(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The incremental datasets' watermarks of `out_dir` ({} without a manifest; none is created).
    The planner takes this function as an argument (flowgen.plan.from_recipe.plan_recipe)."""
    if not manifest_path(out_dir).exists():
        return {}
    with Manifest(out_dir, create=False) as manifest:
        return manifest.watermarks()


class Manifest:
    """Records of one output folder. Records are plain dicts (see flowgen.run.records).

    Also the run's DeliveryLog (flowgen.delivery.log): one connection, used from the run's thread only."""

    thread_safe = False  # a dispatcher's outcomes are recorded by Dispatcher.collect() on the run's thread

    def __init__(self, out_dir: str | Path, *, create: bool = True, path: Path | None = None):
        self.out_dir = Path(out_dir)
        path = self.path = path or manifest_path(self.out_dir)  # path: a shard's own (flowgen.run.shards)
        if not path.exists() and not create:
            raise FlowgenError(f"{self.out_dir}: no flowgen manifest here ({STATE_DIR}/{DB_NAME} is missing)")
        with storage_errors(path, KIND):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = _Connection(sqlite3.connect(path, timeout=30, isolation_level=None), path)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss too
            self.conn.executescript(_SCHEMA)
            self.delivery_log = DeliveryTable(self.conn)  # the shape the server's store keeps too
            self.delivery_log.create()
            self._check_schema()
        except BaseException:
            self.conn.close()
            raise

    def _check_schema(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise FlowgenError(f"{self.path}: manifest schema {row[0]} is newer than this flowgen ({SCHEMA_VERSION})")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- results -------------------------------------------------------------------------
    def upsert(self, records: Iterable[dict[str, Any]], deliveries: Iterable[SinkState] = ()) -> None:
        """Insert or replace records in one transaction (all of a batch, or none of it), together
        with their deliveries' first states (Dispatcher.first_states)."""
        rows = [_row(r) for r in records]
        deliveries = list(deliveries)
        if not rows and not deliveries:
            return
        with self.conn.transaction():
            self.conn.executemany(_UPSERT, rows)
            self.conn.executemany(
                "DELETE FROM expirations WHERE item_id=? AND result_index=?",
                [(r["item_id"], r["result_index"]) for r in rows],
            )
            self.delivery_log.add_first_states(deliveries)

    def get(self, item_id: str, result_index: int) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT record FROM results WHERE item_id=? AND result_index=?", (item_id, result_index)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def records(self, item_id: str | None = None) -> Iterator[dict[str, Any]]:
        """All records (or those of one item) ordered by (item_id, result_index)."""
        if item_id is None:
            cursor = self.conn.execute("SELECT record FROM results ORDER BY item_id, result_index")
        else:
            cursor = self.conn.execute("SELECT record FROM results WHERE item_id=? ORDER BY result_index", (item_id,))
        for (text,) in cursor:
            yield json.loads(text)

    def index(self) -> dict[tuple[str, int], tuple[str, str, str | None, str | None]]:
        """(item_id, result_index) -> (status, content_hash, output_path, output_sha256), cheap.
        A result `flowgen gc` expired reads status "expired"."""
        cursor = self.conn.execute(
            """SELECT r.item_id, r.result_index,
                      CASE WHEN e.content_hash = r.content_hash THEN 'expired' ELSE r.status END,
                      r.content_hash, r.output_path, r.output_sha256
               FROM results r LEFT JOIN expirations e USING (item_id, result_index)"""
        )
        return {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in cursor}

    def expire(self, item_id: str, result_index: int, content_hash: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO expirations VALUES (?,?,?,?)", (item_id, result_index, content_hash, time.time())
        )

    def expired(self) -> dict[tuple[str, int], float]:
        """(item_id, result_index) -> when its file was removed, for results still as they expired."""
        cursor = self.conn.execute(
            "SELECT e.item_id, e.result_index, e.expired_at "
            "FROM expirations e JOIN results r USING (item_id, result_index) "
            "WHERE e.content_hash = r.content_hash"
        )
        return {(r[0], r[1]): r[2] for r in cursor}

    def counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall())

    # --- deliveries (flowgen.delivery.log) ------------------------------------------------
    def set_delivery(
        self,
        item_id: str,
        result_index: int,
        sink: str,
        state: str,
        *,
        target: str | None = None,
        url: str | None = None,
        error: str | None = None,
        attempts: int = 0,
    ) -> None:
        """Upsert one (result, sink) delivery state; `attempts` is added to the count so far."""
        self.delivery_log.set_state(
            item_id, result_index, sink, state, target=target, url=url, error=error, attempts=attempts
        )

    def add_attempts(self, item_id: str, result_index: int, sink: str, run_id: str, attempts: Iterable[dict]) -> None:
        """Append delivery attempts (dicts with attempt, started_at, seconds, status_code, error, outcome)."""
        self.delivery_log.add_attempts(item_id, result_index, sink, run_id, attempts)

    def record_delivery(self, outcome: SinkOutcome, run_id: str) -> None:
        """A sink's outcome and its attempts (the dispatcher's DeliveryLog call)."""
        self.delivery_log.record(outcome, run_id)

    def deliveries(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Delivery states, optionally only those in `states`, ordered by result then sink."""
        return self.delivery_log.rows(states=states)

    def attempts(self, item_id: str, result_index: int) -> list[dict[str, Any]]:
        return self.delivery_log.attempts(item_id, result_index)

    # --- runs ----------------------------------------------------------------------------
    def launch_run(self, run_id: str, recipe_name: str, recipe_hash: str, plan_hash: str, log: str) -> None:
        """Record a run started in the background (`run --detach`) as "starting", before its process
        exists: `status` then shows it, and if the process dies before its run starts (set_run_pid
        says which process to watch), `status` says so instead of showing the previous run."""
        self.conn.execute(
            "INSERT OR IGNORE INTO runs (run_id, started_at, recipe_name, recipe_hash, plan_hash, status, summary) "
            "VALUES (?,?,?,?,?,'starting',?)",
            (run_id, time.time(), recipe_name, recipe_hash, plan_hash, json.dumps({"log": log})),
        )

    def set_run_pid(self, run_id: str, pid: int) -> None:
        """The process a "starting" run runs in (see launch_run)."""
        self.conn.execute(
            "UPDATE runs SET summary = json_set(COALESCE(summary, '{}'), '$.pid', ?) "
            "WHERE run_id=? AND status='starting'",
            (pid, run_id),
        )

    def fail_unstarted_run(self, run_id: str, reason: str) -> None:
        """A "starting" run whose process gave up before the run started (refused, crashed): failed, with why."""
        self.conn.execute(
            "UPDATE runs SET status='failed', finished_at=?, "
            "summary = json_set(COALESCE(summary, '{}'), '$.error', ?) WHERE run_id=? AND status='starting'",
            (time.time(), reason, run_id),
        )

    def start_run(self, run_id: str, recipe_name: str, recipe_hash: str, plan_hash: str) -> None:
        """The run holds the folder now (a "starting" row of a detached run becomes "running")."""
        self.conn.execute(
            "INSERT INTO runs (run_id, started_at, recipe_name, recipe_hash, plan_hash, status) "
            "VALUES (?,?,?,?,?,'running') "
            "ON CONFLICT (run_id) DO UPDATE SET started_at=excluded.started_at, recipe_name=excluded.recipe_name, "
            "recipe_hash=excluded.recipe_hash, plan_hash=excluded.plan_hash, status='running'",
            (run_id, time.time(), recipe_name, recipe_hash, plan_hash),
        )

    def mark_died_runs(self, current: str | None = None) -> list[str]:
        """Runs still marked "running" or "starting", but `current`: called by the holder of the
        folder's run lock, so none of them is alive (killed with -9, the machine went down, or a
        detached run's process ended before it started). Returns their ids."""
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT run_id FROM runs WHERE status IN ('running', 'starting') AND run_id IS NOT ?", (current,)
            )
        ]
        self.conn.execute(
            "UPDATE runs SET status='died' WHERE status IN ('running', 'starting') AND run_id IS NOT ?", (current,)
        )
        return ids

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        self.conn.execute(
            "UPDATE runs SET finished_at=?, status=?, summary=? WHERE run_id=?",
            (time.time(), status, json.dumps(summary, sort_keys=True), run_id),
        )

    def runs(self) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT run_id, started_at, finished_at, recipe_name, recipe_hash, plan_hash, status, summary "
            "FROM runs ORDER BY started_at"
        )
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r)) for r in cursor]
        for row in rows:
            row["summary"] = json.loads(row["summary"]) if row["summary"] else None
        return rows

    # --- what the recipe holds -----------------------------------------------------------
    def record_plan(
        self,
        result_ids: Iterable[tuple[str, int]],
        retained_item_ids: Iterable[str] = (),
        recipe: dict[str, Any] | None = None,
    ) -> None:
        """Replace the planned set (one transaction) when a run starts: its plan's results plus the
        recorded results of items an incremental watermark retains; and the recipe it came from
        ({"path", "overrides"}: what `prune` compares with by default)."""
        retained = sorted(set(retained_item_ids))
        with self.conn.transaction():
            self.conn.execute("DELETE FROM planned")
            self.conn.executemany("INSERT OR IGNORE INTO planned VALUES (?, ?)", result_ids)
            self.conn.executemany(
                "INSERT OR IGNORE INTO planned SELECT item_id, result_index FROM results WHERE item_id=?",
                [(item_id,) for item_id in retained],
            )
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('planned_recorded', '1')")
            if recipe is not None:
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('recipe', ?)", (json.dumps(recipe, sort_keys=True),)
                )

    def planned(self) -> set[tuple[str, int]] | None:
        """The results the recipe held at the latest run's start; None when no run recorded them (older manifests)."""
        if self.meta("planned_recorded") is None:
            return None
        return {(r[0], r[1]) for r in self.conn.execute("SELECT item_id, result_index FROM planned")}

    def last_recipe(self) -> dict[str, Any] | None:
        """{"path", "overrides"} of the recipe the latest run used, when it recorded one."""
        text = self.meta("recipe")
        return json.loads(text) if text else None

    def remove_results(self, result_ids: Iterable[tuple[str, int]], recipe: str | None, removed: list[list]) -> None:
        """Delete these results' rows (results, deliveries, attempts, expirations, planned) and record
        the prune, in one transaction; `removed` is what the prune record lists."""
        ids = list(result_ids)
        with self.conn.transaction():
            for table in ("results", "deliveries", "delivery_attempts", "expirations", "planned"):
                self.conn.executemany(f"DELETE FROM {table} WHERE item_id=? AND result_index=?", ids)
            self.conn.execute(
                "INSERT INTO prunes (pruned_at, recipe, results) VALUES (?,?,?)",
                (time.time(), recipe, json.dumps(removed)),
            )

    def prunes(self) -> list[dict[str, Any]]:
        cursor = self.conn.execute("SELECT pruned_at, recipe, results FROM prunes ORDER BY id")
        return [{"pruned_at": at, "recipe": recipe, "results": json.loads(results)} for at, recipe, results in cursor]

    # --- metadata ------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # --- incremental datasets ----------------------------------------------------------
    def watermarks(self) -> dict[str, dict[str, Any]]:
        """dataset -> {kind, entries, recorded_at, run_id} (see flowgen.plan.incremental)."""
        cursor = self.conn.execute("SELECT dataset, kind, entries, recorded_at, run_id FROM watermarks")
        return {
            name: {"kind": kind, "entries": json.loads(entries), "recorded_at": at, "run_id": run_id}
            for name, kind, entries, at, run_id in cursor
        }

    def record_watermarks(self, watermarks: dict[str, dict[str, Any]], run_id: str) -> None:
        """Replace the watermarks of these datasets (one transaction) at the end of a successful run."""
        now = time.time()
        rows = [
            (name, w["kind"], json.dumps(w["entries"], sort_keys=True), now, run_id) for name, w in watermarks.items()
        ]
        with self.conn.transaction():
            self.conn.executemany("INSERT OR REPLACE INTO watermarks VALUES (?,?,?,?,?)", rows)

    # --- schedule ------------------------------------------------------------------------
    def record_schedule_run(
        self,
        due_at: float,
        started_at: float,
        outcome: str,
        run_id: str | None = None,
        detail: str | None = None,
        finished_at: float | None = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO schedule_runs (due_at, started_at, finished_at, outcome, run_id, detail) VALUES (?,?,?,?,?,?)",
            (due_at, started_at, finished_at, outcome, run_id, detail),
        )

    def last_scheduled_due(self) -> float | None:
        """The latest due time the scheduler dealt with (an interrupted run does not count: it is due again)."""
        row = self.conn.execute("SELECT MAX(due_at) FROM schedule_runs WHERE outcome != 'interrupted'").fetchone()
        return row[0] if row else None

    def schedule_runs(self) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT due_at, started_at, finished_at, outcome, run_id, detail FROM schedule_runs ORDER BY id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    # --- canary --------------------------------------------------------------------------
    def canary_items(self) -> list[str]:
        """The item ids the canary fixed on first use, in order."""
        return json.loads(self.meta("canary_items") or "[]")

    def set_canary_items(self, item_ids: list[str]) -> None:
        self.set_meta("canary_items", json.dumps(list(item_ids)))

    def record_canary(self, verdicts: Iterable[dict[str, Any]]) -> None:
        self.conn.executemany(
            """INSERT OR REPLACE INTO canary (run_id, item_id, result_index, item_key, psnr_db, threshold_db, passed,
                                              engine, first_engine, changed, checked_at)
               VALUES (:run_id, :item_id, :result_index, :item_key, :psnr_db, :threshold_db, :passed,
                       :engine, :first_engine, :changed, :checked_at)""",
            [
                {
                    **v,
                    "passed": int(bool(v["passed"])),
                    "engine": json.dumps(v.get("engine"), sort_keys=True, default=str),
                    "first_engine": json.dumps(v.get("first_engine"), sort_keys=True, default=str),
                }
                for v in verdicts
            ],
        )

    def canary_verdicts(self) -> list[dict[str, Any]]:
        """Every canary verdict, oldest first (engine identities as JSON text)."""
        cursor = self.conn.execute(
            "SELECT run_id, item_id, result_index, item_key, psnr_db, threshold_db, passed, engine, first_engine, "
            "changed, checked_at FROM canary ORDER BY checked_at, item_id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    # --- export --------------------------------------------------------------------------
    def export_jsonl(self) -> Path:
        """Rewrite <out>/manifest.jsonl atomically from the database; returns its path."""
        delivered: dict[tuple[str, int], dict[str, Any]] = {}
        for d in self.deliveries():
            delivered.setdefault((d["item_id"], d["result_index"]), {})[d["sink"]] = {
                k: d[k] for k in ("state", "target", "url", "attempts", "error") if d[k] is not None
            }
        lines = []
        expired = self.expired()
        for record in self.records():
            rid = (record["item_id"], record["result_index"])
            state = delivered.get(rid)
            if state:
                record["delivery"] = state
            if record["status"] == "ok" and rid not in expired:
                record.update(_image_field(record, self.out_dir, state or {}))
            lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
        target = self.out_dir / JSONL_NAME
        with storage_errors(target, "manifest export"):  # a full disk: one line; the old export stays whole
            atomic_write_bytes(target, ("\n".join(lines) + ("\n" if lines else "")).encode())
        return target


class _Connection:
    """The manifest's sqlite3 connection: every error (a corrupt file, a full disk) becomes a one-line
    StorageError naming the file, and a transaction is one `with` block."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self._conn, self.path = conn, path

    def execute(self, sql: str, args: Any = ()) -> _Cursor:
        with storage_errors(self.path, KIND):
            return _Cursor(self._conn.execute(sql, args), self.path)

    def executemany(self, sql: str, rows: Iterable[Any]) -> None:
        with storage_errors(self.path, KIND):
            self._conn.executemany(sql, rows)

    def executescript(self, script: str) -> None:
        with storage_errors(self.path, KIND):
            self._conn.executescript(script)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on any error a ROLLBACK, when SQLite has not already rolled
        back itself (it does on a full disk), so the error raised is the one that happened."""
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:  # the original error says more; SQLite discards the rest on close
                    pass
            raise

    def close(self) -> None:
        self._conn.close()


class _Cursor:
    """A cursor whose rows, read lazily, raise StorageError as the connection does."""

    def __init__(self, cursor: sqlite3.Cursor, path: Path):
        self._cursor, self.path = cursor, path

    @property
    def description(self):
        return self._cursor.description

    def fetchone(self):
        with storage_errors(self.path, KIND):
            return self._cursor.fetchone()

    def fetchall(self) -> list:
        with storage_errors(self.path, KIND):
            return self._cursor.fetchall()

    def __iter__(self) -> Iterator[Any]:
        with storage_errors(self.path, KIND):
            yield from self._cursor


def _image_field(record: dict[str, Any], out_dir: Path, delivery: dict[str, Any]) -> dict[str, str]:
    """The image in the form the task's outputType asks, as the spec's result carries it: imageURL
    (the uploaded URL when the upload worked, else the file's file:// URL), or the file's bytes as
    imageDataURI / imageBase64Data (read from the file at export: the database stays small)."""
    from flowgen.delivery.payload import IMAGE_KEYS, content_type_for, data_uri

    output_type = record.get("outputType") or "URL"
    path = out_dir / record["output"]["path"]
    if output_type == "URL":
        upload = delivery.get("upload") or {}
        url = upload.get("url") if upload.get("state") == "ok" else None
        return {"imageURL": url or path.resolve().as_uri()}
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if output_type == "dataURI":
        return {IMAGE_KEYS[output_type]: data_uri(data, content_type_for(path.suffix))}
    return {IMAGE_KEYS[output_type]: base64.b64encode(data).decode("ascii")}


def _row(record: dict[str, Any]) -> dict[str, Any]:
    output = record.get("output") or {}
    return {
        "item_id": record["item_id"],
        "result_index": record["result_index"],
        "item_key": record["item_key"],
        "status": record["status"],
        "content_hash": record["content_hash"],
        "output_path": output.get("path"),
        "output_sha256": output.get("sha256"),
        "run_id": record["run_id"],
        "updated_at": record.get("updated_at", time.time()),
        "record": json.dumps(record, sort_keys=True, ensure_ascii=False),
    }
