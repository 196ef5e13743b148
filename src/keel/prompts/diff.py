"""A unified diff of two versions: template (message by message), variables and model config."""

from __future__ import annotations

import difflib

import yaml

from keel.prompts.store import StoredVersion


def version_text(version: StoredVersion) -> list[str]:
    lines: list[str] = []
    template = version.template
    if isinstance(template, str):
        lines += ["# template", *template.splitlines()]
    else:
        for number, message in enumerate(template):
            lines += [f"# messages[{number}] ({message['role']})", *message["content"].splitlines()]
    for title, data in (("variables", version.variables), ("model", version.config)):
        lines.append(f"# {title}")
        if data:
            lines += yaml.safe_dump(data, sort_keys=True, default_flow_style=False).splitlines()
    return lines


def unified(old: StoredVersion, new: StoredVersion) -> str:
    return "\n".join(
        difflib.unified_diff(
            version_text(old),
            version_text(new),
            fromfile=f"{old.name}@{old.version}",
            tofile=f"{new.name}@{new.version}",
            lineterm="",
        )
    )
