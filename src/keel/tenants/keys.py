"""API key material: random keys, shown once, stored as a hash with a short visible prefix."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

KEY_PREFIX = "sk-keel-"
VISIBLE_CHARS = 8  # random characters kept in the clear, to tell keys apart in lists
RANDOM_BYTES = 32
# token_urlsafe(32): 43 characters of the URL-safe base64 alphabet, no padding.
_SHAPE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]{43}")
_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str  # the whole key: returned to the user once, never stored
    prefix: str
    digest: bytes


def generate() -> NewKey:
    # 32 random bytes = 256 bits; a fast hash suffices for keys this long (no dictionary to attack).
    secret = KEY_PREFIX + secrets.token_urlsafe(RANDOM_BYTES)
    return NewKey(secret=secret, prefix=visible_prefix(secret), digest=digest(secret))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def visible_prefix(secret: str) -> str:
    return secret[: len(KEY_PREFIX) + VISIBLE_CHARS]


def well_formed(secret: str) -> bool:
    """Whether `secret` could be a Keel key at all: anything else is refused without a database query."""
    return _SHAPE.fullmatch(secret) is not None


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `45s`, `2w`: a key's lifetime."""
    found = _DURATION.fullmatch(text.strip().lower())
    if found is None or int(found[1]) == 0:
        raise ValueError(f"{text!r} is not a duration such as 90d, 12h, 30m, 45s or 2w")
    return timedelta(seconds=int(found[1]) * _UNIT_SECONDS[found[2]])
