"""API keys for `flowgen serve`: from $FLOWGEN_API_KEYS (comma-separated) or $FLOWGEN_API_KEY_FILE.

Keys come from the environment or a file, never from a recipe or the command line (a key on the
command line shows in `ps`). With no key configured the server is open, so it may only listen on a
loopback address. What a key sends belongs to it: the store records the key's SHA-256
(`key_digest`) as the owner of its tasks, uploads and images, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from flowgen.errors import FlowgenError

KEYS_ENV = "FLOWGEN_API_KEYS"
KEY_FILE_ENV = "FLOWGEN_API_KEY_FILE"


def load_keys(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The configured keys (empty: none configured). A key file holds one key per line; blank
    lines and lines starting with '#' are skipped."""
    env = os.environ if env is None else env
    keys = {key.strip() for key in env.get(KEYS_ENV, "").split(",") if key.strip()}
    file = env.get(KEY_FILE_ENV, "").strip()
    if file:
        try:
            text = Path(file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            raise FlowgenError(f"{KEY_FILE_ENV}={file}: cannot read the key file ({reason})") from None
        keys |= {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}
        if not keys:
            raise FlowgenError(f"{KEY_FILE_ENV}={file}: the key file holds no key (one key per line)")
    return frozenset(keys)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_can_listen(host: str, keys: frozenset[str]) -> None:
    """Refuse an open server on an address other machines can reach."""
    if not keys and not is_loopback(host):
        raise FlowgenError(
            f"--host {host}: no API key configured, so flowgen serve listens only on a loopback "
            f"address (127.0.0.1, ::1, localhost); set {KEYS_ENV} or {KEY_FILE_ENV}"
        )


class KeyCheck:
    """Whether a presented key is accepted: any key when none is configured (loopback only)."""

    def __init__(self, keys: frozenset[str]):
        self.keys = keys

    @property
    def open(self) -> bool:
        return not self.keys

    def accepts(self, key: object) -> bool:
        if self.open:
            return True
        if not isinstance(key, str) or not key:
            return False
        candidate = key.encode()
        # compare with every key in constant time so the answer's timing says nothing about which matched
        return any([hmac.compare_digest(candidate, known.encode()) for known in self.keys])


def key_digest(key: str) -> str:
    """What the server records of a key (task and image owners, sessions): its SHA-256, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
