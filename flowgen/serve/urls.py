"""Signed image URLs of `flowgen serve`: `/v1/images/<imageUUID>.<ext>?expires=T&signature=S`.

An imageUUID is derived from the image's bytes, so it can be guessed by anyone who has the image:
it is never enough to fetch it. A URL the server hands out carries an HMAC-SHA256 of the name and
its expiry time, under a secret kept in the data dir (`url-signing.key`, mode 0600, made on first
start), so the URLs it gave before a restart still work; a URL stops answering at its expiry,
URL_LIFETIME_S (rounded up to the hour) after it was handed out, or at the image's ttl if sooner
(getResponse hands out a fresh one). A request
without a valid signature is answered as if the image did not exist, unless it carries the API key
of a key that owns the image (`Authorization: Bearer KEY`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

URL_LIFETIME_S = 24 * 3600  # how long a handed-out image URL works at least (a shorter ttl ends it sooner)
# expiries are rounded up to this step, so the URLs of one image handed out within it (the sync
# answer and the webhook of a result, say) are the same string
URL_EXPIRY_STEP_S = 3600
SECRET_FILE = "url-signing.key"


class ImageURLs:
    def __init__(self, secret: bytes):
        self._secret = secret

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> ImageURLs:
        """The signer of the server whose data dir is `data_dir` (its secret made on first use)."""
        path = Path(data_dir) / SECRET_FILE
        try:
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(secrets.token_hex(32))
        except FileExistsError:
            pass
        return cls(bytes.fromhex(path.read_text().strip()))

    def url(self, base_url: str, name: str, image_expires: float | None, now: float | None = None) -> str:
        """The signed URL of image file `name` (`<imageUUID>.<ext>`), valid for URL_LIFETIME_S from
        now (rounded up to URL_EXPIRY_STEP_S), or until the image's own expiry (its ttl) if sooner."""
        expires = (now if now is not None else time.time()) + URL_LIFETIME_S
        expires = math.ceil(expires / URL_EXPIRY_STEP_S) * URL_EXPIRY_STEP_S
        if image_expires is not None:
            expires = min(expires, image_expires)
        expires_at = math.ceil(expires)
        query = urlencode({"expires": expires_at, "signature": self._signature(name, expires_at)})
        return f"{base_url.rstrip('/')}/v1/images/{name}?{query}"

    def verify(self, name: str, expires: str | None, signature: str | None) -> bool | None:
        """True: signed and not expired; False: signed, but expired; None: no valid signature."""
        if not expires or not signature or not expires.isdigit() or len(expires) > 12:
            return None
        if not hmac.compare_digest(signature.encode(), self._signature(name, int(expires)).encode()):
            return None
        return int(expires) >= time.time()

    def _signature(self, name: str, expires: int) -> str:
        return hmac.new(self._secret, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()[:32]
