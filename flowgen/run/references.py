"""Reference images at run time: the one place a run (and regen) opens them.

Decoding is flowgen.engine.images.load_image's (JAX-free: PIL + numpy), with its limits: a file
whose header claims more than MAX_DECODE_PIXELS is refused before any pixel is decoded, and the
EXIF orientation is applied. The loader then converts to RGB, as runs always have (the engine
prepares the RGB image: resize, crop, scale).
"""

from __future__ import annotations

from collections import OrderedDict

from PIL import Image

from flowgen.engine.images import load_image
from flowgen.errors import ImageInputError


class ReferenceLoader:
    """Decodes reference files with a small LRU cache, since many items share a reference set."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def load(self, path: str) -> Image.Image:
        """The decoded image, upright and RGB; raises ValueError with a one-line reason naming the file."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        try:
            image = load_image(path)
            rgb = image.convert("RGB")
            rgb.load()
        except ImageInputError as err:
            raise ValueError(str(err)) from None
        except (OSError, ValueError, SyntaxError) as err:  # a conversion of damaged data
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"reference image {path}: cannot decode ({reason})") from None
        self._cache[path] = rgb
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return rgb

    def load_all(self, paths) -> list[Image.Image]:
        """Every reference of one job, in order (ValueError for the first unreadable one)."""
        return [self.load(path) for path in paths]
