"""The schema as SQLAlchemy Core tables. Alembic migrations create it; code queries through these."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    false,
    func,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("name", Text, nullable=False, unique=True),
    Column("tier", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("audit_content", Boolean, nullable=False, server_default=true()),  # False: metadata only
    Column("allowed_models", ARRAY(Text)),  # NULL: every alias its tier allows
    CheckConstraint("tier IN ('free', 'pro', 'enterprise')", name="tenants_tier_check"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("prefix", Text, nullable=False),
    Column("key_hash", LargeBinary, nullable=False, unique=True),
    Column("scope", Text, nullable=False),
    Column("label", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),  # NULL: never
    Column("allowed_models", ARRAY(Text)),  # NULL: every alias its tenant allows
    CheckConstraint("scope IN ('chat', 'admin')", name="api_keys_scope_check"),
    Index("api_keys_prefix_idx", "prefix"),
    Index("api_keys_tenant_idx", "tenant_id"),
)

conversations = Table(
    "conversations",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("id", Text, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

conversation_messages = Table(
    "conversation_messages",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("conversation_id", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("message", JSONB, nullable=False),  # the OpenAI-format message, as sent or produced
    Column("request_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    ForeignKeyConstraint(
        ["tenant_id", "conversation_id"],
        ["conversations.tenant_id", "conversations.id"],
        ondelete="CASCADE",
    ),
    Index("conversation_messages_conv_idx", "tenant_id", "conversation_id", "id"),
)

audit_requests = Table(
    "audit_requests",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("request_id", Text, nullable=False),  # Keel's own, unique
    Column("client_request_id", Text),  # the client's X-Request-Id, as sent
    Column("trace_id", Text, nullable=False, server_default=""),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("end_user", Text),
    Column("conversation_id", Text),
    Column("prompt", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("model_requested", Text, nullable=False),
    Column("model_answered", Text),
    Column("deployment", Text),
    Column("upstream_model", Text),
    Column("status", Text, nullable=False),  # "ok" | "error"
    Column("error", Text),
    Column("attempts", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("request", JSONB, nullable=False),  # exactly what went upstream: messages and parameters
    Column("retrieved", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("reply", JSONB),  # {"text", "tool_calls"}
    Column("finish_reason", Text),
    Column("input_tokens", Integer, nullable=False, server_default="0"),
    Column("output_tokens", Integer, nullable=False, server_default="0"),
    # No usage arrived (client gone mid-stream, stream failed): the tokens are counted from characters.
    Column("usage_estimated", Boolean, nullable=False, server_default=false()),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("stages", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("replay_of", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("audit_requests_tenant_request_idx", "tenant_id", "request_id"),
    Index(
        "audit_requests_tenant_client_request_idx",
        "tenant_id",
        "client_request_id",
        postgresql_where=text("client_request_id IS NOT NULL"),
    ),
    Index("audit_requests_tenant_time_idx", "tenant_id", "created_at", "id"),
    Index("audit_requests_time_idx", "created_at"),
)

usage_ledger = Table(
    "usage_ledger",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("end_user", Text),
    Column("model", Text, nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("estimated", Boolean, nullable=False, server_default=false()),  # counted, not reported
    Column("request_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("usage_ledger_tenant_time_idx", "tenant_id", "created_at"),
)

# --- the prompt registry (keel.prompts) -------------------------------------------------------------

prompts = Table(
    "prompts",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("prompts_tenant_name_idx", "tenant_id", "name", unique=True),
)

prompt_versions = Table(
    "prompt_versions",
    metadata,
    Column("prompt_id", UUID(as_uuid=True), ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("template", JSONB, nullable=False),  # a string (one system message) or [{role, content}]
    Column("variables", JSONB, nullable=False),  # {name: {type, required, default}}
    Column("config", JSONB, nullable=False),  # {alias, temperature, max_tokens, ...}
    Column("description", Text, nullable=False, server_default=""),
    Column("tags", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("author", Text, nullable=False, server_default=""),
    Column("content_hash", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("prompt_versions_hash_idx", "prompt_id", "content_hash", unique=True),
)

prompt_labels = Table(
    "prompt_labels",
    metadata,
    Column("prompt_id", UUID(as_uuid=True), ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True),
    Column("label", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("moved_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    ForeignKeyConstraint(
        ["prompt_id", "version"], ["prompt_versions.prompt_id", "prompt_versions.version"], ondelete="CASCADE"
    ),
)

prompt_label_moves = Table(
    "prompt_label_moves",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("prompt_id", UUID(as_uuid=True), ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False),
    Column("label", Text, nullable=False),
    Column("from_version", Integer),  # None: the label did not exist
    Column("to_version", Integer),  # None: the label was removed
    Column("author", Text, nullable=False, server_default=""),
    Column("reason", Text, nullable=False, server_default=""),
    Column("forced", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("prompt_label_moves_label_idx", "prompt_id", "label", "id"),
)

prompt_experiments = Table(
    "prompt_experiments",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("prompt_id", UUID(as_uuid=True), ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False),
    Column("label", Text, nullable=False),
    Column("kind", Text, nullable=False),  # "experiment" | "canary"
    Column("unit", Text, nullable=False),  # "tenant" | "user" | "conversation"
    Column("status", Text, nullable=False),  # "running" | "paused" | "promoted" | "aborted" | "ended"
    Column("slots", JSONB, nullable=False),  # 100 versions: a unit's hash picks one slot
    Column("baseline", Integer, nullable=False),
    Column("candidate", Integer),  # a canary's new version
    Column("author", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('experiment', 'canary')", name="prompt_experiments_kind_check"),
    CheckConstraint("unit IN ('tenant', 'user', 'conversation')", name="prompt_experiments_unit_check"),
    Index(
        "prompt_experiments_active_idx",
        "prompt_id",
        "label",
        unique=True,
        postgresql_where=text("status IN ('running', 'paused')"),
    ),
)

prompt_experiment_events = Table(
    "prompt_experiment_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "experiment_id",
        UUID(as_uuid=True),
        ForeignKey("prompt_experiments.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("event", Text, nullable=False),  # started, weights, paused, promoted, aborted, ended
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("author", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("prompt_experiment_events_idx", "experiment_id", "id"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("request_id", Text, nullable=False),
    Column("score", Float, nullable=False),  # as sent: 1, -1 or 0.0-1.0
    Column("value", Float, nullable=False),  # on one scale: 0.0 (bad) to 1.0 (good); -1 is 0.0
    Column("comment", Text),
    Column("prompt", JSONB, nullable=False, server_default=text("'{}'::jsonb")),  # the request's audit prompt
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("feedback_tenant_request_idx", "tenant_id", "request_id", unique=True),
)
