"""Who a request is: the key's tenant, scope and permissions."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from keel.errors import PermissionDeniedError


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's tenant and scope. Cached by the gateway, so immutable."""

    tenant_id: uuid.UUID
    tenant: str
    tier: str
    key_id: uuid.UUID
    scope: str
    label: str
    audit_content: bool = True  # False: audit records keep metadata only, no message content
    # The aliases this key may call: its tier's, tenant's and own lists intersected. None: every alias.
    allowed_models: frozenset[str] | None = None
    expires_at: float | None = None  # epoch seconds; None: the key never expires

    def allows(self, alias: str) -> bool:
        """Whether this caller may call model `alias`: every layer that calls a model asks this."""
        return self.allowed_models is None or alias in self.allowed_models

    def require_model(self, alias: str) -> None:
        """403 `model_not_allowed` naming the alias, unless `allows(alias)`."""
        if not self.allows(alias):
            raise PermissionDeniedError(
                f"This key may not use model {alias!r}.", param="model", code="model_not_allowed"
            )


def narrow(*allowlists: Iterable[str] | None) -> frozenset[str] | None:
    """The intersection of the lists that restrict anything; None or empty restricts nothing."""
    allowed: frozenset[str] | None = None
    for names in allowlists:
        if names:
            allowed = frozenset(names) if allowed is None else allowed & frozenset(names)
    return allowed
