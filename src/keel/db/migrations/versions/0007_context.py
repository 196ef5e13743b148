"""The context manager (issue 13): conversations bound to an end user with a title and metadata, token
counts per stored message, rolling summaries, learned token factors per alias, and the context decision
in each audit record.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("end_user", sa.Text))
    op.add_column("conversations", sa.Column("title", sa.Text))
    op.add_column(
        "conversations",
        sa.Column("metadata", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.add_column("conversations", sa.Column("turns", sa.BigInteger, nullable=False, server_default="0"))
    op.execute(
        "UPDATE conversations c SET turns = (SELECT count(*) FROM conversation_messages m "
        "WHERE m.tenant_id = c.tenant_id AND m.conversation_id = c.id AND m.role = 'user')"
    )
    op.create_index("conversations_tenant_updated_idx", "conversations", ["tenant_id", "updated_at", "id"])
    op.add_column("conversation_messages", sa.Column("tokens", sa.Integer))
    op.add_column("conversation_messages", sa.Column("tokenizer", sa.Text))
    op.create_table(
        "conversation_summaries",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("conversation_id", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("covers_message_id", sa.BigInteger, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("tokenizer", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("prompt", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.ForeignKeyConstraint(
            ["tenant_id", "conversation_id"],
            ["conversations.tenant_id", "conversations.id"],
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "conversation_summaries_conv_idx",
        "conversation_summaries",
        ["tenant_id", "conversation_id", "version"],
        unique=True,
    )
    op.create_table(
        "token_factors",
        sa.Column("alias", sa.Text, primary_key=True),
        sa.Column("factor", sa.Float, nullable=False),
        sa.Column("samples", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.add_column("audit_requests", sa.Column("context", JSONB))


def downgrade() -> None:
    op.drop_column("audit_requests", "context")
    op.drop_table("token_factors")
    op.drop_index("conversation_summaries_conv_idx", table_name="conversation_summaries")
    op.drop_table("conversation_summaries")
    op.drop_column("conversation_messages", "tokenizer")
    op.drop_column("conversation_messages", "tokens")
    op.drop_index("conversations_tenant_updated_idx", table_name="conversations")
    op.drop_column("conversations", "turns")
    op.drop_column("conversations", "metadata")
    op.drop_column("conversations", "title")
    op.drop_column("conversations", "end_user")
