"""Telemetry: structured logs now; traces, metrics and the audit log come with the observability issue."""

from keel.telemetry.logging import configure_logging, request_id_var, tenant_var

__all__ = ["configure_logging", "request_id_var", "tenant_var"]
