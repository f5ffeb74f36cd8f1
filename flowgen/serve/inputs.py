"""Input images of a task (imageUpload's `image`, `referenceImages` entries) in the forms the
protocol allows: an imageUUID this server stored, a data URI, plain base64, or an http(s) URL.

Every form ends as bytes in the store (content-addressed), checked by the same header rules as a
recipe's reference files (flowgen.recipe.validation.image_problem). A URL is fetched with httpx
under a byte and a time limit; nothing else is ever read: a string that is no accepted form is an
error, never a path on this machine.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from flowgen.recipe.validation import image_problem
from flowgen.serve.protocol import ProtocolError, is_uuid
from flowgen.serve.store import Store, StoredImage

_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int = 32 * 1024 * 1024  # one decoded image
    fetch_timeout_s: float = 10.0  # a whole URL fetch: connect, headers and body


class ImageInputs:
    def __init__(self, store: Store, limits: InputLimits = InputLimits(), client: httpx.Client | None = None):
        self.store, self.limits = store, limits
        self.client = client or httpx.Client(follow_redirects=True, timeout=limits.fetch_timeout_s)

    def close(self) -> None:
        self.client.close()

    def resolve(self, value: object, parameter: str, ttl: int | None = None) -> StoredImage:
        """The stored image a task's input names; ProtocolError naming `parameter` otherwise."""
        if not isinstance(value, str) or not value.strip():
            raise ProtocolError("invalidImage", f"{parameter}: must be an imageUUID, a data URI, base64 or an "
                                f"http(s) URL, got {type(value).__name__}", parameter=parameter)
        value = value.strip()
        if is_uuid(value):
            stored = self.store.image(value)
            if stored is None or not stored.path.exists():
                raise ProtocolError("invalidImage", f"{parameter}: no image with imageUUID {value} on this server "
                                    "(upload it with an imageUpload task first)", parameter=parameter)
            return stored
        if value.lower().startswith(("http://", "https://")):
            data = self._fetch(value, parameter)
        elif value.lower().startswith("data:"):
            data = self._data_uri(value, parameter)
        else:
            data = self._base64(value, parameter, "is not an imageUUID, a data URI, an http(s) URL or base64 "
                                "image data")
        return self._store(data, parameter, ttl)

    def _store(self, data: bytes, parameter: str, ttl: int | None) -> StoredImage:
        if len(data) > self.limits.max_bytes:
            raise ProtocolError("invalidImage", f"{parameter}: the image is {len(data):,} bytes; the limit is "
                                f"{self.limits.max_bytes:,}", parameter=parameter)
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only
                fmt = image.format
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            fmt = None
        if fmt not in _FORMATS:
            raise ProtocolError("invalidImage", f"{parameter}: not an image (JPEG, PNG, WEBP, GIF, BMP or TIFF)",
                                parameter=parameter)
        stored = self.store.put_image(data, _FORMATS[fmt], ttl)
        problem = image_problem(stored.path)
        if problem:
            raise ProtocolError("invalidImage", f"{parameter}: the image {problem}", parameter=parameter)
        return stored

    def _data_uri(self, value: str, parameter: str) -> bytes:
        match = _DATA_URI.match(value)
        if match is None or not match.group("b64"):
            raise ProtocolError("invalidImage", f"{parameter}: a data URI must read data:image/...;base64,<data>",
                                parameter=parameter)
        return self._base64(value[match.end():], parameter, "holds invalid base64 after 'base64,'")

    def _base64(self, text: str, parameter: str, why: str) -> bytes:
        # the encoded size bounds the decoded one: refuse before decoding a huge string
        if len(text) > self.limits.max_bytes * 4 // 3 + 4:
            raise ProtocolError("invalidImage", f"{parameter}: the image is larger than {self.limits.max_bytes:,} "
                                "bytes", parameter=parameter)
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalidImage", f"{parameter}: {why}", parameter=parameter) from None

    def _fetch(self, url: str, parameter: str) -> bytes:
        limit, deadline = self.limits.max_bytes, time.monotonic() + self.limits.fetch_timeout_s
        try:
            with self.client.stream("GET", url, timeout=self.limits.fetch_timeout_s) as response:
                if response.status_code != 200:
                    raise ProtocolError("invalidImage", f"{parameter}: {url} answered HTTP {response.status_code}",
                                        parameter=parameter)
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    if time.monotonic() > deadline:  # httpx's timeout is per read: a slow drip passes it
                        raise httpx.ReadTimeout("the whole fetch took too long")
                    size += len(chunk)
                    if size > limit:
                        raise ProtocolError("invalidImage", f"{parameter}: {url} is larger than {limit:,} bytes",
                                            parameter=parameter)
                    chunks.append(chunk)
        except httpx.TimeoutException:
            raise ProtocolError("invalidImage", f"{parameter}: fetching {url} timed out after "
                                f"{self.limits.fetch_timeout_s:g} s", parameter=parameter) from None
        except httpx.HTTPError as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ProtocolError("invalidImage", f"{parameter}: cannot fetch {url} ({reason})",
                                parameter=parameter) from None
        return b"".join(chunks)
