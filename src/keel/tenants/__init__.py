"""Tenants, API keys, and who a request is."""

from keel.tenants.service import SCOPES, KeyInfo, Principal, Tenant, TenantService

__all__ = ["SCOPES", "KeyInfo", "Principal", "Tenant", "TenantService"]
