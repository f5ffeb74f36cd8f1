"""Input images of a task (imageUpload's `image`, `referenceImages` entries) in the forms the
protocol allows: an imageUUID this server stored, a data URI, plain base64, or an http(s) URL.

Every form ends as bytes checked by the same header rules as a recipe's reference files
(flowgen.recipe.validation.image_problem) before they are stored (content-addressed): a refused
image is never stored nor served. Stored images belong to the key that sent them (`owner`, its
digest): an imageUUID names an image only for a key that owns it. A URL is fetched by
flowgen.net.fetch: public destinations only unless the operator allows more (checked at connect
time, on every redirect hop), a byte limit, one wall-clock deadline for the whole fetch, and at
most `max_fetches_per_key` fetches in flight per key. Nothing else is ever read: a string that is
no accepted form is an error, never a path on this machine.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from flowgen.engine import MAX_SERVE_INPUT_PIXELS
from flowgen.net.fetch import FetchError, FetchSlots, TooManyFetches, fetch_bytes
from flowgen.net.policy import DestinationPolicy
from flowgen.net.redact import redact_url
from flowgen.net.transport import guarded_client
from flowgen.recipe.validation import image_problem
from flowgen.serve.protocol import ProtocolError, is_uuid
from flowgen.serve.store import ImageRejected, Store, StoredImage

_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
TOO_LARGE = "too large"  # _format_of: a header PIL refuses to open as a decompression bomb
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int = 32 * 1024 * 1024  # one decoded image
    fetch_timeout_s: float = 10.0  # a whole URL fetch, wall clock: DNS, connect, headers, body, redirects
    max_fetches_per_key: int = 4  # URL fetches one key may have in flight at once


class ImageInputs:
    def __init__(
        self,
        store: Store,
        limits: InputLimits = InputLimits(),
        client: httpx.Client | None = None,
        destinations: DestinationPolicy | None = None,
    ):
        """`destinations`: where URLs may be fetched from (default: public addresses plus
        $FLOWGEN_ALLOW_HOSTS); `client` replaces the guarded client built from it."""
        self.store, self.limits = store, limits
        policy = destinations if destinations is not None else DestinationPolicy.from_env()
        self.client = client or guarded_client(policy, max_connections=64)
        self.fetches = FetchSlots(limits.max_fetches_per_key)

    def close(self) -> None:
        self.client.close()

    def resolve(self, value: object, parameter: str, ttl: int | None = None, *, owner: str) -> StoredImage:
        """The stored image a task's input names, stored for (or already owned by) the key whose
        digest is `owner`; ProtocolError naming `parameter` otherwise."""
        if not isinstance(value, str) or not value.strip():
            raise ProtocolError(
                "invalidImage",
                f"{parameter}: must be an imageUUID, a data URI, base64 or an http(s) URL, got {type(value).__name__}",
                parameter=parameter,
            )
        value = value.strip()
        if is_uuid(value):
            stored = self.store.image(value) if self.store.owns_image(value, owner) else None
            if stored is None or not stored.path.exists():
                raise ProtocolError(
                    "invalidImage",
                    f"{parameter}: no image with imageUUID {value} on this server "
                    "(upload it with an imageUpload task first)",
                    parameter=parameter,
                )
            return stored
        if value.lower().startswith(("http://", "https://")):
            data = self._fetch(value, parameter, owner)
        elif value.lower().startswith("data:"):
            data = self._data_uri(value, parameter)
        else:
            data = self._base64(
                value, parameter, "is not an imageUUID, a data URI, an http(s) URL or base64 image data"
            )
        return self._store(data, parameter, ttl, owner)

    def _store(self, data: bytes, parameter: str, ttl: int | None, owner: str) -> StoredImage:
        """Check the bytes (size, format, image_problem's header rules), then store them for `owner`."""
        if len(data) > self.limits.max_bytes:
            raise ProtocolError(
                "invalidImage",
                f"{parameter}: the image is {len(data):,} bytes; the limit is {self.limits.max_bytes:,}",
                parameter=parameter,
            )
        fmt = _format_of(data)
        if fmt is None:
            raise ProtocolError(
                "invalidImage", f"{parameter}: not an image (JPEG, PNG, WEBP, GIF, BMP or TIFF)", parameter=parameter
            )

        def problem(path) -> str | None:  # image_problem words a bomb's size; anything else unknown is refused
            return image_problem(path, max_pixels=MAX_SERVE_INPUT_PIXELS) or (
                None if fmt in _FORMATS else "is too large to open"
            )

        try:
            return self.store.put_image(data, _FORMATS.get(fmt, "img"), ttl, owner=owner, check=problem)
        except ImageRejected as err:
            raise ProtocolError("invalidImage", f"{parameter}: the image {err}", parameter=parameter) from None

    def _data_uri(self, value: str, parameter: str) -> bytes:
        match = _DATA_URI.match(value)
        if match is None or not match.group("b64"):
            raise ProtocolError(
                "invalidImage", f"{parameter}: a data URI must read data:image/...;base64,<data>", parameter=parameter
            )
        return self._base64(value[match.end() :], parameter, "holds invalid base64 after 'base64,'")

    def _base64(self, text: str, parameter: str, why: str) -> bytes:
        # the encoded size bounds the decoded one: refuse before decoding a huge string
        if len(text) > self.limits.max_bytes * 4 // 3 + 4:
            raise ProtocolError(
                "invalidImage",
                f"{parameter}: the image is larger than {self.limits.max_bytes:,} bytes",
                parameter=parameter,
            )
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalidImage", f"{parameter}: {why}", parameter=parameter) from None

    def _fetch(self, url: str, parameter: str, owner: str) -> bytes:
        """The URL's body (see the module doc); ProtocolError naming `parameter`, the URL without
        its query string, and why. A refused destination reads the same whether or not anything
        listens there."""
        try:
            with self.fetches.take(owner):
                return fetch_bytes(
                    self.client, url, max_bytes=self.limits.max_bytes, timeout_s=self.limits.fetch_timeout_s
                )
        except TooManyFetches:
            raise ProtocolError(
                "tooManyRequests",
                f"{parameter}: this API key already has "
                f"{self.limits.max_fetches_per_key} image URLs being fetched; send the task again "
                "when they are done",
                parameter=parameter,
                http_status=429,
            ) from None
        except FetchError as err:
            raise ProtocolError("invalidImage", f"{parameter}: {redact_url(url)}: {err}", parameter=parameter) from None


def _format_of(data: bytes) -> str | None:
    """The image format its header names (a _FORMATS key), TOO_LARGE for a header PIL refuses as a
    decompression bomb (image_problem then says how large), None for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # the header only
                fmt = image.format
    except Image.DecompressionBombError:
        return TOO_LARGE
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    return fmt if fmt in _FORMATS else None
