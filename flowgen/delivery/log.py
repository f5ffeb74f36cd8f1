"""The delivery log: one table shape for what each result's sinks did, in a run's manifest and in the server's store.

A row per (result, sink): its state (`pending` until sent, then `ok` or `failed`; `withheld` when the
content check flagged the result), where it went (URLs redacted: flowgen.net.redact), how many
attempts it took and the last error; every attempt is kept in `delivery_attempts`. A run keys
results by (item_id, result_index), the server by (taskUUID, result index): both are
`item_id, result_index` here. `DeliveryTable` is the SQL on one connection; its owner serialises
the calls (the manifest: the run's thread; the store: its lock) and may call `add_first_states`
inside a transaction of its own, so that a result and its sinks' `pending` rows commit together.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from flowgen.delivery.http import Delivery

SINKS = ("upload", "webhook")  # in the order a result's sinks are sent
STATES = ("pending", "ok", "failed", "withheld")

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    item_id      TEXT    NOT NULL,
    result_index INTEGER NOT NULL,
    sink         TEXT    NOT NULL,  -- upload | webhook
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'ok', 'failed', 'withheld')),
    target       TEXT,              -- scheme://host/path (query strings such as signatures removed)
    url          TEXT,              -- upload: where the file now is (no query string)
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    updated_at   REAL    NOT NULL,
    PRIMARY KEY (item_id, result_index, sink)
);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id      TEXT    NOT NULL,
    result_index INTEGER NOT NULL,
    sink         TEXT    NOT NULL,
    run_id       TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   TEXT    NOT NULL,
    seconds      REAL,
    status_code  INTEGER,
    error        TEXT,
    outcome      TEXT    NOT NULL
);
"""

_COLUMNS = ("item_id", "result_index", "sink", "state", "target", "url", "attempts", "error", "updated_at")


class SinkState(NamedTuple):
    """A sink's first state, recorded with its result: `pending`, or `withheld` (and why)."""

    item_id: str
    result_index: int
    sink: str
    state: str
    error: str | None = None


@dataclass(frozen=True)
class SinkOutcome:
    """What one sink did for one result: the Delivery (None when nothing was sent: a bad URL, an
    unreadable file, and then `error` says why), where it went (redacted) and, for an upload that
    worked, where the file now is."""

    item_id: str
    result_index: int
    sink: str
    delivery: Delivery | None
    target: str
    url: str | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        return "ok" if self.delivery is not None and self.delivery.ok else "failed"

    @property
    def reason(self) -> str | None:
        """Why it failed: the error, else the last attempt's error, status or outcome (None when ok)."""
        if self.error or self.state == "ok" or self.delivery is None or not self.delivery.attempts:
            return self.error
        last = self.delivery.attempts[-1]
        return last.error or (f"HTTP {last.status_code}" if last.status_code else last.outcome)

    def attempt_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "attempt": a.number,
                "started_at": a.started_at,
                "seconds": a.seconds,
                "status_code": a.status_code,
                "error": a.error,
                "outcome": a.outcome,
            }
            for a in (self.delivery.attempts if self.delivery else [])
        ]


class DeliveryLog(Protocol):
    """Where a dispatcher records outcomes (flowgen.delivery.dispatch.Dispatcher): a run's manifest,
    the server's store. `thread_safe`: whether `record_delivery` may be called from delivery
    threads as each sink finishes; a log that is not (one SQLite connection used by a run's
    thread) gets its outcomes when its owner calls `Dispatcher.collect`."""

    thread_safe: bool

    def record_delivery(self, outcome: SinkOutcome, run_id: str) -> None: ...


class DeliveryTable:
    """The delivery tables on one connection (sqlite3's, or one with the same execute/executemany)."""

    def __init__(self, conn: Any):
        self.conn = conn

    def create(self) -> None:
        self.conn.executescript(SCHEMA)

    def add_first_states(self, rows: Iterable[SinkState]) -> None:
        """Record sinks' first states (a result rendered again starts its sinks over)."""
        now = time.time()
        self.conn.executemany(
            """INSERT INTO deliveries (item_id, result_index, sink, state, error, updated_at) VALUES (?,?,?,?,?,?)
               ON CONFLICT (item_id, result_index, sink) DO UPDATE SET state = excluded.state,
                   error = excluded.error, updated_at = excluded.updated_at""",
            [(*row, now) for row in rows],
        )

    def set_state(
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
        """Upsert one (result, sink) state; `attempts` adds to the count so far (a resend's)."""
        self.conn.execute(
            """INSERT INTO deliveries (item_id, result_index, sink, state, target, url, attempts, error, updated_at)
               VALUES (?,?,?,?,?,?,?,?,?)
               ON CONFLICT (item_id, result_index, sink) DO UPDATE SET state = excluded.state,
                   target = COALESCE(excluded.target, target), url = COALESCE(excluded.url, url),
                   attempts = attempts + excluded.attempts, error = excluded.error, updated_at = excluded.updated_at""",
            (item_id, result_index, sink, state, target, url, attempts, error, time.time()),
        )

    def add_attempts(self, item_id: str, result_index: int, sink: str, run_id: str, attempts: Iterable[dict]) -> None:
        """Append attempts (dicts with attempt, started_at, seconds, status_code, error, outcome)."""
        self.conn.executemany(
            """INSERT INTO delivery_attempts (item_id, result_index, sink, run_id, attempt, started_at, seconds,
                                              status_code, error, outcome) VALUES (?,?,?,?,?,?,?,?,?,?)""",
            [
                (
                    item_id,
                    result_index,
                    sink,
                    run_id,
                    a["attempt"],
                    a["started_at"],
                    a.get("seconds"),
                    a.get("status_code"),
                    a.get("error"),
                    a["outcome"],
                )
                for a in attempts
            ],
        )

    def record(self, outcome: SinkOutcome, run_id: str) -> None:
        """A sink's outcome: its attempts, then its state."""
        rows = outcome.attempt_rows()
        self.add_attempts(outcome.item_id, outcome.result_index, outcome.sink, run_id, rows)
        self.set_state(
            outcome.item_id,
            outcome.result_index,
            outcome.sink,
            outcome.state,
            target=outcome.target,
            url=outcome.url,
            error=outcome.reason,
            attempts=len(rows),
        )

    def rows(self, *, item_id: str | None = None, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows (of one result's item, and/or in some states) as dicts by column, ordered by result then sink."""
        where, args = [], []
        if item_id is not None:
            where.append("item_id = ?")
            args.append(item_id)
        if states is not None:
            states = tuple(states)
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        cursor = self.conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM deliveries"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY item_id, result_index, sink",
            tuple(args),
        )
        return [dict(zip(_COLUMNS, row)) for row in cursor.fetchall()]

    def attempts(self, item_id: str, result_index: int) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT sink, run_id, attempt, started_at, seconds, status_code, error, outcome FROM delivery_attempts "
            "WHERE item_id=? AND result_index=? ORDER BY id",
            (item_id, result_index),
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def delete(self, item_id: str) -> None:
        """Forget every row of `item_id`'s results (a server task run anew)."""
        for table in ("deliveries", "delivery_attempts"):
            self.conn.execute(f"DELETE FROM {table} WHERE item_id = ?", (item_id,))


def by_result(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[str]]:
    """Rows grouped by result: (item_id, result_index) -> its sinks in send order."""
    grouped: dict[tuple[str, int], list[str]] = {}
    for row in rows:
        grouped.setdefault((row["item_id"], row["result_index"]), []).append(row["sink"])
    return {rid: [sink for sink in SINKS if sink in sinks] for rid, sinks in grouped.items()}
