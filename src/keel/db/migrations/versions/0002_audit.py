"""Audit records of model calls, the usage ledger, per-tenant content switch.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("audit_content", sa.Boolean, nullable=False, server_default=sa.true()))
    op.create_table(
        "audit_requests",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("trace_id", sa.Text, nullable=False, server_default=""),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("end_user", sa.Text),
        sa.Column("conversation_id", sa.Text),
        sa.Column("prompt", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("model_requested", sa.Text, nullable=False),
        sa.Column("model_answered", sa.Text),
        sa.Column("deployment", sa.Text),
        sa.Column("upstream_model", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("attempts", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("request", JSONB, nullable=False),
        sa.Column("retrieved", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("reply", JSONB),
        sa.Column("finish_reason", sa.Text),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("stages", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("replay_of", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("audit_requests_tenant_request_idx", "audit_requests", ["tenant_id", "request_id"])
    op.create_index("audit_requests_tenant_time_idx", "audit_requests", ["tenant_id", "created_at", "id"])
    op.create_index("audit_requests_time_idx", "audit_requests", ["created_at"])
    op.create_table(
        "usage_ledger",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("end_user", sa.Text),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("input_tokens", sa.Integer, nullable=False),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("usage_ledger_tenant_time_idx", "usage_ledger", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_table("usage_ledger")
    op.drop_table("audit_requests")
    op.drop_column("tenants", "audit_content")
