"""Usage counted by Keel rather than reported by the model (the client left mid-stream, the stream
failed): `usage_ledger.estimated` and `audit_requests.usage_estimated`.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds such a column without rewriting the table.
    op.add_column(
        "usage_ledger", sa.Column("estimated", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.add_column(
        "audit_requests",
        sa.Column("usage_estimated", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("audit_requests", "usage_estimated")
    op.drop_column("usage_ledger", "estimated")
