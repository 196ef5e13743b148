"""Start-up vetting of redaction patterns: a pattern that can take super-linear time is refused.

Redaction runs over whatever text clients send, so one slow pattern is a way to burn the process's CPU.
Each configured pattern must (1) compile, (2) not match the empty string, (3) hold no nested variable
quantifiers (`(a+)+`, `(a{1,9})*`) and no adjacent unbounded quantifiers over overlapping characters
(`\\d+\\d*`, `\\w+\\s*\\w+`), and (4) pass a trial: a child process runs it over adversarial texts built
from the pattern's own literals and a few classics (`a.a.a.…`), and a pattern that takes more than
`TRIAL_SECONDS_PER_INPUT` on any of them, or does not finish in time, is refused, named in the error.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

_parser: Any = importlib.import_module("re._parser")  # the stdlib's regex parser (no public stub)
_c: Any = importlib.import_module("re._constants")

TRIAL_CHARS = 32_768  # length of each adversarial text
TRIAL_SECONDS_PER_INPUT = 0.05  # linear patterns take about 1 ms on 32 KB; a quadratic one ~0.3 s
TRIAL_TIMEOUT = 5.0  # the whole trial of every pattern, child process start included

_ALPHABET = frozenset(chr(i) for i in range(256))
_CATEGORIES = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
}
_CLASSICS = ("a.", "a", "a ", "1 ", "1-", "a@", "a-", "a:", "a/", "aA1", "\t", "-", ".", "=")

# The trial, in a child process: a catastrophic pattern cannot be interrupted in-process (the regex
# engine holds the GIL), so the parent kills the child at the deadline. Reads [[pattern, [inputs]]].
_TRIAL = f"""
import json, re, sys, time
LIMIT = {TRIAL_SECONDS_PER_INPUT}
for index, (pattern, inputs) in enumerate(json.load(sys.stdin)):
    print(json.dumps({{"start": index}}), flush=True)
    compiled, worst = re.compile(pattern), 0.0
    for text in inputs:
        began = time.perf_counter()
        compiled.sub("", text)
        worst = max(worst, time.perf_counter() - began)
        if worst > LIMIT:
            break
    print(json.dumps({{"done": index, "seconds": worst}}), flush=True)
