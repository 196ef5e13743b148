"""Helpers for the prompt registry tests: the admin API over real HTTP, and waiting for audit records."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from keel.testing.server import KeelServer


class Admin:
    """The admin API of one Keel, as one tenant's admin key."""

    def __init__(self, server: KeelServer, key: str) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def call(self, method: str, path: str, expect: int | None = 200, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response.json()

    def push(self, spec: dict[str, Any], expect: int | None = None) -> Any:
        response = self.http.post("/prompts", json=spec)
        if expect is not None:
            assert response.status_code == expect, response.text
        else:
            assert response.status_code in (200, 201), response.text
        return response.json()

    def move(self, name: str, label: str, version: int, **body: Any) -> Any:
        return self.call("PUT", f"/prompts/{name}/labels/{label}", json={"version": version, **body})

    def record(self, request_id: str) -> dict[str, Any]:
        """The audit record is written off the critical path: wait for it to land."""
        deadline = time.monotonic() + 10
        while True:
            response = self.http.get(f"/requests/{request_id}")
            if response.status_code == 200:
                found: dict[str, Any] = response.json()
                return found
            assert response.status_code == 404, response.text
            assert time.monotonic() < deadline, f"audit record of {request_id} never landed"
            time.sleep(0.05)


SpecFactory = Callable[..., dict[str, Any]]


@pytest.fixture
def prompt_name() -> str:
    return f"bot-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_admin() -> Iterator[Callable[[KeelServer, str], Admin]]:
    """Admin API clients for any server and key; closed after the test."""
    made: list[Admin] = []

    def make(server: KeelServer, key: str) -> Admin:
        made.append(Admin(server, key))
        return made[-1]

    yield make
    for each in made:
        each.http.close()


@pytest.fixture
def admin(keel: KeelServer, tenant: Any, make_admin: Callable[[KeelServer, str], Admin]) -> Admin:
    """The session server's admin API, as the test's fresh tenant."""
    return make_admin(keel, tenant.admin_key)


@pytest.fixture
def spec() -> SpecFactory:
    """A support-bot prompt spec: `spec(name, template=..., **overrides)`."""
    return support_bot


def support_bot(
    name: str, template: str = "You are the {{ tone }} assistant of {{ company }}.", **extra: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "description": "First-line support",
        "variables": {
            "company": {"type": "string", "required": True},
            "tone": {"type": "string", "default": "friendly"},
        },
        "model": {"alias": "fake", "temperature": 0.2, "max_tokens": 64},
        "template": template,
    }
    spec.update(extra)
    return spec
