"""Tenants, API keys, and who a request is."""

from keel.tenants.principal import Principal, narrow
from keel.tenants.service import SCOPES, KeyInfo, Tenant, TenantService

__all__ = ["SCOPES", "KeyInfo", "Principal", "Tenant", "TenantService", "narrow"]
