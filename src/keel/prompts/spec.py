"""What a prompt version holds, as pushed (YAML, Markdown front matter or the admin API), and its hash.

Pushed content is validated here once; a stored version is always a valid one. The content hash covers
template, variables and model config only: description, tags and labels do not make a new version.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

VariableType = Literal["string", "number", "boolean", "list"]
Role = Literal["system", "developer", "user", "assistant"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9._\-]{0,62}$")  # never all digits: `name@3` is a version
LATEST = "latest"  # always the newest version; nobody moves it
PRODUCTION = "production"  # what a request gets when it names neither label nor version
# ChatRequest fields a version sets
SAMPLING = ("temperature", "max_tokens", "top_p", "stop", "seed", "context_window")
MAX_TEMPLATE_CHARS = 100_000  # a version's template text, all messages together
MAX_NUMBER = 2**53  # a number variable's magnitude: JSON's exact integers, no `"-" * 10**18`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variable(_Strict):
    type: VariableType = "string"
    required: bool | None = None  # neither required nor default: required
    default: Any = None
    description: str = ""

    @model_validator(mode="after")
    def _required_or_default(self) -> Variable:
        if self.default is not None:
            if self.required:
                raise ValueError("a variable with a default cannot be required")
            problem = type_problem(self.type, self.default)
            if problem:
                raise ValueError(f"default {problem}")
            self.required = False
        elif self.required is None:
            self.required = True
        return self

    def canonical(self) -> dict[str, Any]:
        return {"type": self.type, "required": bool(self.required), "default": self.default}


class ModelSettings(_Strict):
    """The version's model config: defaults that explicit request fields override."""

    alias: str | None = None  # used when the request names no model
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: list[str] | None = Field(default=None, max_length=4)
    seed: int | None = None
    # lowers the alias's context window for this prompt (history trimmed sooner: cheaper, faster turns)
    context_window: int | None = Field(default=None, ge=256)

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RetrievalSettings(_Strict):
    """`retrieval:` a knowledge base the version searches on every turn (unless the request names one)."""

    vector_store_ids: list[str] = Field(min_length=1, max_length=16)
    max_num_results: int = Field(default=5, ge=1, le=50)


class MessageTemplate(_Strict):
    role: Role
    content: str = Field(min_length=1)


class PromptSpec(_Strict):
    """One prompt as kept in git: the YAML shape of `keel prompts push`, and the admin API's body."""

    name: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    variables: dict[str, Variable] = Field(default_factory=dict)
    model: ModelSettings = Field(default_factory=ModelSettings)
    retrieval: RetrievalSettings | None = None
    labels: list[str] = Field(default_factory=list)  # pointed at the pushed version afterwards
    template: str | None = Field(default=None, min_length=1)
    messages: list[MessageTemplate] | None = Field(default=None, min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME.match(name):
            raise ValueError("must be 1-128 letters, digits and . _ - , starting with a letter or digit")
        return name

    @field_validator("variables")
    @classmethod
    def _variable_names(cls, variables: dict[str, Variable]) -> dict[str, Variable]:
        for name in variables:
            if not name.isidentifier() or name.startswith("_"):
                raise ValueError(f"variable {name!r} must be an identifier that does not start with _")
        return variables

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        for label in labels:
            check_label(label)
        return labels

    @model_validator(mode="after")
    def _one_template(self) -> PromptSpec:
        if (self.template is None) == (self.messages is None):
            raise ValueError("give exactly one of 'template' (a system text) or 'messages'")
        size = len(self.template or "") + sum(len(m.content) for m in self.messages or [])
        if size > MAX_TEMPLATE_CHARS:
            raise ValueError(f"the template is {size} characters; the limit is {MAX_TEMPLATE_CHARS}")
        return self

    def template_json(self) -> str | list[dict[str, str]]:
        if self.template is not None:
            return self.template
        return [m.model_dump() for m in self.messages or []]

    def variables_json(self) -> dict[str, dict[str, Any]]:
        return {name: v.canonical() for name, v in sorted(self.variables.items())}

    def config(self) -> dict[str, Any]:
        """What a version stores as its config: the model settings, and `retrieval` when it has one."""
        config = self.model.canonical()
        if self.retrieval is not None:
            config["retrieval"] = self.retrieval.model_dump()
        return config

    def content_hash(self) -> str:
        return content_hash(self.template_json(), self.variables_json(), self.config())


def content_hash(template: Any, variables: dict[str, Any], config: dict[str, Any]) -> str:
    canonical = orjson.dumps(
        {"template": template, "variables": variables, "config": config}, option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(canonical).hexdigest()


def check_label(label: str) -> str:
    if not LABEL.match(label):
        raise ValueError(f"label {label!r} must be 1-63 letters, digits and . _ - , starting with a letter")
    return label


def type_problem(kind: str, value: Any) -> str | None:
    """Why `value` is not of variable type `kind`, or None when it is."""
    if kind == "string":
        ok = isinstance(value, str)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not -MAX_NUMBER <= value <= MAX_NUMBER:  # NaN and infinities fail this too
            return f"must be a number between -{MAX_NUMBER} and {MAX_NUMBER}"
    elif kind == "boolean":
        ok = isinstance(value, bool)
    else:  # a list of plain values: nothing with attributes a template could walk
        ok = isinstance(value, list) and all(isinstance(item, str | int | float | bool) for item in value)
    return None if ok else f"must be a {kind}, not {_json_type(value)}"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list" if not value else "a list with non-plain items"
    if value is None:
        return "null"
    return "an object"
