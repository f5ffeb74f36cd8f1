"""Reference image files: the one place flowgen opens one (validate, plan, run, regen, canary, serve).

A reference must be a regular file once symlinks are resolved, and at most MAX_REFERENCE_BYTES. Both
are checked with stat() before the file is opened (opening a device can have effects of its own),
and again with fstat() on the opened descriptor, so what is read is what was checked even if the
path is swapped in between. The open is non-blocking, so a FIFO swapped in cannot stall it, and a
hash reads at most the limit. A FIFO, /dev/zero or a symlink to either is refused at once instead of
being read forever.

JAX-free (the standard library only): `flowgen validate` and the planner use it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from flowgen.errors import ImageInputError

# The largest reference file read: any file within the pixel limit (flowgen.engine.references.images), even an
# uncompressed 16-bit 150 MP TIFF (~900 MB); a compressed photo is far smaller. Larger is refused
# before a byte is read. (Reads stream: the limit bounds time, not memory.)
MAX_REFERENCE_BYTES = 1024 * 1024 * 1024

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class ReferenceImageError(ImageInputError, ValueError):
    """A reference image flowgen refuses. `problem` completes a sentence about the file ('does not
    exist', 'is 13000x13000 (169,000,000 pixels); the limit is ...'), so each layer can name the file
    its own way; str() is 'reference image LABEL: PROBLEM'. A ValueError too, for the callers that
    turn unreadable inputs into per-item failures."""

    def __init__(self, label: str, problem: str):
        self.label, self.problem = label, problem
        super().__init__(f"reference image {label}: {problem}")


@contextmanager
def open_reference(
    path: str | os.PathLike, *, label: str | None = None, max_bytes: int = MAX_REFERENCE_BYTES
) -> Iterator[BinaryIO]:
    """The reference file, opened for reading after the checks above; ReferenceImageError otherwise."""
    label = label or str(path)
    _checked(_stat(path, label), path, label, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ReferenceImageError(label, _os_problem(err)) from None
    try:
        _checked(os.fstat(fd), path, label, max_bytes)  # the file actually opened
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def reference_sha256(path: str | os.PathLike, *, label: str | None = None, max_bytes: int = MAX_REFERENCE_BYTES) -> str:
    """sha256 of a reference file's bytes (what plans and records hash), reading at most `max_bytes`."""
    label = label or str(path)
    digest, size = hashlib.sha256(), 0
    with open_reference(path, label=label, max_bytes=max_bytes) as handle:
        while chunk := handle.read(min(1 << 20, max_bytes + 1 - size)):
            size += len(chunk)
            if size > max_bytes:  # it grew after the check
                raise ReferenceImageError(label, f"grew past {max_bytes:,} bytes while being read")
            digest.update(chunk)
    return digest.hexdigest()


def _stat(path: str | os.PathLike, label: str) -> os.stat_result:
    try:
        return os.stat(path)  # follows symlinks: the file a symlink names is what is judged
    except OSError as err:
        raise ReferenceImageError(label, _os_problem(err)) from None


def _checked(info: os.stat_result, path: str | os.PathLike, label: str, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        target = os.path.realpath(path)
        via = f" {target}," if Path(target) != Path(os.path.abspath(path)) else ""  # where a symlink leads
        raise ReferenceImageError(label, f"is not a regular file (it is{via} {kind})")
    if info.st_size > max_bytes:
        raise ReferenceImageError(label, f"is {info.st_size:,} bytes; the limit is {max_bytes:,} bytes")


def _os_problem(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "does not exist"
    if isinstance(err, PermissionError):
        return "cannot be read (permission denied)"
    if isinstance(err, NotADirectoryError):
        return "does not exist (a folder on its path is a file)"
    return f"cannot be opened ({err.strerror or type(err).__name__})"
