"""The prompt registry over HTTP (admin scope, the key's tenant only), and `POST /v1/feedback` (chat scope).

The same operations as `keel prompts ...`; the author of a change is the key's label.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from keel.errors import InvalidRequestError
from keel.gateway.deps import AdminDep, ComponentsDep, PrincipalDep
from keel.prompts import PromptSpec
from keel.tenants import Principal

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MoveLabel(_Body):
    version: int = Field(ge=1)
    reason: str = Field(default="", max_length=500)
    force: bool = False


class Reason(_Body):
    reason: str = Field(default="", max_length=500)


class StartExperiment(_Body):
    label: str = "production"
    weights: dict[int, int]
    unit: str = "user"


class Weights(_Body):
    weights: dict[int, int]


class StartCanary(_Body):
    version: int = Field(ge=1)
    percent: int
    label: str = "production"
    unit: str = "user"


class PromoteCanary(_Body):
    label: str = "production"
    reason: str = Field(default="", max_length=500)
    force: bool = False


class EndCanary(_Body):
    label: str = "production"
    reason: str = Field(default="", max_length=500)


class Feedback(_Body):
    request_id: str = Field(min_length=1, max_length=200)
    score: float = Field(strict=True)  # no booleans, no strings
    comment: str | None = Field(default=None, max_length=4000)


def author(principal: Principal) -> str:
    return principal.label or f"key {principal.key_id.hex[:8]}"


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.get("/v1/prompts")
async def list_prompts(principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    return {"object": "list", "data": await keel.prompts.list(principal.tenant_id)}


@router.post("/v1/prompts")
async def push_prompt(spec: PromptSpec, principal: AdminDep, keel: ComponentsDep) -> Response:
    pushed = await keel.prompts.push(principal.tenant_id, spec, author(principal))
    return _json(pushed, 201 if pushed["created"] else 200)


@router.get("/v1/prompts/{name}")
async def show_prompt(
    name: str,
    principal: AdminDep,
    keel: ComponentsDep,
    label: str | None = None,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    if label is not None and version is not None:
        raise InvalidRequestError("Name a label or a version, not both.", param="version")
    return await keel.prompts.show(principal.tenant_id, name, label=label, version=version)


@router.get("/v1/prompts/{name}/history")
async def prompt_history(name: str, principal: AdminDep, keel: ComponentsDep) -> dict[str, Any]:
    return await keel.prompts.history(principal.tenant_id, name)


@router.get("/v1/prompts/{name}/diff/{old}/{new}")
async def prompt_diff(
    name: str, old: int, new: int, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return {"object": "prompt.diff", "diff": await keel.prompts.diff(principal.tenant_id, name, old, new)}


@router.put("/v1/prompts/{name}/labels/{label}")
async def move_label(
    name: str, label: str, body: MoveLabel, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return await keel.prompts.promote(
        principal.tenant_id, name, body.version, label, author(principal), body.reason, force=body.force
    )


@router.delete("/v1/prompts/{name}/labels/{label}")
async def remove_label(
    name: str, label: str, principal: AdminDep, keel: ComponentsDep, reason: str = ""
) -> dict[str, Any]:
    return await keel.prompts.unlabel(principal.tenant_id, name, label, author(principal), reason)


@router.post("/v1/prompts/{name}/labels/{label}/rollback")
async def rollback_label(
    name: str, label: str, principal: AdminDep, keel: ComponentsDep, body: Reason | None = None
) -> dict[str, Any]:
    reason = body.reason if body else ""
    return await keel.prompts.rollback(principal.tenant_id, name, label, author(principal), reason)


@router.post("/v1/prompts/{name}/experiments", status_code=201)
async def start_experiment(
    name: str, body: StartExperiment, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return await keel.prompts.start_experiment(
        principal.tenant_id, name, body.label, body.weights, unit=body.unit, author=author(principal)
    )


@router.get("/v1/prompts/{name}/experiments/{label}")
async def experiment_status(
    name: str, label: str, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return await keel.prompts.status(principal.tenant_id, name, label)


@router.patch("/v1/prompts/{name}/experiments/{label}")
async def set_weights(
    name: str, label: str, body: Weights, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return await keel.prompts.set_weights(
        principal.tenant_id, name, label, body.weights, author=author(principal)
    )


@router.delete("/v1/prompts/{name}/experiments/{label}")
async def stop_experiment(
    name: str, label: str, principal: AdminDep, keel: ComponentsDep, reason: str = ""
) -> dict[str, Any]:
    return await keel.prompts.stop_experiment(
        principal.tenant_id, name, label, author=author(principal), reason=reason
    )


@router.post("/v1/prompts/{name}/canary", status_code=201)
async def start_canary(
    name: str, body: StartCanary, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return await keel.prompts.start_canary(
        principal.tenant_id,
        name,
        body.version,
        body.percent,
        label=body.label,
        unit=body.unit,
        author=author(principal),
    )


@router.get("/v1/prompts/{name}/canary")
async def canary_status(
    name: str, principal: AdminDep, keel: ComponentsDep, label: str = "production"
) -> dict[str, Any]:
    return await keel.prompts.status(principal.tenant_id, name, label)


@router.post("/v1/prompts/{name}/canary/promote")
async def promote_canary(
    name: str, body: PromoteCanary, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return await keel.prompts.promote_canary(
        principal.tenant_id, name, body.label, author(principal), body.reason, force=body.force
    )


@router.post("/v1/prompts/{name}/canary/abort")
async def abort_canary(
    name: str, body: EndCanary, principal: AdminDep, keel: ComponentsDep
) -> dict[str, Any]:
    return await keel.prompts.abort_canary(
        principal.tenant_id, name, body.label, author(principal), body.reason
    )


@router.post("/v1/feedback")
async def send_feedback(body: Feedback, principal: PrincipalDep, keel: ComponentsDep) -> dict[str, Any]:
    """End-user feedback on one answer; chat scope, since end-user apps send it."""
    return await keel.feedback.add(principal.tenant_id, body.request_id, body.score, body.comment)
