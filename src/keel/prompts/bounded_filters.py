"""Jinja's filters that take a size or multiply their input, each checked before it builds anything.

They take the context (`pass_context`), which also keeps Jinja from running them at compile time on
constant arguments: a check that refuses must refuse at render time, where it is a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from jinja2 import filters, pass_context
from jinja2.runtime import Context

from keel.prompts.limits import MAX_RANGE, LimitExceeded, building, check_printf, replaced_size

T = TypeVar("T")


def sized(value: T, what: str) -> T:
    """A string, list or tuple just built counts against the render; one over MAX_VALUE stops it."""
    if isinstance(value, str | bytes | list | tuple):
        building(len(value), what)
    return value


def checked(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Any filter, its result checked: an input is a variable (bounded by the request) or a value built
    before (bounded by MAX_VALUE), so a filter that multiplies its input cannot be chained to any size."""
    passing = getattr(f, "jinja_pass_arg", None)  # set by Jinja's pass_context & co.
    kind = passing.name if passing is not None else None

    @pass_context
    def run(context: Context, *args: Any, **kwargs: Any) -> Any:
        if kind == "context":
            args = (context, *args)
        elif kind == "eval_context":
            args = (context.eval_ctx, *args)
        elif kind == "environment":
            args = (context.environment, *args)
        return sized(f(*args, **kwargs), name)

    return run


def bounded_range(*args: int) -> range:
    """`range`, at most MAX_RANGE items, counted against the render's budget."""
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise LimitExceeded(f"range() of {len(numbers)} items (the limit is {MAX_RANGE})")
    building(len(numbers), "range()")
    return numbers


@pass_context
def center(context: Context, value: Any, width: int = 80) -> str:
    text = str(value)
    building(max(width, len(text)), "center")
    return filters.do_center(text, width)


@pass_context
def indent(context: Context, s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    prefix = len(width) if isinstance(width, str) else max(width, 0)
    building(len(text) + (text.count("\n") + 1) * prefix, "indent")
    return filters.do_indent(text, width, first, blank)


@pass_context
def wordwrap(
    context: Context,
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    text = str(s)
    joint = len(wrapstring if wrapstring is not None else context.environment.newline_sequence)
    lines = min(len(text), len(text) // max(width, 1) + text.count("\n")) + 1
    building(len(text) + lines * joint, "wordwrap")
    return filters.do_wordwrap(
        context.environment, text, width, break_long_words, wrapstring, break_on_hyphens
    )


@pass_context
def format_(context: Context, value: Any, *args: Any, **kwargs: Any) -> str:
    text = str(value)
    check_printf(text)
    done = filters.do_format(text, *args, **kwargs)
    building(len(done), "format")
    return done


@pass_context
def join(context: Context, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    if attribute is not None:
        value = map(filters.make_attrgetter(context.environment, attribute), value)
    items = list(value)
    size = sum(len(item) if isinstance(item, str) else len(str(item)) for item in items)
    building(size + len(d) * max(len(items) - 1, 0), "join")
    return str(filters.do_join(context.eval_ctx, items, d))


@pass_context
def replace(context: Context, s: Any, old: str, new: str, count: int | None = None) -> str:
    building(replaced_size(str(s), str(old), str(new), count), "replace")
    return filters.do_replace(context.eval_ctx, s, old, new, count)


@pass_context
def batch(context: Context, value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
    building(linecount, "batch")
    return filters.do_batch(value, linecount, fill_with)


@pass_context
def slice_(context: Context, value: Iterable[Any], slices: int, fill_with: Any = None) -> Any:
    if slices > MAX_RANGE:
        raise LimitExceeded(f"slice into {slices} parts (the limit is {MAX_RANGE})")
    return filters.do_slice(value, slices, fill_with)


@pass_context
def sum_(
    context: Context, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0
) -> Any:
    if not isinstance(start, int | float):  # lists or strings: quadratic copies
        raise LimitExceeded("sum adds numbers only")
    return filters.do_sum(context.environment, iterable, attribute, start)


BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "batch": batch,
    "center": center,
    "format": format_,
    "indent": indent,
    "join": join,
    "replace": replace,
    "slice": slice_,
    "sum": sum_,
    "wordwrap": wordwrap,
}
