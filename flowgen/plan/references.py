"""Reference images at plan time: content hash and pixel size, read once per file.

Files are opened as everywhere else (flowgen.engine.references.files: a regular file of bounded size,
so a FIFO or /dev/zero is an item error, not an endless read) and judged by the engine's header
check (flowgen.engine.references.images.image_header: the pixel limit), so plan refuses what run would.
"""

from __future__ import annotations

import os
from pathlib import Path

from flowgen.engine import ReferenceImageError, image_header, reference_sha256
from flowgen.plan.hashing import FileHashCache


class ReferenceInspector:
    """Hashes and sizes reference files; a file shared by many items is read once."""

    def __init__(self) -> None:
        self.hash_file = FileHashCache(reference_sha256)
        self._sizes: dict[str, tuple[int, int]] = {}
        self._errors: dict[str, str] = {}

    def inspect(self, path: str | os.PathLike) -> tuple[str, tuple[int, int]]:
        """(sha256, (width, height) upright) of a reference; raises ValueError with a one-line reason."""
        name = str(Path(path))
        if name in self._errors:
            raise ValueError(self._errors[name])
        try:
            if name not in self._sizes:  # the header first: a FIFO or a bomb is refused before hashing
                self._sizes[name] = image_header(name).upright_size
            digest = self.hash_file(name)
        except ReferenceImageError as err:
            self._errors[name] = str(err)
            raise ValueError(str(err)) from None
        except OSError as err:  # os.stat of the path, between the checks
            self._errors[name] = str(ReferenceImageError(name, f"cannot be read ({err.strerror or err})"))
            raise ValueError(self._errors[name]) from None
        return digest, self._sizes[name]
