"""What `flowgen serve` keeps across restarts: every accepted task, its results, and the images.

`DATA_DIR/serve.sqlite` (WAL, synchronous=FULL, as the run manifest) records each task when it is
accepted and each result as it finishes, so a server killed with -9 and started again still answers
`getResponse` for what finished; tasks still running when it died are answered with an error, not
left "processing" for ever, and the same taskUUID sent again by its key runs anew (`accept`).
Image bytes live content-addressed under `DATA_DIR/images/` (written atomically, and only once
they passed the caller's check: a rejected input never lands there); an imageUUID is derived from
the bytes, so the same upload twice is one file and one UUID. A `ttl` makes an image's URL stop
answering after that many seconds (the file stays for the task's base64 answers until the data dir
is cleaned).

Everything belongs to the key that sent it: tasks and images record its digest
(flowgen.serve.auth.key_digest) as `owner`, never the key. Tasks recorded before owners existed
have none and answer to no key. Requests are stored with their URLs' credentials (query strings,
user info) removed; what a delivery needs of them lives in memory only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowgen.delivery.log import DeliveryTable, SinkOutcome, SinkState
from flowgen.run.atomic import atomic_write_bytes
from flowgen.serve.auth import key_digest
from flowgen.serve.urls import ImageURLs

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
  task_uuid TEXT PRIMARY KEY,
  task_type TEXT NOT NULL,
  status TEXT NOT NULL,            -- processing | success | error
  request TEXT NOT NULL,           -- the validated task as JSON (outputType, includeCost, ...)
  expected INTEGER NOT NULL,       -- numberResults
  errors TEXT,                     -- JSON list of error items when status is error
  created REAL NOT NULL,
  finished REAL,
  owner TEXT                       -- key_digest of the API key that sent it (NULL: before owners existed)
);
CREATE TABLE IF NOT EXISTS results (
  task_uuid TEXT NOT NULL,
  result_index INTEGER NOT NULL,
  image_uuid TEXT NOT NULL,
  seed INTEGER NOT NULL,
  cost REAL,
  nsfw INTEGER,                    -- NSFWContent when safety.checkContent asked for it, else NULL
  PRIMARY KEY (task_uuid, result_index)
);
CREATE TABLE IF NOT EXISTS images (
  image_uuid TEXT PRIMARY KEY,
  sha256 TEXT NOT NULL,
  ext TEXT NOT NULL,
  expires REAL                     -- unix time the URL stops answering; NULL: never
);
CREATE TABLE IF NOT EXISTS image_owners (
  image_uuid TEXT NOT NULL,
  owner TEXT NOT NULL,             -- key_digest of a key that uploaded it or whose task rendered it
  PRIMARY KEY (image_uuid, owner)
);
CREATE TABLE IF NOT EXISTS sessions (
  session_uuid TEXT PRIMARY KEY,
  key_digest TEXT NOT NULL,        -- sha256 of the API key that opened it (a session is not a key)
  created REAL NOT NULL
);
"""

RESTARTED = "the server stopped before this task finished; send it again (the same taskUUID runs it anew)"
INTERRUPTED = "taskInterrupted"  # the error code of a task a stopped server left: a resend runs it


class ImageRejected(ValueError):
    """The check passed to `Store.put_image` refused the bytes (the message says why)."""


@dataclass(frozen=True)
class StoredImage:
    image_uuid: str
    sha256: str
    ext: str
    path: Path
    expires: float | None


def image_uuid_for(sha256: str) -> str:
    """A UUID (version-4 shaped, as clients check) named by the image's bytes."""
    return str(uuid.UUID(bytes=bytes.fromhex(sha256[:32]), version=4))


