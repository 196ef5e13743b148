"""The Jinja environment templates compile in: Jinja's immutable sandbox, with every operation bounded.

Jinja's own sandbox stops template code from reaching Python internals but bounds neither CPU nor memory.
Here each way a template can build a large value is checked before the value is built (`*`, `**`, `+`,
`%`, `range`, the filters and string methods that take a size; see limits.py), and every loop iteration
and call counts against the render's step budget, which also watches its deadline. The checked operators
and filters are never constant-folded at compile time, so compiling does no template arithmetic at all.
`lipsum` is gone, and so are the string methods that can only be bounded by rewriting them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from jinja2 import StrictUndefined, nodes, pass_context
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from keel.prompts.bounded_filters import BOUNDED_FILTERS, bounded_range, checked, sized
from keel.prompts.limits import (
    BUDGET,
    MAX_NODES,
    LimitExceeded,
    building,
    check_method,
    check_modulo,
    check_power,
    check_product,
    check_sum,
    step,
)

# Filters the compiled code calls; their names are not identifiers, so templates cannot name them.
_LOOP = "keel:loop"  # every for loop's iterable
_CONCAT = "keel:concat"  # every `~`
_CAPTURED = "keel:captured"  # every `{% set %}...{% endset %}` and `{% filter %}` block's text
_CHECKED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "replace"})
_BLOCKED_METHODS = frozenset({"format", "format_map", "expandtabs", "translate", "maketrans", "join"})


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with size checks on the operators that can build large values, and a step budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # intercepted ones are also never constant-folded

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, auto_reload=False)
        del self.globals["lipsum"]
        self.globals["range"] = bounded_range
        self.filters.update({name: checked(name, f) for name, f in self.filters.items()})
        self.filters.update(BOUNDED_FILTERS)
        self.filters.update({_LOOP: _loop, _CONCAT: _concat, _CAPTURED: _captured})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            check_product(left, right)
        elif operator == "**":
            check_power(left, right)
        elif operator == "+":
            check_sum(left, right)
        else:
            check_modulo(left)
        return self.binop_table[operator](left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Every call is a step and one level deeper; what it returns is a value built."""
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str | bytes) and obj.__name__ in _CHECKED_METHODS:
            check_method(owner, obj.__name__, args, kwargs)
        budget = BUDGET.get()
        if budget is None:
            return super().call(context, obj, *args, **kwargs)
        budget.step()
        budget.enter()
        try:
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        sized(result, "a call")
        return result

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str | bytes) and attr in _BLOCKED_METHODS:
            return False  # they build values of any size: use the bounded filters (join, format)
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        return None  # str.format and format_map are blocked above, not wrapped

    def handle_exception(self, source: str | None = None) -> NoReturn:
        """Raise the render's error as it is: Jinja would first rewrite its traceback, compiling code for each
        template frame, which costs about a millisecond a frame when deep recursion is what failed."""
        error = sys.exc_info()[1]
        assert error is not None
        raise error

    def bounded_ast(self, source: str) -> nodes.Template:
        """Parse, then route what Jinja compiles to plain Python through the checks (see _Bounding)."""
        parsed = self.parse(source)
        if sum(1 for _ in parsed.find_all(nodes.Node)) > MAX_NODES:
            raise LimitExceeded(f"the template has more than {MAX_NODES} expressions and statements")
        ast = _Bounding().visit(parsed)
        assert isinstance(ast, nodes.Template)
        return ast


def _filter(node: Any, name: str, lineno: int) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=lineno)


class _Bounding(NodeTransformer):
    """Loops, `~` and captured blocks compile to plain Python that no sandbox hook sees: each is wrapped in
    a filter that counts its steps or checks its size."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node.iter = _filter(node.iter, _LOOP, node.lineno)
        return self.generic_visit(node)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT, node.lineno)

    def visit_AssignBlock(self, node: nodes.AssignBlock) -> nodes.Node:
        node.filter = _filter(node.filter, _CAPTURED, node.lineno)
        return self.generic_visit(node)

    def visit_FilterBlock(self, node: nodes.FilterBlock) -> nodes.Node:
        node.filter = _filter(node.filter, _CAPTURED, node.lineno)
        return self.generic_visit(node)


@pass_context
def _loop(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    """Each iteration of a for loop is one step (pass_context: never folded at compile time)."""
    for item in iterable:
        step()
        yield item


@pass_context
def _concat(context: Context, values: list[Any]) -> str:
    building(sum(len(v) if isinstance(v, str) else len(str(v)) for v in values), "'~'")
    joined: str = (markup_join if context.eval_ctx.autoescape else str_join)(values)
    return joined


@pass_context
def _captured(context: Context, text: Any) -> Any:
    return sized(text, "a captured block")
