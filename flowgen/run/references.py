"""Reference images at run time: decoded once, upright (EXIF orientation), RGB."""

from __future__ import annotations

from collections import OrderedDict

from PIL import Image, ImageOps, UnidentifiedImageError


class ReferenceLoader:
    """Decodes reference files with a small LRU cache, since many items share a reference set."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def load(self, path: str) -> Image.Image:
        """The decoded image; raises ValueError with a one-line reason when it cannot be read."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        try:
            with Image.open(path) as raw:
                image = ImageOps.exif_transpose(raw).convert("RGB")
                image.load()
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as err:
            raise ValueError(f"unreadable reference image {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        self._cache[path] = image
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return image
