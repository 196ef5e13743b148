"""How a chat request names a prompt: the `prompt` extension field, or header `X-Keel-Prompt: name@ref`.

`ref` is a label (`support-bot@staging`) or a version number (`support-bot@3`); no ref means `production`.
Variables always come in the body field. When both name a prompt they must agree.
"""

from __future__ import annotations

from typing import Any

from keel.errors import InvalidRequestError
from keel.prompts.spec import LABEL, NAME

HEADER = "x-keel-prompt"


def prompt_reference(field: dict[str, Any] | None, header: str | None) -> dict[str, Any] | None:
    """The pipeline's `ChatCall.prompt`: {name, label, version, variables}, or None without a prompt."""
    if field is None and header is None:
        return None
    reference: dict[str, Any] = {"name": None, "label": None, "version": None, "variables": {}}
    if header is not None:
        reference |= _parse_header(header)
    if field is not None:
        if field.get("name") is not None:
            if header is not None and field["name"] != reference["name"]:
                raise InvalidRequestError(
                    "The prompt field and the X-Keel-Prompt header name different prompts.",
                    param="prompt.name",
                )
            reference["name"] = field["name"]
        for key in ("label", "version"):
            if field.get(key) is not None:
                reference[key] = field[key]
        reference["variables"] = field.get("variables") or {}
    if reference["name"] is None:
        raise InvalidRequestError("The prompt needs a name.", param="prompt.name")
    if reference["label"] is not None and reference["version"] is not None:
        raise InvalidRequestError("Name a prompt label or a version, not both.", param="prompt.version")
    return reference


def _parse_header(value: str) -> dict[str, Any]:
    name, _, ref = value.strip().partition("@")
    if not NAME.match(name):
        raise InvalidRequestError(
            f"X-Keel-Prompt must be NAME, NAME@LABEL or NAME@VERSION, not {value[:80]!r}.",
            param="X-Keel-Prompt",
        )
    if not ref:
        return {"name": name}
    if ref.isdigit():
        return {"name": name, "version": int(ref)}
    if LABEL.match(ref):
        return {"name": name, "label": ref}
    raise InvalidRequestError(
        f"X-Keel-Prompt: {ref[:40]!r} is neither a label nor a version number.", param="X-Keel-Prompt"
    )
