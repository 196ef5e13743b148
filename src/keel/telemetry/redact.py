"""Redaction before storage: every string in a record passes through the configured patterns.

Bounded in time three ways: the patterns are linear (vetted at start-up, `pattern_check`); a string is
cut at `max_chars` before it is redacted (the cut is marked); and a long string is scanned in windows of
`CHUNK` characters, one short regex call each, so the thread that redacts (the write queue's worker, never
the event loop) lets the event loop's thread take the GIL between calls. A regex call holds the GIL for
its whole length: one call over 1 MB would stall every other thread of the process for ~0.3 s. A pattern
whose matches can be longer than MAX_OVERLAP (unbounded ones) may have a match cut at a window's end; the
rest is then matched (and masked) from there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import time
import uuid
from typing import Any

from keel.settings import REDACTION_HINTS

MASK = "[REDACTED]"
DEFAULT_MAX_CHARS = 262_144
CHUNK = 32_768  # match starts looked for per regex call: ~10-15 ms with the default patterns
MAX_OVERLAP = 16_384  # how far past its window a match may run (the longest pattern's width, at most this)

_parser: Any = importlib.import_module("re._parser")  # for a pattern's widest match (no public stub)


def truncated(value: str, max_chars: int) -> str:
    if len(value) <= max_chars:
        return value
    return f"{value[:max_chars]}[TRUNCATED {len(value) - max_chars} chars]"


def hash_end_user(tenant_id: uuid.UUID, user: str | None) -> str | None:
    """What audit stores for `user` unless `audit_end_user = "plain"`: stable per tenant, not reversible
    without the user id: the first 32 hex digits of sha256("TENANT_ID:USER")."""
    if user is None:
        return None
    return "sha256:" + hashlib.sha256(f"{tenant_id}:{user}".encode()).hexdigest()[:32]


class Redactor:
    """Picklable: it goes to the write queue's prepare process as its patterns, compiled there once."""

    def __init__(self, patterns: list[str], *, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self._config = (tuple(patterns), max_chars)
        self.max_chars = max_chars
        parsed = [_parser.parse(p).getwidth() for p in patterns]
        self._overlap = min(MAX_OVERLAP, max([64, *(widest for _, widest in parsed)]))
        # One pass per pattern, each behind its hint (a string it cannot match without): on ordinary
        # text almost every pattern is skipped by a substring test, and a single pattern keeps the
        # regex engine's literal-prefix search. Measured on 184 characters of plain text: 15 patterns
        # combined into one alternation 50 µs, one by one 34 µs, behind their hints 6 µs. A pattern is
        # also skipped for a string shorter than its narrowest match (most strings of a record are short:
        # roles, model names), one search finds whether a string holds any hint at all, and the flags are
        # read here, not per string: the benchmark's audit row (four short strings) 118 -> 9 µs.
        self._patterns = [
            (compiled, REDACTION_HINTS.get(p), bool(compiled.flags & re.IGNORECASE), narrowest)
            for p, compiled, (narrowest, _) in zip(
                patterns, (re.compile(p) for p in patterns), parsed, strict=True
            )
        ]
        self._unhinted = [entry for entry in self._patterns if entry[1] is None]
        self._narrowest = min((narrowest for narrowest, _ in parsed), default=0)
        self._any_hint = _any_hint([hint for _, hints, _, _ in self._patterns for hint in hints or ()])

    def __reduce__(self) -> tuple[Any, tuple[tuple[str, ...], int]]:
        return _shared, self._config

    def text(self, value: str, *, max_chars: int | None = None) -> str:
        value = truncated(value, self.max_chars if max_chars is None else max_chars)
        if len(value) < self._narrowest or not self._patterns:
            return value
        # One scan for every hint at once: where there is none (the usual case), only the patterns
        # without hints run; where there is one, each hinted pattern tests its own.
        patterns = self._patterns
        if self._any_hint is not None and self._any_hint.search(value.lower()) is None:
            patterns = self._unhinted
        lowered: str | None = None  # made once, for the case-insensitive patterns' hints
        for pattern, hints, folded, narrowest in patterns:
            if narrowest > len(value):
                continue
            if hints is not None:
                if folded:
                    lowered = value.lower() if lowered is None else lowered
                    seen = lowered
                else:
                    seen = value
                if not any(hint in seen for hint in hints):
                    continue
            value = _sub(pattern, value, self._overlap)
            lowered = None  # the text may have changed
        return value

    def value(self, value: Any) -> Any:
        """Strings anywhere in nested dicts and lists; keys and other types untouched."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value


def _any_hint(hints: list[str]) -> re.Pattern[str] | None:
    """One pattern that finds any of the hints in lowered text; None when it could miss one.

    Checked once on the string before any masking, it stands for every later check: masking cannot make
    a hint appear, because MASK holds none and a hint across a mask's edge would hold its `[` or `]`.
    For ASCII hints, `hint in text` implies `hint.lower() in text.lower()` (lowering maps characters one
    by one), so lowered text is searched for lowered hints, whatever the pattern's own case rule."""
    unsafe = any(
        not hint.isascii() or "[" in hint or "]" in hint or hint.lower() in MASK.lower() for hint in hints
    )
    if not hints or unsafe:
        return None
    return re.compile("|".join(re.escape(hint.lower()) for hint in sorted(set(hints))))


@functools.lru_cache(maxsize=8)
def _shared(patterns: tuple[str, ...], max_chars: int) -> Redactor:
    """One Redactor per configuration in a process that receives them pickled."""
    return Redactor(list(patterns), max_chars=max_chars)


def redacted_audit_row(redactor: Redactor, row: dict[str, Any]) -> dict[str, Any]:
    """An audit row as it is stored: its error, request and reply through the redactor. The write queue's
    `prepare` (`functools.partial(redacted_audit_row, redactor)`): runs in its process, off the loop."""
    redacted = dict(row)
    if row.get("error") is not None:
        redacted["error"] = redactor.text(row["error"])
    redacted["request"] = redactor.value(row["request"])
    if row.get("reply") is not None:
        redacted["reply"] = redactor.value(row["reply"])
    return redacted


def _sub(pattern: re.Pattern[str], text: str, overlap: int) -> str:
    """`pattern.sub(MASK, text)`, one window of CHUNK characters (plus `overlap`) per regex call.

    Matches are taken when they start inside the window's first CHUNK characters; the next window starts
    where the last match ended (or at the chunk's end), so a match across a boundary is found whole.
    Lookbehinds and `\\b` see the text before a window (`pos` does not cut the string).
    """
    if len(text) <= CHUNK + overlap:
        return pattern.sub(MASK, text)
    pieces: list[str] = []
    done = pos = 0
    size = len(text)
    while pos < size:
        end = min(size, pos + CHUNK)
        for found in pattern.finditer(text, pos, min(size, end + overlap)):
            start, stop = found.span()
            if start >= end:
                break
            if stop > start:
                pieces.append(text[done:start])
                pieces.append(MASK)
                done = stop
        pos = max(end, done)
        time.sleep(0)  # in a thread: let one that waits for the GIL (the event loop's) have it now
    pieces.append(text[done:])
    return "".join(pieces)
