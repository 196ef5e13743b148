"""What one template render may do, and the checks that keep each operation inside it.

Every check runs before the value it guards is built. The active `Budget` lives in a context variable of
the thread that renders; at compile time there is none, and the size checks still apply.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import SecurityError

MAX_NODES = 2_000  # syntax nodes in one template: Python's compile() of it holds the GIL, ~20 ms at this
MAX_RANGE = 10_000  # items in one range()
MAX_VALUE = 1_000_000  # characters or items in any one value a template builds
MAX_BUILT = 10_000_000  # characters or items built by checked operations over one render
MAX_STEPS = 50_000  # loop iterations and calls over one render
MAX_DEPTH = 100  # calls (macros, caller()) nested in one another
MAX_INT_BITS = 4_096  # integers a template computes
MAX_WIDTH = 10_000  # a width or precision in a %-format
RENDER_SECONDS = 0.05  # wall clock of one render, checked as it goes
RENDER_WAIT_SECONDS = 0.5  # the event loop's wait for a render thread, should one op outlast the above
COMPILE_WAIT_SECONDS = 5.0  # the event loop's wait for a compile (push check or first use)


class LimitExceeded(SecurityError):
    """The template asked for more than a render may do: too big, too many steps, too slow."""


@dataclass(slots=True)
class Budget:
    """What one render may still do; the active one lives in a context variable of the render's thread."""

    seconds: float
    deadline: float
    steps: int = MAX_STEPS
    built: int = MAX_BUILT
    depth: int = 0

    @classmethod
    def start(cls, seconds: float = RENDER_SECONDS) -> Budget:
        return cls(seconds, time.perf_counter() + seconds)

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise LimitExceeded(f"the template takes more than {MAX_STEPS} steps (loop iterations, calls)")
        if self.steps & 63 == 0:
            self.check_time()

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.depth -= 1
            raise LimitExceeded(f"calls nest more than {MAX_DEPTH} deep")

    def build(self, size: int) -> None:
        self.built -= size
        if self.built < 0:
            raise LimitExceeded(f"the template builds more than {MAX_BUILT} characters or items")
        self.check_time()

    def check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise LimitExceeded(f"the template takes longer than {self.seconds * 1000:g} ms to render")


BUDGET: ContextVar[Budget | None] = ContextVar("keel_template_budget", default=None)


def step() -> None:
    budget = BUDGET.get()
    if budget is not None:
        budget.step()


def building(size: int, what: str) -> None:
    """A value of `size` characters or items is about to be built: refuse it if too large."""
    if size > MAX_VALUE:
        raise LimitExceeded(f"{what} would build {size} characters or items (the limit is {MAX_VALUE})")
    budget = BUDGET.get()
    if budget is not None:
        budget.build(size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


def check_power(base: Any, exponent: Any) -> None:
    if not (_is_int(base) and _is_int(exponent)) or exponent <= 0 or abs(base) <= 1:
        return  # floats overflow at once; 0, 1 and -1 stay small
    if base.bit_length() * exponent > MAX_INT_BITS:
        raise LimitExceeded(f"{base} ** {exponent} is larger than {MAX_INT_BITS} bits")


def check_product(left: Any, right: Any) -> None:
    if _is_int(left) and _is_int(right):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise LimitExceeded(f"a product larger than {MAX_INT_BITS} bits")
    elif _is_int(right) and isinstance(left, str | bytes | list | tuple):
        building(len(left) * max(right, 0), "'*'")
    elif _is_int(left) and isinstance(right, str | bytes | list | tuple):
        building(len(right) * max(left, 0), "'*'")


def check_sum(left: Any, right: Any) -> None:
    if isinstance(left, str | bytes | list | tuple) and isinstance(right, str | bytes | list | tuple):
        building(len(left) + len(right), "'+'")


def check_printf(fmt: str) -> None:
    """Every width and precision of a %-format is at most MAX_WIDTH, and none comes from the arguments."""
    at = fmt.find("%")
    end = len(fmt)
    while at != -1:
        at += 1
        if at < end and fmt[at] == "(":  # a mapping key, which may hold parentheses of its own
            depth = 0
            while at < end:
                depth += {"(": 1, ")": -1}.get(fmt[at], 0)
                at += 1
                if depth == 0:
                    break
        while at < end and fmt[at] in "#0- +":
            at += 1
        for _ in ("width", "precision"):
            if at < end and fmt[at] == "*":
                raise LimitExceeded("a %-format width or precision may not come from the arguments ('*')")
            start = at
            while at < end and fmt[at].isdigit():
                at += 1
            if at - start > 6 or (at > start and int(fmt[start:at]) > MAX_WIDTH):
                raise LimitExceeded(f"a %-format width or precision above {MAX_WIDTH}")
            if at < end and fmt[at] == ".":
                at += 1
            else:
                break
        at = fmt.find("%", at + 1)


def check_modulo(left: Any) -> None:
    """A %-format is checked; a remainder of numbers is never larger than its operands."""
    if isinstance(left, str):
        check_printf(left)
    elif isinstance(left, bytes):
        check_printf(left.decode("latin-1"))


def replaced_size(text: Any, old: Any, new: Any, count: Any = None) -> int:
    """The length of `text.replace(old, new, count)`, for str or bytes, without building it."""
    times = text.count(old) if old else len(text) + 1
    if _is_int(count) and count >= 0:
        times = min(times, count)
    return len(text) + times * (len(new) - len(old))


def check_method(owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if name == "replace":
        old, new = (*args, kwargs.get("old"), kwargs.get("new"))[:2]
        if isinstance(old, type(owner)) and isinstance(new, type(owner)):
            count = args[2] if len(args) > 2 else kwargs.get("count")
            building(replaced_size(owner, old, new, count), "replace()")
    else:  # center, ljust, rjust, zfill: the first argument is the width
        width = args[0] if args else kwargs.get("width", 0)
        if _is_int(width):
            building(max(width, len(owner)), f"{name}()")
