"""The golden-seed canary of a plan run by many processes: checked once, before any of them renders.

Every shard of a plan with a canary (`run --shard K/N`) calls `shared_canary` before its first
batch (`--distributed`'s processes check it all together instead: flowgen.run.distributed). The
first shard to take `.flowgen/shards/canary.lock` checks the canary (flowgen.run.canary) and writes
its verdict to `.flowgen/shards/canary.json`; the others wait on that lock (bounded: `run
--canary-wait`, a one-line error past it) and then take the verdict instead of checking again. So
the canary renders once and no shard renders a batch before it passed; a drifted verdict stops
every shard with the canary's own failure lines.

- The first shard, not shard 0: a shard rerun alone (killed earlier, or started before shard 0 by
  its scheduler) needs no other process, and a checker that dies frees the lock for the next one.
- A verdict is for the plan, the canary's settings and the engine identity it was checked with:
  shards whose engines differ (another GPU, JAX version or mesh) each check their own.
- A verdict is for the shards running together: a shard takes it when it waited for that check,
  or while a shard that checked or took it still runs. A shard started after all of them ended
  checks again, as a plain rerun does (the engine may have been mended, or changed, meanwhile).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowgen.errors import FlowgenError
from flowgen.plan.model import Plan
from flowgen.run.atomic import atomic_write_bytes
from flowgen.run.canary import check_canary
from flowgen.run.engine import Engine
from flowgen.run.manifest import Manifest
from flowgen.run.shards import shard_states, shards_dir

VERDICTS_NAME = "canary.json"
LOCK_NAME = "canary.lock"
POLL_SECONDS = 0.2


def shared_canary(
    manifest: Manifest,
    plan: Plan,
    engine: Engine,
    run_id: str,
    shard_name: str,
    wait_seconds: float,
    note: Callable[[str], None] = lambda line: None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The canary's (verdicts, failure lines) for this shard, as check_canary returns them: the
    verdict of the shards running now on this plan and engine when there is one (see the module
    doc), else this shard's own check, recorded for the others. `note` says why the shard waits.
    Raises FlowgenError when the lock is not free within `wait_seconds` (nothing is rendered)."""
    assert plan.canary is not None
    folder = shards_dir(plan.out_dir)
    key = verdict_key(plan, engine)  # before waiting: the model loads on every shard at once
    with _CanaryLock(folder, run_id, shard_name, wait_seconds, note) as lock:
        known = {k: v for k, v in read_verdicts(folder).items() if v.get("plan_hash") == plan.plan_hash}
        found = known.get(key)
        if found is not None and (found["run_id"] in lock.waited_for or _in_use(found, plan.out_dir)):
            found["users"] = [*found["users"], run_id]
            _write_verdicts(folder, known)
            note(
                f"canary: {'FAILED' if found['failures'] else 'passed'} as shard {found['shard']} "
                f"(run {found['run_id']}) checked it; not checked again"
            )
            return found["verdicts"], found["failures"]
        verdicts, failures = check_canary(manifest, plan, engine, plan.canary, run_id)
        known[key] = {
            "plan_hash": plan.plan_hash,
            "shard": shard_name,
            "run_id": run_id,
            "users": [run_id],  # the runs that checked or took it
            "checked_at": time.time(),
            "verdicts": verdicts,
            "failures": failures,
        }
        _write_verdicts(folder, known)
        return verdicts, failures


def _in_use(verdict: dict[str, Any], out_dir: Path) -> bool:
    """Whether a shard run that checked or took the verdict still holds its shard lock."""
    users = set(verdict["users"])
    return any(holder is not None and holder.run_id in users for _, _, holder in shard_states(out_dir))


def verdict_key(plan: Plan, engine: Engine) -> str:
    """What a verdict is valid for: the plan, the canary's settings, the engine identity (a digest)."""
    assert plan.canary is not None
    text = json.dumps(
        {"plan": plan.plan_hash, "canary": [plan.canary.items, plan.canary.threshold_db], "engine": engine.identity()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


_FIELDS = {"plan_hash", "shard", "run_id", "users", "checked_at", "verdicts", "failures"}


def read_verdicts(folder: Path) -> dict[str, dict[str, Any]]:
    """The verdicts recorded in `folder` by key ({} when none; an unreadable file or entry counts as
    none: the shard then checks the canary itself)."""
    try:
        data = json.loads((folder / VERDICTS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, dict) and _FIELDS <= value.keys()}


def _write_verdicts(folder: Path, verdicts: dict[str, dict[str, Any]]) -> None:
    """Replace the verdicts file (under the canary lock)."""
    atomic_write_bytes(folder / VERDICTS_NAME, json.dumps(verdicts, sort_keys=True, default=str).encode())


class _CanaryLock:
    """Hold OUT/.flowgen/shards/canary.lock, waiting for the shard that holds it (it is checking the
    canary) up to `wait_seconds`; its file names the holder for the waiters' messages, and
    `waited_for` holds the run ids of the holders this shard waited for."""

    def __init__(self, folder: Path, run_id: str, shard_name: str, wait_seconds: float, note: Callable[[str], None]):
        self.path = folder / LOCK_NAME
        self.run_id, self.shard_name, self.wait_seconds, self.note = run_id, shard_name, wait_seconds, note
        self.fd: int | None = None
        self.waited_for: set[str] = set()

    def __enter__(self) -> _CanaryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder, holder_run = self._holder()
                if holder_run:
                    self.waited_for.add(holder_run)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise FlowgenError(
                        f"shard {self.shard_name}: {holder} is still checking the canary after "
                        f"{self.wait_seconds:g} s, so this shard rendered nothing; raise --canary-wait, or "
                        "stop that run and run this shard again (it then checks the canary itself)"
                    ) from None
                if not told:
                    self.note(f"waiting for the canary: {holder} is checking it (at most {self.wait_seconds:g} s)")
                    told = True
                time.sleep(POLL_SECONDS)
        record = {"shard": self.shard_name, "run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname()}
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def _holder(self) -> tuple[str, str | None]:
        """(the holder as messages name it, its run id or None)."""
        try:
            record = json.loads(self.path.read_text() or "null")
            shown = f"shard {record['shard']} (run {record['run_id']}, pid {record['pid']} on {record['host']})"
            return shown, str(record["run_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return "another shard", None