class Store:
    """The server's records (see module doc); thread-safe. Also the server's DeliveryLog
    (flowgen.delivery.log), written from the delivery threads as each sink finishes."""

    thread_safe = True

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.urls = ImageURLs.for_data_dir(self.data_dir)
        self._lock = threading.Lock()  # one connection shared by the event loop and the batcher's threads
        self.conn = sqlite3.connect(self.data_dir / "serve.sqlite", check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(tasks)")}
        if "owner" not in columns:  # a store written before tasks had owners
            self.conn.execute("ALTER TABLE tasks ADD COLUMN owner TEXT")
        self._deliveries = DeliveryTable(self.conn)  # the run manifest's shape: item_id is the taskUUID
        _upgrade_deliveries(self.conn)
        self._deliveries.create()
        self.fail_unfinished(RESTARTED)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # --- tasks -------------------------------------------------------------------------------

    def accept(self, task_uuid: str, task_type: str, request: dict[str, Any], expected: int, owner: str) -> bool:
        """Record a new task of `owner`; False when the UUID is already taken (a client must not
        reuse one). A task of the same owner and type that a stopped server interrupted is
        replaced, results and deliveries included: its resend runs it anew."""
        with self._lock, self.conn:
            self.conn.execute("BEGIN IMMEDIATE")  # the replacement is one transaction (the connection autocommits)
            row = self.conn.execute(
                "SELECT task_type, status, errors, owner FROM tasks WHERE task_uuid = ?", (task_uuid,)
            ).fetchone()
            if row is not None:
                if not (row[0] == task_type and row[3] == owner and _interrupted(row[1], row[2])):
                    return False
                for table in ("tasks", "results"):
                    self.conn.execute(f"DELETE FROM {table} WHERE task_uuid = ?", (task_uuid,))
                self._deliveries.delete(task_uuid)
            self.conn.execute(
                "INSERT INTO tasks (task_uuid, task_type, status, request, expected, created, owner) "
                "VALUES (?, ?, 'processing', ?, ?, ?, ?)",
                (task_uuid, task_type, json.dumps(request), expected, time.time(), owner),
            )
        return True

    def add_result(
        self,
        task_uuid: str,
        result_index: int,
        image_uuid: str,
        seed: int,
        cost: float | None,
        nsfw: bool | None = None,
        sinks: Iterable[SinkState] = (),
    ) -> None:
        """Record one finished result; the task turns `success` when its last result arrives.
        `sinks` (the dispatcher's first states) are recorded in the same transaction, so a server
        killed before delivering finds them `pending` when it starts again."""
        with self._lock, self.conn:
            self.conn.execute("BEGIN IMMEDIATE")  # the result and its sinks: one transaction
            self.conn.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                (task_uuid, result_index, image_uuid, seed, cost, None if nsfw is None else int(nsfw)),
            )
            self._deliveries.add_first_states(sinks)
            self.conn.execute(
                "UPDATE tasks SET status = 'success', finished = ? WHERE task_uuid = ? AND status = 'processing' "
                "AND expected <= (SELECT COUNT(*) FROM results WHERE results.task_uuid = tasks.task_uuid)",
                (time.time(), task_uuid),
            )

    def fail(self, task_uuid: str, errors: list[dict[str, Any]]) -> None:
        """Mark a task failed (a finished task stays as it is)."""
        with self._lock:
            self.conn.execute(
                "UPDATE tasks SET status = 'error', errors = ?, finished = ? "
                "WHERE task_uuid = ? AND status = 'processing'",
                (json.dumps(errors), time.time(), task_uuid),
            )

    def fail_unfinished(self, message: str) -> int:
        """Fail every task still processing (at start: those a dead server left; at stop: those the
        batcher could not finish)."""
        with self._lock:
            rows = self.conn.execute("SELECT task_uuid, task_type FROM tasks WHERE status = 'processing'").fetchall()
        for task_uuid, task_type in rows:
            self.fail(
                task_uuid, [{"code": INTERRUPTED, "message": message, "taskType": task_type, "taskUUID": task_uuid}]
            )
        return len(rows)

    def task(self, task_uuid: str) -> dict[str, Any] | None:
        """The task record with its results (sorted by result index), or None. `owner` is the
        key digest that sent it (None for a task recorded before owners existed); `interrupted`
        says a stopped server left it (a resend by its owner runs it anew)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT task_type, status, request, expected, errors, owner FROM tasks WHERE task_uuid = ?",
                (task_uuid,),
            ).fetchone()
            if row is None:
                return None
            results = self.conn.execute(
                "SELECT result_index, image_uuid, seed, cost, nsfw FROM results "
                "WHERE task_uuid = ? ORDER BY result_index",
                (task_uuid,),
            ).fetchall()
        task_type, status, request, expected, errors, owner = row
        return {
            "taskUUID": task_uuid,
            "taskType": task_type,
            "status": status,
            "request": json.loads(request),
            "expected": expected,
            "errors": json.loads(errors) if errors else [],
            "owner": owner,
            "interrupted": _interrupted(status, errors),
            "results": [
                {"resultIndex": i, "imageUUID": u, "seed": s, "cost": c, "NSFWContent": None if n is None else bool(n)}
                for i, u, s, c, n in results
            ],
        }

    # --- deliveries (webhookURL, uploadEndpoint) ----------------------------------------------

    def record_delivery(self, outcome: SinkOutcome, run_id: str) -> None:
        """A sink's outcome and its attempts; `attempts` add to earlier tries' (a resend after a restart)."""
        with self._lock, self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self._deliveries.record(outcome, run_id)

    def set_delivery(
        self, task_uuid: str, result_index: int, sink: str, state: str, *, target: str | None, error: str | None
    ) -> None:
        """A sink's state decided without sending it (a resend that cannot be made)."""
        with self._lock:
            self._deliveries.set_state(task_uuid, result_index, sink, state, target=target, error=error)

    def deliveries(self, task_uuid: str | None = None, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Delivery rows (flowgen.delivery.log; `item_id` is the taskUUID) of one task and/or in
        some states, in task and result order."""
        with self._lock:
            return self._deliveries.rows(item_id=task_uuid, states=states)

    # --- images ------------------------------------------------------------------------------

    def put_image(
        self,
        data: bytes,
        ext: str,
        ttl: int | None = None,
        *,
        owner: str,
        check: Callable[[Path], str | None] | None = None,
    ) -> StoredImage:
        """Store image bytes of `owner` (once per content) and return their record; a ttl only
        ever extends the URL's life (another task may have asked for longer, or for none).
        `check` reads the bytes as a file before they are stored: a problem it returns raises
        ImageRejected and nothing is kept."""
        digest = hashlib.sha256(data).hexdigest()
        if check is not None:
            self._check(data, ext, check)
        path = self._path(digest, ext)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        image_uuid = image_uuid_for(digest)
        expires = None if ttl is None else time.time() + ttl
        with self._lock, self.conn:
            row = self.conn.execute("SELECT expires FROM images WHERE image_uuid = ?", (image_uuid,)).fetchone()
            if row is None:
                self.conn.execute("INSERT INTO images VALUES (?, ?, ?, ?)", (image_uuid, digest, ext, expires))
            elif row[0] is not None and (expires is None or expires > row[0]):
                self.conn.execute("UPDATE images SET expires = ? WHERE image_uuid = ?", (expires, image_uuid))
            else:
                expires = row[0]
            self.conn.execute("INSERT OR IGNORE INTO image_owners VALUES (?, ?)", (image_uuid, owner))
        return StoredImage(image_uuid, digest, ext, path, expires)

    def _check(self, data: bytes, ext: str, check: Callable[[Path], str | None]) -> None:
        """Run `check` on the bytes written to a private temp file (removed whatever it says)."""
        staging = self.data_dir / "incoming"
        staging.mkdir(exist_ok=True)
        path = staging / f"{uuid.uuid4().hex}.{ext}"
        try:
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
                handle.write(data)
            problem = check(path)
        finally:
            path.unlink(missing_ok=True)
        if problem:
            raise ImageRejected(problem)

    def owns_image(self, image_uuid: str, owner: str) -> bool:
        with self._lock:
            return (
                self.conn.execute(
                    "SELECT 1 FROM image_owners WHERE image_uuid = ? AND owner = ?", (image_uuid.lower(), owner)
                ).fetchone()
                is not None
            )

    def image(self, image_uuid: str) -> StoredImage | None:
        with self._lock:
            row = self.conn.execute(
                "SELECT sha256, ext, expires FROM images WHERE image_uuid = ?", (image_uuid.lower(),)
            ).fetchone()
        if row is None:
            return None
        digest, ext, expires = row
        return StoredImage(image_uuid.lower(), digest, ext, self._path(digest, ext), expires)

    def image_url(self, base_url: str, image: StoredImage) -> str:
        """The signed URL this server serves `image` at (flowgen.serve.urls)."""
        return self.urls.url(base_url, f"{image.image_uuid}.{image.ext}", image.expires)

    def _path(self, digest: str, ext: str) -> Path:
        return self.images_dir / digest[:2] / f"{digest}.{ext}"

    # --- WebSocket sessions ------------------------------------------------------------------

    def open_session(self, key: str, session_uuid: str | None = None) -> str:
        """The session for `key`: the one named when it was opened with the same key, else a new one."""
        digest = key_digest(key)
        with self._lock:
            if session_uuid:
                row = self.conn.execute(
                    "SELECT key_digest FROM sessions WHERE session_uuid = ?", (session_uuid,)
                ).fetchone()
                if row is not None and row[0] == digest:
                    return session_uuid
            new = str(uuid.uuid4())
            self.conn.execute("INSERT INTO sessions VALUES (?, ?, ?)", (new, digest, time.time()))
        return new


def _upgrade_deliveries(conn: sqlite3.Connection) -> None:
    """A store written before runs and the server shared one deliveries table (keyed by task_uuid,
    stamped `updated`): its rows, moved into the shared shape."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}
    if "task_uuid" not in columns:
        return
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ALTER TABLE deliveries RENAME TO deliveries_before")
        DeliveryTable(conn).create()
        conn.execute(
            "INSERT INTO deliveries (item_id, result_index, sink, state, target, url, attempts, error, updated_at) "
            "SELECT task_uuid, result_index, sink, state, target, url, attempts, error, updated "
            "FROM deliveries_before"
        )
        conn.execute("DROP TABLE deliveries_before")


def _interrupted(status: str, errors: str | None) -> bool:
    """Whether a task row is one a stopped server left (failed with taskInterrupted)."""
    if status != "error" or not errors:
        return False
    found = json.loads(errors)
    return bool(found) and found[0].get("code") == INTERRUPTED
