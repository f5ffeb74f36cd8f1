"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one.

The new bytes go to `.NAME.PID.tmp` beside the target and are renamed over it. A process killed
mid-write (kill -9) leaves its temp file behind; the next run removes the temp files of processes
that no longer exist (remove_stale_temps), never those of a live one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from flowgen.run.lock import process_exists

_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


def temp_path_for(target: Path, pid: int | None = None) -> Path:
    """The temp file this process writes `target` through."""
    return target.parent / f".{target.name}.{os.getpid() if pid is None else pid}.tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder + fsync + os.replace."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def remove_stale_temps(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temp files (`.NAME.PID.tmp`) in `folders` whose writing process is gone; returns
    them. A missing folder is skipped; a file that cannot be removed stays (and is not returned)."""
    removed = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = _TEMP_NAME.fullmatch(entry.name)
            if match is None or process_exists(int(match["pid"])) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
