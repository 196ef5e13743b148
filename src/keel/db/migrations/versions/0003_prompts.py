"""The prompt registry: prompts, versions, labels and their moves, experiments, feedback.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_NOW = sa.text("now()")
_UUID = sa.text("gen_random_uuid()")
_EMPTY_LIST = sa.text("'[]'::jsonb")
_EMPTY_OBJECT = sa.text("'{}'::jsonb")


def _prompt_fk(primary_key: bool = False) -> sa.Column[object]:
    return sa.Column(
        "prompt_id",
        UUID(as_uuid=True),
        sa.ForeignKey("prompts.id", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        sa.Column(
            "tenant_id", UUID(as_uuid=True), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )
    op.create_index("prompts_tenant_name_idx", "prompts", ["tenant_id", "name"], unique=True)
    op.create_table(
        "prompt_versions",
        _prompt_fk(primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("template", JSONB, nullable=False),
        sa.Column("variables", JSONB, nullable=False),
        sa.Column("config", JSONB, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("tags", JSONB, nullable=False, server_default=_EMPTY_LIST),
        sa.Column("author", sa.Text, nullable=False, server_default=""),
        sa.Column("content_hash", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )
    op.create_index("prompt_versions_hash_idx", "prompt_versions", ["prompt_id", "content_hash"], unique=True)
    op.create_table(
        "prompt_labels",
        _prompt_fk(primary_key=True),
        sa.Column("label", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.ForeignKeyConstraint(
            ["prompt_id", "version"],
            ["prompt_versions.prompt_id", "prompt_versions.version"],
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "prompt_label_moves",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        _prompt_fk(),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("from_version", sa.Integer),
        sa.Column("to_version", sa.Integer),
        sa.Column("author", sa.Text, nullable=False, server_default=""),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("forced", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )
    op.create_index("prompt_label_moves_label_idx", "prompt_label_moves", ["prompt_id", "label", "id"])
    op.create_table(
        "prompt_experiments",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        _prompt_fk(),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("unit", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("slots", JSONB, nullable=False),
        sa.Column("baseline", sa.Integer, nullable=False),
        sa.Column("candidate", sa.Integer),
        sa.Column("author", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.CheckConstraint("kind IN ('experiment', 'canary')", name="prompt_experiments_kind_check"),
        sa.CheckConstraint(
            "unit IN ('tenant', 'user', 'conversation')", name="prompt_experiments_unit_check"
        ),
    )
    # At most one live experiment per label: the resolver reads it together with the label.
    op.create_index(
        "prompt_experiments_active_idx",
        "prompt_experiments",
        ["prompt_id", "label"],
        unique=True,
        postgresql_where=sa.text("status IN ('running', 'paused')"),
    )
    op.create_table(
        "prompt_experiment_events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "experiment_id",
            UUID(as_uuid=True),
            sa.ForeignKey("prompt_experiments.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("details", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
        sa.Column("author", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )
    op.create_index("prompt_experiment_events_idx", "prompt_experiment_events", ["experiment_id", "id"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "tenant_id", UUID(as_uuid=True), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("prompt", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )
    op.create_index("feedback_tenant_request_idx", "feedback", ["tenant_id", "request_id"], unique=True)
    # Canary statistics read the records of one experiment; only prompt traffic is indexed.
    for table in ("audit_requests", "feedback"):
        op.execute(
            f"CREATE INDEX {table}_experiment_idx ON {table} (tenant_id, (prompt->>'experiment'))"
            " WHERE prompt->>'experiment' IS NOT NULL"
        )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS audit_requests_experiment_idx")
    op.drop_table("feedback")
    op.drop_table("prompt_experiment_events")
    op.drop_table("prompt_experiments")
    op.drop_table("prompt_label_moves")
    op.drop_table("prompt_labels")
    op.drop_table("prompt_versions")
    op.drop_table("prompts")
