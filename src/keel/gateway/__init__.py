"""The HTTP surface: OpenAI-compatible routes, auth, limits, error envelope, middleware."""

from keel.gateway.deps import Components
from keel.gateway.middleware import GatewayMiddleware

__all__ = ["Components", "GatewayMiddleware"]
