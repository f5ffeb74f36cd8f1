"""Reference images at run time: the one place a run (and regen, canary, serve) decodes them.

Decoding is flowgen.engine.references.images.load_image's (JAX-free: PIL + numpy), with its limits: the file is
opened by flowgen.engine.references.files (a regular file of bounded size), a header claiming more
pixels than the limit is refused before any pixel is decoded, and the EXIF orientation is applied.
The loader then converts to RGB, as runs always have, and at once resizes a large reference to the
area the engine prepares it at (reduced_for_preparation; the engine's result is bit-identical), so
the full-size pixels are dropped as soon as they are decoded. Decoded images are cached by bytes.
"""

from __future__ import annotations

import threading

from PIL import Image

from flowgen.engine import ByteLRU, load_image, reduced_for_preparation, release_free_heap
from flowgen.errors import ImageInputError

# Many items share a reference set; a reduced reference is at most ~1 MP, 4 MiB as PIL holds RGB
# (4 bytes a pixel), so this keeps 32 or more of them.
CACHE_BYTES = 128 * 1024 * 1024


def image_bytes(image: Image.Image) -> int:
    """Memory a decoded RGB image holds (PIL stores each RGB pixel in 4 bytes)."""
    return image.width * image.height * 4


class ReferenceLoader:
    """Decodes reference files, keeping at most `cache_bytes` of decoded images (least recently used
    out). `max_pixels`: the pixel limit (default: recipes', flowgen.engine.references.images.MAX_DECODE_PIXELS;
    the server passes its lower MAX_SERVE_INPUT_PIXELS). Safe to share between threads (the server
    does); decoding runs outside the lock."""

    def __init__(self, cache_bytes: int = CACHE_BYTES, *, max_pixels: int | None = None):
        self.max_pixels = max_pixels
        self._cache: ByteLRU[Image.Image] = ByteLRU(cache_bytes, image_bytes)
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        return self._cache.nbytes

    def load(self, path: str) -> Image.Image:
        """The decoded image, upright, RGB and reduced; raises ValueError with a one-line reason
        naming the file."""
        with self._lock:
            image = self._cache.get(path)
        if image is not None:
            return image
        try:
            image = load_image(path, max_pixels=self.max_pixels)
            decoded = image.size
            if image.mode != "RGB":
                image = image.convert("RGB")  # (a copy when already RGB: skipped, same pixels)
            image = reduced_for_preparation(image)
            image.load()
            if image.size != decoded:  # the full-size pixels are garbage now: give their pages back
                release_free_heap()  # (glibc keeps freed 16 MiB blocks otherwise: +290 MB after 4x 64 MP)
        except ImageInputError as err:
            raise ValueError(str(err)) from None
        except MemoryError:
            raise ValueError(f"reference image {path}: not enough memory to decode it") from None
        except (OSError, ValueError, SyntaxError) as err:  # a conversion of damaged data
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"reference image {path}: cannot decode ({reason})") from None
        with self._lock:
            self._cache.put(path, image)
        return image

    def load_all(self, paths) -> list[Image.Image]:
        """Every reference of one job, in order (ValueError for the first unreadable one)."""
        return [self.load(path) for path in paths]
