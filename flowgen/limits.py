"""The bounds on what a recipe (or a model card) makes flowgen read: file sizes, nesting depth, values.

A recipe may come from someone else, and a path in it may name anything: a FIFO or /dev/zero (an
endless read), a symlink to one, or a file of gigabytes. So read_limited opens a file without
blocking, requires a regular file, and checks its size against the limit before a byte is read;
the read itself stops one byte past the limit (the file may grow in between). Data nested deeper
than MAX_DEPTH is refused before anything walks it recursively (safe_yaml.py for YAML, the
dataset readers for JSON lines). Every refusal is one line. At the package's root, not in
flowgen.recipe: the engine's catalog reads model cards within the same bounds.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MIB = 1024 * 1024
# a recipe is settings and templates (parsing 512 KiB of YAML takes ~2 s); long lists belong in a dataset
MAX_RECIPE_BYTES = MIB // 2
MAX_DATASET_BYTES = 64 * MIB  # one CSV/JSONL dataset file (about a million short rows)
MAX_DEPTH = 64  # nesting levels of a recipe or a dataset row; a recipe needs about 6 (task.inputs.referenceImages)
MAX_VALUES = 250_000  # values in a recipe, aliases expanded: what MAX_RECIPE_BYTES holds without aliases


class FileProblem(Exception):
    """Why a file cannot be read, as the end of a one-line message: 'is a folder, expected a file'.
    too_large: refused for its size (the caller may add what to do instead)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path`, refused (FileProblem) past `limit` bytes.

    FileNotFoundError is left to the caller, which words "not found" in its own terms."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except IsADirectoryError:
        raise FileProblem("is a folder, expected a file") from None
    except FileNotFoundError:
        raise
    except OSError as err:
        raise FileProblem(f"cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd)
        if stat.S_ISDIR(mode.st_mode):
            raise FileProblem("is a folder, expected a file")
        if not stat.S_ISREG(mode.st_mode):
            raise FileProblem("is not a regular file (a device, FIFO or socket); expected a file")
        if mode.st_size > limit:
            raise FileProblem(f"is {mode.st_size:,} bytes, over the limit of {_size(limit)}", too_large=True)
        try:
            data = file.read(limit + 1)
        except OSError as err:
            raise FileProblem(f"cannot be read ({err.strerror})") from None
    if len(data) > limit:
        raise FileProblem(f"grew past the limit of {_size(limit)} while being read", too_large=True)
    return data


def _size(count: int) -> str:
    """A limit as people write it: 64 MiB, 512 KiB."""
    for unit, size in (("MiB", MIB), ("KiB", 1024)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count:,} bytes"


def deeper_than(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and mappings nest in `value` more than `limit` levels (a scalar is level 1)."""
    level, current = 1, [value]
    while current:
        if level > limit:
            return True
        current = [
            child
            for node in current
            if isinstance(node, (list, dict))
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        level += 1
    return False
