"""The full uploadEndpoint / webhookURL of results whose deliveries may still be sent, kept apart.

Records, manifest.jsonl and the server's task store hold URLs redacted (flowgen.net.redact): a
presigned upload's signature or a webhook's secret never reaches them. Sending a delivery again
later (after a kill, `flowgen redeliver`, a server restart) needs the URLs as given, so they are
kept here, one row per result, in a SQLite file created 0600 next to the manifest
(`OUT/.flowgen/sink-urls.sqlite`, or the server's data dir), which nothing exports. A row is
removed once its result has nothing left to send.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

FILE_NAME = "sink-urls.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sink_urls (
    id            TEXT    NOT NULL,   -- a run's item_id, a server's taskUUID
    result_index  INTEGER NOT NULL,
    upload        TEXT,               -- uploadEndpoint as given (placeholders unfilled)
    webhook       TEXT,               -- webhookURL as given
    PRIMARY KEY (id, result_index)
);
"""


class SinkURLs:
    """Opened on first write; reads of a file that does not exist find nothing. Thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.path.exists():
                if not create:
                    return None
                self.path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(self.path, 0o600)  # SQLite gives its journal the database file's mode
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA secure_delete=ON")  # a forgotten URL is overwritten, not left in a free page
            self._conn.executescript(_SCHEMA)
        return self._conn

    def keep(self, rows: Iterable[tuple[str, int, str | None, str | None]]) -> None:
        """Remember (id, result_index, uploadEndpoint, webhookURL) rows; durable when this returns."""
        rows = [row for row in rows if row[2] or row[3]]
        if not rows:
            return
        with self._lock:
            conn = self._open(create=True)
            assert conn is not None
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT OR REPLACE INTO sink_urls VALUES (?, ?, ?, ?)", rows)

    def get(self, id_: str, result_index: int) -> tuple[str | None, str | None] | None:
        """(uploadEndpoint, webhookURL) as given, or None when not kept."""
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return None
            row = conn.execute(
                "SELECT upload, webhook FROM sink_urls WHERE id = ? AND result_index = ?", (id_, result_index)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def forget(self, id_: str, result_index: int) -> None:
        with self._lock:
            conn = self._open(create=False)
            if conn is not None:
                conn.execute("DELETE FROM sink_urls WHERE id = ? AND result_index = ?", (id_, result_index))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
