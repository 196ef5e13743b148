"""API key material: random keys, shown once, stored as a hash with a short visible prefix."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

KEY_PREFIX = "sk-keel-"
VISIBLE_CHARS = 8  # random characters kept in the clear, to tell keys apart in lists


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str  # the whole key: returned to the user once, never stored
    prefix: str
    digest: bytes


def generate() -> NewKey:
    # 32 random bytes = 256 bits; a fast hash suffices for keys this long (no dictionary to attack).
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(secret=secret, prefix=visible_prefix(secret), digest=digest(secret))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def visible_prefix(secret: str) -> str:
    return secret[: len(KEY_PREFIX) + VISIBLE_CHARS]
