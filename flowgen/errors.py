"""User-facing errors.

Every problem a user can cause (bad recipe, missing file, wrong checkpoint) raises a subclass of
FlowgenError with a one-line message naming the field or file and what is allowed. The CLI turns
them into `error: ...` on stderr and exit code 2 — never a traceback. RunCrashed (a run ended by a
bug) is printed the same way, with exit code 70.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class FlowgenError(Exception):
    """A problem with the user's input; the message is shown as is, on one line."""

    exit_code = 2


class CheckpointError(FlowgenError):
    """A weights file or folder is missing, unreadable, or does not match the model."""


class ImageInputError(FlowgenError):
    """A reference image is unreadable or outside the allowed sizes."""


class RecipeError(FlowgenError):
    """A recipe (or a --set override) is invalid. May carry several problems at once."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk (or the user's quota) is full."""
    return isinstance(err, OSError) and err.errno in _DISK_FULL


class StorageError(FlowgenError):
    """A file flowgen keeps its state in (a run's manifest, the server's task store) is corrupt or
    unreadable, or a file cannot be written because the disk is full. The message names the file
    and says what to do; the file is left as it was (SQLite rolls back what it could not commit)."""

    @classmethod
    def about(cls, path: str | Path, err: BaseException, kind: str = "state file") -> StorageError:
        """The one-line error for `err` (sqlite3.Error or OSError) met on `path`, a `kind` of file."""
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        lowered = text.lower()
        if disk_full(err) or "disk is full" in lowered:
            return cls(
                f"{path}: cannot write, the disk is full ({text}); what was recorded before is intact: "
                "free some space and run again"
            )
        if isinstance(err, sqlite3.DatabaseError) and ("not a database" in lowered or "malformed" in lowered):
            return cls(
                f"{path}: not a readable {kind} ({text}); it was left as it is: restore it from a backup, "
                "or move it aside to start a new one"
            )
        if "locked" in lowered:
            return cls(f"{path}: {kind} is locked by another process ({text}); try again when it has finished")
        return cls(f"{path}: cannot use this {kind} ({text})")


@contextmanager
def storage_errors(path: str | Path, kind: str = "state file") -> Iterator[None]:
    """Turn what the file or the disk can cause while using `path` (a corrupt or unreadable file, a full
    disk: OSError, sqlite3's OperationalError and plain DatabaseError) into one-line StorageErrors.
    sqlite3's other errors (a constraint or a statement flowgen got wrong) are bugs and stay as they are."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as err:
        raise StorageError.about(path, err, kind) from None
    except sqlite3.DatabaseError as err:
        if type(err) is not sqlite3.DatabaseError:  # IntegrityError, ProgrammingError, ...
            raise
        raise StorageError.about(path, err, kind) from None


class RunCrashed(Exception):
    """A run ended by an unexpected exception (a bug, not the user's input): recorded as failed in the
    manifest, its traceback written to a log; the message (one line) says where. Not a FlowgenError:
    callers that tell bad input from a failed run (`flowgen schedule`) count it as a failed run; the
    CLI prints it as one `error:` line all the same."""

    exit_code = 70  # sysexits' EX_SOFTWARE: an internal error
