"""Prompts as code: YAML files (one or more documents), or Markdown whose YAML front matter is the spec and
whose body is the template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from keel.prompts.spec import PromptSpec

MARKDOWN = (".md", ".markdown")


class PromptFileError(ValueError):
    pass


def load_prompt_file(path: Path) -> list[PromptSpec]:
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        documents = _markdown(source) if path.suffix.lower() in MARKDOWN else _yaml(source)
    except yaml.YAMLError as exc:
        raise PromptFileError(f"{path}: not valid YAML: {exc}") from None
    except PromptFileError as exc:
        raise PromptFileError(f"{path}: {exc}") from None
    specs = []
    for number, document in enumerate(documents, 1):
        where = f"{path}" if len(documents) == 1 else f"{path} (document {number})"
        if not isinstance(document, dict):
            raise PromptFileError(f"{where}: expected a mapping with name, template, ...")
        try:
            specs.append(PromptSpec.model_validate(document))
        except ValidationError as exc:
            raise PromptFileError(f"{where}: {_first_problem(exc)}") from None
    if not specs:
        raise PromptFileError(f"{path}: no prompt in it")
    return specs


def _yaml(source: str) -> list[Any]:
    return [document for document in yaml.safe_load_all(source) if document is not None]


def _markdown(source: str) -> list[Any]:
    lines = source.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise PromptFileError("a Markdown prompt starts with YAML front matter between --- lines")
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            break
    else:
        raise PromptFileError("the front matter has no closing --- line")
    front = yaml.safe_load("".join(lines[1:end])) or {}
    if not isinstance(front, dict):
        raise PromptFileError("the front matter must be a mapping")
    if "template" in front or "messages" in front:
        raise PromptFileError("in Markdown the body is the template: no 'template' or 'messages' key")
    return [{**front, "template": "".join(lines[end + 1 :]).strip("\n")}]


def _first_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{where + ': ' if where else ''}{first['msg']}{suffix}"