"""


class UnsafePatternError(ValueError):
    """A configured pattern that could take super-linear time, or that is not a usable pattern."""


def check_patterns(patterns: Iterable[str], *, trial: bool = True) -> None:
    """Raise UnsafePatternError naming the first pattern that is refused."""
    patterns = list(patterns)
    for pattern in patterns:
        check_structure(pattern)
    if trial and patterns:
        run_trial(patterns)


def check_structure(pattern: str) -> None:
    try:
        re.compile(pattern)
        parsed = _parser.parse(pattern)
    except re.error as exc:
        raise UnsafePatternError(f"redact pattern {pattern!r} does not compile: {exc}") from None
    if parsed.getwidth()[0] == 0:
        raise UnsafePatternError(f"redact pattern {pattern!r} matches the empty string")
    ignore_case = bool(parsed.state.flags & re.IGNORECASE)
    problem = _walk(list(parsed), ignore_case)
    if problem is not None:
        raise UnsafePatternError(
            f"redact pattern {pattern!r} has {problem}, which can take super-linear time; "
            "use bounded repetition such as {1,64}"
        )


def _walk(items: list[Any], ignore_case: bool) -> str | None:
    """The first problem in a parsed sequence (recursively), or None."""
    for index, (op, av) in enumerate(items):
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            high, body = av[1], av[2]
            if high > 1 and name != "POSSESSIVE_REPEAT" and _has_variable_repeat(list(body), high):
                return "nested quantifiers"
            if high == _c.MAXREPEAT and _overlaps_next_unbounded(items, index, ignore_case):
                return "adjacent unbounded quantifiers over overlapping characters"
        for child in _children(op, av):
            problem = _walk(child, ignore_case)
            if problem is not None:
                return problem
    return None


def _children(op: Any, av: Any) -> list[list[Any]]:
    name = str(op)
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        return [list(av[2])]
    if name in ("SUBPATTERN", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT"):
        return [list(av[-1])]
    if name == "BRANCH":
        return [list(branch) for branch in av[1]]
    if name == "GROUPREF_EXISTS":
        return [list(branch) for branch in av[1:] if branch is not None]
    return []


def _has_variable_repeat(items: list[Any], outer_high: int) -> bool:
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, _ = av
            if low != high and (high == _c.MAXREPEAT or outer_high == _c.MAXREPEAT):
                return True
        if any(_has_variable_repeat(child, outer_high) for child in _children(op, av)):
            return True
    return False


def _overlaps_next_unbounded(items: list[Any], index: int, ignore_case: bool) -> bool:
    """An unbounded repeat followed, with only optional items between, by another unbounded repeat whose
    characters overlap: `\\d+\\d+`, `.*\\s*.*`. Every split between them is tried on a failing match."""
    first = _chars(items[index][1][2], ignore_case)
    if first is None:
        return False
    for op, av in items[index + 1 :]:
        name = str(op)
        if name not in ("MAX_REPEAT", "MIN_REPEAT"):
            return False
        low, high, body = av
        chars = _chars(body, ignore_case)
        if high == _c.MAXREPEAT and chars is not None and chars & first:
            return True
        if low > 0:
            return False
    return False


def _chars(body: Any, ignore_case: bool) -> frozenset[str] | None:
    """The (Latin-1) characters a one-character repeat body matches; None for anything longer."""
    items = list(body)
    while len(items) == 1 and str(items[0][0]) == "SUBPATTERN":
        items = list(items[0][1][-1])
    if len(items) != 1:
        return None
    op, av = items[0]
    name = str(op)
    chars: frozenset[str]
    if name == "LITERAL":
        chars = frozenset({chr(av)})
    elif name == "NOT_LITERAL":
        chars = _ALPHABET - {chr(av)}
    elif name == "ANY":
        chars = _ALPHABET
    elif name == "IN":
        chars = _in_chars(av)
    else:
        return None
    if ignore_case:
        chars = chars | {c.swapcase() for c in chars}
    return chars


def _in_chars(members: list[Any]) -> frozenset[str]:
    found: set[str] = set()
    negate = False
    for op, av in members:
        name = str(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            found.add(chr(av))
        elif name == "RANGE":
            found.update(chr(i) for i in range(av[0], min(av[1], 255) + 1))
        elif name == "CATEGORY":
            test = _CATEGORIES.get(str(av))
            if test is None:
                found.update(_ALPHABET)
            else:
                found.update(c for c in _ALPHABET if re.fullmatch(test, c))
    return _ALPHABET - found if negate else frozenset(found)


def adversarial_inputs(pattern: str) -> list[str]:
    """Long runs that look like the start of a match but never finish one, as they are and with a last
    character no pattern expects."""
    pieces = list(_CLASSICS)
    for literal in _literals(list(_parser.parse(pattern))):
        pieces.extend((literal, literal + "a", literal + "a."))
    runs = [(piece * (TRIAL_CHARS // len(piece) + 1))[:TRIAL_CHARS] for piece in dict.fromkeys(pieces)]
    return [text for run in runs for text in (run, run[:-1] + "\x00")]  # a run that ends badly, too


def _literals(items: list[Any]) -> list[str]:
    """Runs of literal characters in the pattern, at most 8."""
    found: list[str] = []
    run: list[str] = []
    for op, av in items:
        if str(op) == "LITERAL":
            run.append(chr(av))
            continue
        if run:
            found.append("".join(run))
            run = []
        for child in _children(op, av):
            found.extend(_literals(child))
    if run:
        found.append("".join(run))
    return found[:8]


def run_trial(patterns: list[str], *, timeout: float = TRIAL_TIMEOUT) -> None:
    payload = json.dumps([[p, adversarial_inputs(p)] for p in patterns])
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _TRIAL],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output, finished = done.stdout, done.returncode == 0
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or b""
        output, finished = raw.decode() if isinstance(raw, bytes) else raw, False
    started: int | None = None
    for line in output.splitlines():
        report = json.loads(line)
        if "start" in report:
            started = report["start"]
        elif report["seconds"] > TRIAL_SECONDS_PER_INPUT:
            pattern = patterns[report["done"]]
            raise UnsafePatternError(
                f"redact pattern {pattern!r} took {report['seconds']:.2f}s on a {TRIAL_CHARS}-character "
                "adversarial text: it is super-linear; use bounded repetition such as {1,64}"
            )
        else:
            started = None
    if not finished:
        culprit = patterns[started] if started is not None else patterns[0]
        raise UnsafePatternError(
            f"redact pattern {culprit!r} did not finish a trial on a {TRIAL_CHARS}-character adversarial "
            f"text within {timeout:g}s: it is super-linear; use bounded repetition such as {{1,64}}"
        )
