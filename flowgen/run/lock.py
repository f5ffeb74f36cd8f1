"""One run per output folder: an OS file lock plus a heartbeat that tells running from dead.

`OUT/.flowgen/run.lock` is held with `fcntl.flock` for the whole run. The kernel drops the lock
when the process dies — kill -9 included — so a stale lock never blocks the next run: it simply
acquires the lock and marks the dead run's manifest row "died". While the lock is held, a thread
rewrites the lock file's JSON (pid, host, run id, heartbeat time) every few seconds, so `status`
can say "running" (lock held, recent heartbeat) or "died" (lock free, or a heartbeat that stopped
on a filesystem where flock is not shared between hosts).

A run records its end in the manifest a moment before it lets go of the lock (it still exports
manifest.jsonl). So that a client that sees the run ended can start the next one at once, the run
marks its lock file "ending" as soon as its end is recorded: `status` calls such a folder idle, and
a run that finds the lock held only by ending runs waits for them (at most ENDING_WAIT_SECONDS)
instead of being refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flowgen.errors import FlowgenError

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 5.0
STALE_AFTER_SECONDS = 60.0  # a heartbeat this old means the run is gone, whatever the lock says
ENDING_WAIT_SECONDS = 60.0  # how long a run waits for runs that recorded their end to let go


class FolderBusy(FlowgenError):
    """Another run holds this output folder."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a folder's lock, as its lock file says."""

    pid: int
    host: str
    run_id: str
    started_at: float
    heartbeat_at: float
    progress: dict
    ending: bool = False  # its end is recorded; it lets go of the lock in a moment

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"run {self.run_id} (pid {self.pid} on {self.host}, since {since})"


def lock_path(out_dir: str | Path) -> Path:
    from flowgen.run.manifest import STATE_DIR

    return Path(out_dir) / STATE_DIR / LOCK_NAME


class RunLock:
    """Context manager: hold `out_dir` for `run_id`, or raise FolderBusy naming the holder."""

    def __init__(
        self,
        out_dir: str | Path,
        run_id: str,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        path: Path | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.path = path or lock_path(out_dir)  # a shard's own lock file (flowgen.run.shards), else the folder's
        self.run_id = run_id
        self.heartbeat_seconds = heartbeat_seconds
        self.started_at = time.time()
        self.progress: dict = {}  # what the run has done so far, for `status` while it runs
        self.ending = False  # the run's end is recorded (see the module doc)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not acquire(fd, fcntl.LOCK_EX, self.out_dir, self.path):
            os.close(fd)
            raise FolderBusy(
                f"{self.out_dir}: {_who_holds(self.out_dir, self.path)} is using this output folder; "
                "wait for it to finish or stop it (Ctrl-C), then run again"
            ) from None
        self._fd = fd
        self.beat()
        self._thread = threading.Thread(target=self._beat_loop, name="flowgen-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def ended(self) -> None:
        """The run's end is recorded: runs starting now wait for this one to let go (module doc)."""
        self.ending = True
        try:
            self.beat()
        except OSError:  # a full disk: the next run is refused until this one lets go, as without the mark
            pass

    def beat(self) -> None:
        """Write the heartbeat (and progress) now; the thread also does every few seconds."""
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": self.run_id,
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
            "progress": self.progress,
            "ending": self.ending,
        }
        data = json.dumps(record).encode()
        # rewritten in place (not renamed): the lock belongs to this inode; padded so that a
        # shorter record leaves no tail of the longer one
        assert self._fd is not None, "beat() while the lock is held"
        os.pwrite(self._fd, data.ljust(max(1024, len(data))), 0)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.beat()
            except OSError:  # a full disk must not kill the run; status will call it stale
                pass


def _who_holds(out_dir: Path, path: Path) -> str:
    """Who holds a lock that could not be taken: the shard runs holding the folder (each holds the
    folder's lock shared, flowgen.run.shards), else the holder its lock file names."""
    from flowgen.run.shards import shard_states

    shards = shard_states(out_dir) if path == lock_path(out_dir) else []
    if shards:
        return ", ".join(f"shard {name}: {holder.describe() if holder else 'a run'}" for name, _, holder in shards)
    holder = read_holder(path)
    return holder.describe() if holder else "another run"


def folder_busy_check(out_dir: str | Path) -> None:
    """Raise FolderBusy now if a run holds `out_dir` (before starting one in the background)."""
    state, holder = folder_state(out_dir)
    if state != "idle":
        who = _who_holds(Path(out_dir), lock_path(out_dir))
        raise FolderBusy(
            f"{out_dir}: {who} is using this output folder; wait for it to finish or stop it, then run again"
        )


def process_exists(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one we may not signal counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def acquire(fd: int, kind: int, out_dir: str | Path, path: Path) -> bool:
    """Lock `fd` (the lock file `path` of `out_dir`) as `kind`; while only runs that recorded their
    end hold it, wait for them to let go (at most ENDING_WAIT_SECONDS). False: a run holds it."""
    deadline = time.monotonic() + ENDING_WAIT_SECONDS
    while not _try_lock(fd, kind, attempts=3):  # a `status` probe holds it for an instant
        state, _ = folder_state(out_dir) if path == lock_path(out_dir) else lock_state(path)
        if state != "idle" or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _try_lock(fd: int, kind: int, attempts: int = 1) -> bool:
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.1)
    return False


def read_holder(path: Path) -> Holder | None:
    try:
        record = json.loads(path.read_bytes().strip() or b"null")
        return Holder(
            int(record["pid"]),
            str(record["host"]),
            str(record["run_id"]),
            float(record["started_at"]),
            float(record["heartbeat_at"]),
            dict(record.get("progress") or {}),
            bool(record.get("ending", False)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def folder_state(out_dir: str | Path, now: float | None = None) -> tuple[str, Holder | None]:
    """("running", holder) while a live run holds the folder; ("stale", holder) when the lock is
    held but its heartbeat stopped (a hung process, or a lock not shared across hosts); ("idle",
    last holder or None) when no run holds it, or only a run that recorded its end and is letting go.

    Probing holds a shared lock for an instant when the lock is free; a run starting in that
    instant retries (RunLock tries three times, 0.1 s apart). While shard runs hold the folder
    (flowgen.run.shards), it is the first running shard's state and holder."""
    state, holder = lock_state(lock_path(out_dir), now)
    if state == "idle":
        from flowgen.run.shards import shard_states

        for _, shard_state, shard_holder in shard_states(out_dir, now):
            return shard_state, shard_holder
    return state, holder


def lock_state(path: Path, now: float | None = None) -> tuple[str, Holder | None]:
    """folder_state of one lock file: ("running" | "stale" | "idle", what its file says)."""
    holder = read_holder(path)
    if not path.exists():
        return "idle", None
    fd = os.open(path, os.O_RDONLY)
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return "idle", holder
    finally:
        os.close(fd)
    now = time.time() if now is None else now
    if holder is not None and now - holder.heartbeat_at > STALE_AFTER_SECONDS:
        return "stale", holder
    if holder is not None and holder.ending:  # its end is recorded: free in a moment (the module doc)
        return "idle", holder
    return "running", holder
