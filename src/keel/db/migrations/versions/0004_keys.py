"""Keys: optional expiry; model permissions per tenant and per key.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True)))
    op.add_column("api_keys", sa.Column("allowed_models", ARRAY(sa.Text)))
    op.add_column("tenants", sa.Column("allowed_models", ARRAY(sa.Text)))


def downgrade() -> None:
    op.drop_column("tenants", "allowed_models")
    op.drop_column("api_keys", "allowed_models")
    op.drop_column("api_keys", "expires_at")
