"""Audit: the client's own request id, apart from Keel's (which is always Keel's own, unique).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_requests", sa.Column("client_request_id", sa.Text))
    op.create_index(
        "audit_requests_tenant_client_request_idx",
        "audit_requests",
        ["tenant_id", "client_request_id"],
        postgresql_where=sa.text("client_request_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("audit_requests_tenant_client_request_idx", table_name="audit_requests")
    op.drop_column("audit_requests", "client_request_id")
