"""Jinja2 templates in a sandbox, with strict variables.

Variable values are data: they are passed to a compiled template and never parsed as template text, so a
value like `{{ 7 * 7 }}` renders as itself. The sandbox stops template code from reaching Python internals,
undefined names are errors, and the rendered text is bounded while it is produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.nodes import Template as TemplateAst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from keel.errors import InvalidRequestError
from keel.prompts.spec import SAMPLING, type_problem

Message = dict[str, Any]

_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False, auto_reload=False
)


class TemplateProblem(ValueError):
    """A template that cannot be pushed: syntax error, or a name that is not a declared variable."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def check_template(source: str, declared: set[str], where: str) -> None:
    """At push time: the template parses, and every name it reads is a declared variable."""
    try:
        ast: TemplateAst = _ENV.parse(source)
    except TemplateError as exc:
        raise TemplateProblem(f"{where}: {exc}", where) from None
    unknown = meta.find_undeclared_variables(ast) - declared - set(_ENV.globals)
    if unknown:
        names = ", ".join(sorted(unknown))
        raise TemplateProblem(f"{where} uses undeclared variable(s): {names}", where)


@dataclass(frozen=True, slots=True)
class CompiledVersion:
    """One stored version, ready to render: what the resolver caches (versions never change)."""

    name: str
    version: int
    parts: tuple[tuple[str, Any], ...]  # (role, compiled template)
    variables: dict[str, dict[str, Any]]
    alias: str | None
    defaults: dict[str, Any]

    @classmethod
    def build(
        cls, name: str, version: int, template: Any, variables: dict[str, Any], config: dict[str, Any]
    ) -> CompiledVersion:
        sources = (
            [("system", template)]
            if isinstance(template, str)
            else [(m["role"], m["content"]) for m in template]
        )
        return cls(
            name=name,
            version=version,
            parts=tuple((role, _ENV.from_string(source)) for role, source in sources),
            variables=variables,
            alias=config.get("alias"),
            defaults={key: config[key] for key in SAMPLING if config.get(key) is not None},
        )

    def render(self, given: dict[str, Any], max_chars: int) -> list[Message]:
        values = self.values(given)
        budget = max_chars
        messages: list[Message] = []
        for role, template in self.parts:
            pieces: list[str] = []
            try:
                for piece in template.generate(values):
                    budget -= len(piece)
                    if budget < 0:
                        raise InvalidRequestError(
                            f"The rendered prompt {self.name}@{self.version} is longer than "
                            f"{max_chars} characters.",
                            param="prompt.variables",
                            code="prompt_too_large",
                        )
                    pieces.append(piece)
            except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
                # The template's own fault at render time: the sandbox refused, `{{ n / 0 }}`, `range("x")`.
                raise InvalidRequestError(
                    f"Prompt {self.name}@{self.version} failed to render: {exc}",
                    param="prompt",
                    code="prompt_render_failed",
                ) from None
            messages.append({"role": role, "content": "".join(pieces)})
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
