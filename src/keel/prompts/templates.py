"""Jinja2 templates in a bounded sandbox, with strict variables, compiled and rendered off the event loop.

Variable values are data: they are passed to a compiled template and never parsed as template text, so a
value like `{{ 7 * 7 }}` renders as itself. The sandbox (sandbox.py) stops template code from reaching
Python internals and bounds every operation; undefined names are errors; the rendered text is bounded while
it is produced. Compiling and rendering run in a worker thread that the event loop waits on for a bounded
time, so a template can neither hold the loop nor keep a request waiting (limits.py has the numbers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from jinja2 import Template, TemplateError, meta

from keel.errors import InvalidRequestError
from keel.prompts.limits import (
    BUDGET,
    COMPILE_WAIT_SECONDS,
    MAX_VALUE,
    RENDER_WAIT_SECONDS,
    Budget,
    LimitExceeded,
)
from keel.prompts.sandbox import BoundedEnvironment
from keel.prompts.spec import SAMPLING, type_problem

T = TypeVar("T")
Message = dict[str, Any]

_ENV = BoundedEnvironment()
_TRIAL_VALUES = {"string": "", "number": 0, "boolean": False, "list": []}  # a push-time render's values
_BROKEN = (TemplateError, RecursionError, SyntaxError, MemoryError)  # what compiling a bad template raises


class TemplateProblem(ValueError):
    """A template that cannot be pushed: syntax error, or a name that is not a declared variable."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def check_template(source: str, variables: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """At push time: the template parses and compiles, every name it reads is a declared variable, and a
    trial render (defaults, or empty values) stays within the limits: what the template alone shows."""
    try:
        ast = _ENV.bounded_ast(source)
    except LimitExceeded as exc:
        raise TemplateProblem(f"{where} is over a template limit: {exc}", where) from None
    except _BROKEN as exc:
        raise TemplateProblem(f"{where}: {_describe(exc)}", where) from None
    unknown = meta.find_undeclared_variables(ast) - set(variables) - set(_ENV.globals)
    if unknown:
        names = ", ".join(sorted(unknown))
        raise TemplateProblem(f"{where} uses undeclared variable(s): {names}", where)
    try:
        template = _ENV.from_string(ast)
    except _BROKEN as exc:
        raise TemplateProblem(f"{where}: {_describe(exc)}", where) from None
    trial = {
        name: declared["default"] if declared.get("default") is not None else _TRIAL_VALUES[declared["type"]]
        for name, declared in variables.items()
    }
    token = BUDGET.set(Budget.start())
    try:
        _generate(template, trial, MAX_VALUE)
    except _TooLong:
        problem = f"renders more than {MAX_VALUE} characters"
        raise TemplateProblem(f"{where} is over a template limit: {problem}", where) from None
    except (LimitExceeded, RecursionError) as exc:
        raise TemplateProblem(f"{where} is over a template limit: {_describe(exc)}", where) from None
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError):
        return  # it fails on these stand-in values, maybe not on real ones: the render reports that
    finally:
        BUDGET.reset(token)


async def check_templates(parts: list[tuple[str, str]], variables: Mapping[str, Mapping[str, Any]]) -> None:
    """`check_template` for each (where, source), in a worker thread with a wall-clock limit."""

    def check_all() -> None:
        for where, source in parts:
            check_template(source, variables, where)

    where = parts[0][0] if parts else "template"
    timeout = TemplateProblem(f"{where}: takes longer than {COMPILE_WAIT_SECONDS:g} s to check", where)
    await off_loop(check_all, COMPILE_WAIT_SECONDS, timeout)


async def off_loop(work: Callable[[], T], seconds: float, timed_out: Exception) -> T:
    """Run `work` in a worker thread; the caller waits `seconds` at most. A thread cannot be stopped, so
    the work itself must be bounded (it is: every operation is, and a render watches its own deadline):
    this is the backstop that keeps a slow one from holding the request."""
    future = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        return await asyncio.wait_for(future, seconds)
    except TimeoutError:
        raise timed_out from None


def compile_source(source: str) -> Template:
    return _ENV.from_string(_ENV.bounded_ast(source))


class _TooLong(Exception):
    """The output budget ran out."""


def _generate(template: Template, values: dict[str, Any], room: int) -> str:
    """The rendered text, checked piece by piece as it is produced: more than `room` raises _TooLong."""
    pieces: list[str] = []
    for piece in template.generate(values):
        room -= len(piece)
        if room < 0:
            raise _TooLong
        pieces.append(piece)
    return "".join(pieces)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it nests or recurses too deeply"
    if isinstance(exc, MemoryError):
        return "it is too large to compile"
    return str(exc)


@dataclass(frozen=True, slots=True)
class CompiledVersion:
    """One stored version, ready to render: what the resolver caches (versions never change)."""

    name: str
    version: int
    parts: tuple[tuple[str, Any], ...]  # (role, compiled template)
    variables: dict[str, dict[str, Any]]
    alias: str | None
    defaults: dict[str, Any]
    size: int  # characters of template text: what the cache weighs it by
    retrieval: dict[str, Any] | None = None  # the version's `retrieval:` (vector stores to search)

    @classmethod
    def build(
        cls, name: str, version: int, template: Any, variables: dict[str, Any], config: dict[str, Any]
    ) -> CompiledVersion:
        sources = (
            [("system", template)]
            if isinstance(template, str)
            else [(m["role"], m["content"]) for m in template]
        )
        try:
            parts = tuple((role, compile_source(source)) for role, source in sources)
        except _BROKEN as exc:  # stored before today's checks: the template's fault, not the server's
            raise InvalidRequestError(
                f"Prompt {name}@{version} does not compile: {_describe(exc)}",
                param="prompt",
                code="prompt_too_complex" if isinstance(exc, LimitExceeded) else "prompt_render_failed",
            ) from None
        return cls(
            name=name,
            version=version,
            parts=parts,
            variables=variables,
            alias=config.get("alias"),
            defaults={key: config[key] for key in SAMPLING if config.get(key) is not None},
            size=sum(len(source) for _, source in sources),
            retrieval=config.get("retrieval"),
        )

    @classmethod
    async def build_off_loop(
        cls, name: str, version: int, template: Any, variables: dict[str, Any], config: dict[str, Any]
    ) -> CompiledVersion:
        """`build` in a worker thread, waited on for COMPILE_WAIT_SECONDS at most."""
        timed_out = InvalidRequestError(
            f"Prompt {name}@{version} takes longer than {COMPILE_WAIT_SECONDS:g} s to compile.",
            param="prompt",
            code="prompt_too_complex",
        )
        build = lambda: cls.build(name, version, template, variables, config)  # noqa: E731
        return await off_loop(build, COMPILE_WAIT_SECONDS, timed_out)

    async def render_off_loop(self, given: dict[str, Any], max_chars: int) -> list[Message]:
        """`render` in a worker thread, waited on for RENDER_WAIT_SECONDS at most."""
        timed_out = InvalidRequestError(
            f"Prompt {self.name}@{self.version} takes longer than {RENDER_WAIT_SECONDS:g} s to render.",
            param="prompt",
            code="prompt_too_complex",
        )
        return await off_loop(lambda: self.render(given, max_chars), RENDER_WAIT_SECONDS, timed_out)

    def render(self, given: dict[str, Any], max_chars: int) -> list[Message]:
        """The messages, within `max_chars` in all and the render budget (steps, sizes, deadline)."""
        values = self.values(given)
        room = max_chars
        messages: list[Message] = []
        token = BUDGET.set(Budget.start())
        try:
            for role, template in self.parts:
                text = _generate(template, values, room)
                room -= len(text)
                messages.append({"role": role, "content": text})
        except _TooLong:
            raise InvalidRequestError(
                f"The rendered prompt {self.name}@{self.version} is longer than {max_chars} characters.",
                param="prompt.variables",
                code="prompt_too_large",
            ) from None
        except (LimitExceeded, RecursionError) as exc:
            raise InvalidRequestError(
                f"Prompt {self.name}@{self.version} is over a template limit: {_describe(exc)}.",
                param="prompt",
                code="prompt_too_complex",
            ) from None
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            # The template's own fault at render time: the sandbox refused, `{{ n / 0 }}`, `range("x")`.
            raise InvalidRequestError(
                f"Prompt {self.name}@{self.version} failed to render: {exc}",
                param="prompt",
                code="prompt_render_failed",
            ) from None
        finally:
            BUDGET.reset(token)
        return messages

    def values(self, given: dict[str, Any]) -> dict[str, Any]:
        """The declared variables: given ones type-checked, defaults for the rest; anything else is a 400."""
        for name in given:
            if name not in self.variables:
                declared = ", ".join(sorted(self.variables)) or "none"
                raise InvalidRequestError(
                    f"Prompt {self.name}@{self.version} has no variable {name!r} (declared: {declared}).",
                    param=f"prompt.variables.{name}",
                    code="unknown_variable",
                )
        values: dict[str, Any] = {}
        for name, declared_as in self.variables.items():
            if name not in given or given[name] is None:
                if declared_as["required"]:
                    raise InvalidRequestError(
                        f"Prompt {self.name}@{self.version} needs variable {name!r}.",
                        param=f"prompt.variables.{name}",
                        code="missing_variable",
                    )
                values[name] = declared_as["default"]
                continue
            problem = type_problem(declared_as["type"], given[name])
            if problem:
                raise InvalidRequestError(
                    f"Variable {name!r} of prompt {self.name}@{self.version} {problem}.",
                    param=f"prompt.variables.{name}",
                    code="invalid_variable",
                )
            values[name] = given[name]
        return values
