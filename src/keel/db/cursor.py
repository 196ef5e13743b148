"""Keyset-pagination cursors: (a timestamp, a key) as one opaque URL-safe string.

Lists page by `(time, key) < cursor`, newest first; the time travels as exact microseconds (PostgreSQL's
precision), so a page never skips or repeats a row that shares a second with its neighbour.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta

import orjson

from keel.errors import InvalidRequestError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_cursor(at: datetime, key: str) -> str:
    micros = (at - _EPOCH) // _MICROSECOND
    return base64.urlsafe_b64encode(orjson.dumps([micros, key])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The cursor's (time, key); a 400 on `after` for anything this API did not return."""
    try:
        micros, key = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(micros, int) or not isinstance(key, str):
            raise ValueError(cursor)
        at = _EPOCH + micros * _MICROSECOND
    except (ValueError, TypeError, OverflowError, OSError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidRequestError("'after' is not a cursor this API returned.", param="after") from None
    return at, key
