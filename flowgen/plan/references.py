"""Reference images at plan time: content hash and pixel size, read once per file."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from flowgen.plan.hashing import FileHashCache


class ReferenceInspector:
    """Hashes and sizes reference files; a file shared by many items is read once."""

    def __init__(self) -> None:
        self.hash_file = FileHashCache()
        self._sizes: dict[str, tuple[int, int]] = {}
        self._errors: dict[str, str] = {}

    def inspect(self, path: str | os.PathLike) -> tuple[str, tuple[int, int]]:
        """(sha256, (width, height)) of a reference; raises ValueError with a one-line reason."""
        name = str(Path(path))
        if name in self._errors:
            raise ValueError(self._errors[name])
        try:
            digest = self.hash_file(name)
            if name not in self._sizes:
                with Image.open(name) as image:  # reads the header only
                    self._sizes[name] = _upright_size(image)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            reason = f"unreadable reference image {name}: {_reason(err)}"
            self._errors[name] = reason
            raise ValueError(reason) from None
        return digest, self._sizes[name]


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation (5-8 rotate by 90°), as the engine will see the image."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not worth failing the item over
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, UnidentifiedImageError):
        return "not a readable image"
    return str(err).splitlines()[0] if str(err) else type(err).__name__
