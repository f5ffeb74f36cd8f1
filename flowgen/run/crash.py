"""A run ended by an unexpected exception: its traceback goes to the run's log, the user gets one line.

The executor records such a run as failed (with the reason) and removes the images it had written
but not recorded; this module only words the reason and writes the traceback.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path


def one_line(err: BaseException) -> str:
    """'ValueError: embedded null byte': the exception's type and the first line of its message."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def write_traceback(log_path: Path, err: BaseException, what: str) -> Path | None:
    """Append `err`'s full traceback to `log_path` (else to a file in the temp folder, when that one
    cannot be written: a full disk); returns where it went, or None when nowhere could take it."""
    text = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n" + "".join(
        traceback.format_exception(type(err), err, err.__traceback__)
    )
    for target in (log_path, Path(tempfile.gettempdir()) / f"flowgen-{log_path.name}"):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as log:
                log.write(text)
                log.flush()
                os.fsync(log.fileno())
            return target
        except OSError:
            continue
    return None
