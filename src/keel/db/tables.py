"""The schema as SQLAlchemy Core tables. Alembic migrations create it; code queries through these."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
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
    # Bound to an end user (the `user` of its first turn): a request naming another user gets 404.
    Column("end_user", Text),
    Column("title", Text),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("turns", BigInteger, nullable=False, server_default="0"),  # user messages stored, ever
    Index("conversations_tenant_updated_idx", "tenant_id", "updated_at", "id"),
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
    # Counted once when written, by the counter named in `tokenizer` (a turn never re-counts its history;
    # a message counted by another tokenizer is counted again when a different alias reads it).
    Column("tokens", Integer),
    Column("tokenizer", Text),
    ForeignKeyConstraint(
        ["tenant_id", "conversation_id"],
        ["conversations.tenant_id", "conversations.id"],
        ondelete="CASCADE",
    ),
    Index("conversation_messages_conv_idx", "tenant_id", "conversation_id", "id"),
)

conversation_summaries = Table(
    "conversation_summaries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("conversation_id", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("covers_message_id", BigInteger, nullable=False),  # the last message folded into it
    Column("model", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("tokenizer", Text, nullable=False),
    Column("version", Integer, nullable=False),  # 1, 2, ... per conversation
    Column("prompt", JSONB, nullable=False, server_default=text("'{}'::jsonb")),  # the summary prompt used
    Column("request_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    ForeignKeyConstraint(
        ["tenant_id", "conversation_id"],
        ["conversations.tenant_id", "conversations.id"],
        ondelete="CASCADE",
    ),
    Index("conversation_summaries_conv_idx", "tenant_id", "conversation_id", "version", unique=True),
)

# Learned per alias: upstream-reported prompt tokens / Keel's estimate (for models without a local
# tokenizer). Starts at a conservative default and moves with every reported usage.
token_factors = Table(
    "token_factors",
    metadata,
    Column("alias", Text, primary_key=True),
    Column("factor", Float, nullable=False),
    Column("samples", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
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
    # The context decision: message ids sent, the summary used, tokens, turns dropped (replay resends it).
    Column("context", JSONB),
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

# --- costs (keel.costs) -----------------------------------------------------------------------------

# One row per upstream attempt that consumed tokens, in integer micro-dollars, with the price it used.
cost_ledger = Table(
    "cost_ledger",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("key_id", UUID(as_uuid=True)),
    Column("end_user", Text),  # hashed unless audit_end_user = "plain"
    Column("kind", Text, nullable=False, server_default="chat"),  # chat | embedding | summary | judge
    Column("alias", Text, nullable=False),
    Column("provider", Text, nullable=False),
    Column("upstream_model", Text, nullable=False),
    Column("deployment", Text),
    Column("attempt", Integer, nullable=False, server_default="1"),  # 1-based, within the request
    Column("input_tokens", Integer, nullable=False),  # cached ones included
    Column("cached_input_tokens", Integer, nullable=False, server_default="0"),
    Column("output_tokens", Integer, nullable=False),
    Column("estimated", Boolean, nullable=False, server_default=false()),  # counted, not reported
    Column("cost_micros", BigInteger, nullable=False),
    Column("price_source", Text, nullable=False),  # genai-prices@x.y.z, keel.toml, tenant-override, unpriced
    Column("prompt_name", Text),
    Column("prompt_version", Integer),
    Column("conversation_id", Text),
    Column("request_id", Text, nullable=False),
    Index("cost_ledger_tenant_time_idx", "tenant_id", "created_at"),
    Index("cost_ledger_tenant_request_idx", "tenant_id", "request_id"),
)

# Kept by a statement trigger on cost_ledger (migration 0008): a month's report reads ~30 rows per group.
cost_daily = Table(
    "cost_daily",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), primary_key=True),
    Column("day", Date, primary_key=True),  # UTC
    Column("alias", Text, primary_key=True),
    Column("key_id", Text, primary_key=True),  # '' when none
    Column("end_user", Text, primary_key=True),  # '' when none
    Column("prompt", Text, primary_key=True),  # NAME@VERSION, '' when none
    Column("calls", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
)

tenant_prices = Table(
    "tenant_prices",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("alias", Text, primary_key=True),
    Column("input", Float, nullable=False),  # USD per million tokens
    Column("cached_input", Float),
    Column("output", Float, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

budgets = Table(
    "budgets",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", UUID(as_uuid=True), ForeignKey("api_keys.id", ondelete="CASCADE")),  # NULL: any key
    Column("per_end_user", Boolean, nullable=False, server_default=false()),  # the limit is per `user`
    Column("period", Text, nullable=False),  # day | month (UTC calendar windows)
    Column("limit_micros", BigInteger, nullable=False),
    Column("soft_percents", ARRAY(Integer), nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("period IN ('day', 'month')", name="budgets_period_check"),
    CheckConstraint("limit_micros >= 0", name="budgets_limit_check"),
    Index(
        "budgets_scope_idx",
        "tenant_id",
        "key_id",
        "per_end_user",
        "period",
        unique=True,
        postgresql_nulls_not_distinct=True,
    ),
)

# One row per budget, window and subject ('' or the end user): what is spent and what is reserved.
budget_usage = Table(
    "budget_usage",
    metadata,
    Column("budget_id", UUID(as_uuid=True), ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True),
    Column("window_start", Date, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("spent", BigInteger, nullable=False, server_default="0"),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
    Column("limit_micros", BigInteger, nullable=False),  # the limit when last reserved against
)

# Reservations not yet settled; one past `expires_at` is freed by any replica (a dead one's included).
budget_leases = Table(
    "budget_leases",
    metadata,
    Column("lease_id", UUID(as_uuid=True), primary_key=True),
    Column("budget_id", UUID(as_uuid=True), primary_key=True),
    Column("window_start", Date, nullable=False),
    Column("subject", Text, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("budget_leases_expiry_idx", "expires_at"),
)

# A soft threshold crossed: one row per budget, window, subject and percent (so one webhook each).
budget_alerts = Table(
    "budget_alerts",
    metadata,
    Column("budget_id", UUID(as_uuid=True), ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True),
    Column("window_start", Date, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("percent", Integer, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Bumped in the transaction of every budget or tenant-price change; replicas poll it and reload.
costs_version = Table(
    "costs_version",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)
