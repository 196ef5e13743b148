"""Costs (issue 15): the cost ledger in micro-dollars, its daily rollup (kept by a statement trigger),
tenant price overrides, budgets with their windows, leases and soft-threshold alerts, and the version
row replicas poll to pick up budget and price changes.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, UUID

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# One upsert per (day, group) per written batch: the writer's COPY fires it once per table per batch.
# Rows are taken in key order, so two replicas' writers lock shared rollup rows in the same order.
ROLLUP_FUNCTION = """
CREATE FUNCTION cost_daily_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cost_daily AS d (tenant_id, day, alias, key_id, end_user, prompt, calls,
                                 input_tokens, cached_input_tokens, output_tokens, cost_micros)
    SELECT tenant_id,
           (created_at AT TIME ZONE 'UTC')::date,
           alias,
           coalesce(key_id::text, ''),
           coalesce(end_user, ''),
           coalesce(prompt_name || '@' || prompt_version::text, prompt_name, ''),
           count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost_micros)
    FROM new_rows
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (tenant_id, day, alias, key_id, end_user, prompt) DO UPDATE SET
        calls = d.calls + EXCLUDED.calls,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        cost_micros = d.cost_micros + EXCLUDED.cost_micros;
    RETURN NULL;
END
$$
"""

ROLLUP_TRIGGER = """
CREATE TRIGGER cost_ledger_rollup AFTER INSERT ON cost_ledger
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_daily_rollup()
"""


def upgrade() -> None:
    op.create_table(
        "cost_ledger",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("key_id", UUID(as_uuid=True)),
        sa.Column("end_user", sa.Text),
        sa.Column("kind", sa.Text, nullable=False, server_default="chat"),
        sa.Column("alias", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("upstream_model", sa.Text, nullable=False),
        sa.Column("deployment", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
        sa.Column("input_tokens", sa.Integer, nullable=False),
        sa.Column("cached_input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sa.Column("estimated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cost_micros", sa.BigInteger, nullable=False),
        sa.Column("price_source", sa.Text, nullable=False),
        sa.Column("prompt_name", sa.Text),
        sa.Column("prompt_version", sa.Integer),
        sa.Column("conversation_id", sa.Text),
        sa.Column("request_id", sa.Text, nullable=False),
    )
    op.create_index("cost_ledger_tenant_time_idx", "cost_ledger", ["tenant_id", "created_at"])
    op.create_index("cost_ledger_tenant_request_idx", "cost_ledger", ["tenant_id", "request_id"])
    op.create_table(
        "cost_daily",
        sa.Column("tenant_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("alias", sa.Text, primary_key=True),
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("end_user", sa.Text, primary_key=True),
        sa.Column("prompt", sa.Text, primary_key=True),
        sa.Column("calls", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_micros", sa.BigInteger, nullable=False),
    )
    op.execute(ROLLUP_FUNCTION)
    op.execute(ROLLUP_TRIGGER)
    op.create_table(
        "tenant_prices",
        sa.Column(
            "tenant_id",
            UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("alias", sa.Text, primary_key=True),
        sa.Column("input", sa.Float, nullable=False),
        sa.Column("cached_input", sa.Float),
        sa.Column("output", sa.Float, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "budgets",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column(
            "tenant_id", UUID(as_uuid=True), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("key_id", UUID(as_uuid=True), sa.ForeignKey("api_keys.id", ondelete="CASCADE")),
        sa.Column("per_end_user", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("period", sa.Text, nullable=False),
        sa.Column("limit_micros", sa.BigInteger, nullable=False),
        sa.Column("soft_percents", ARRAY(sa.Integer), nullable=False, server_default="{}"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("period IN ('day', 'month')", name="budgets_period_check"),
        sa.CheckConstraint("limit_micros >= 0", name="budgets_limit_check"),
    )
    op.create_index(
        "budgets_scope_idx",
        "budgets",
        ["tenant_id", "key_id", "per_end_user", "period"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.create_table(
        "budget_usage",
        sa.Column(
            "budget_id", UUID(as_uuid=True), sa.ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("window_start", sa.Date, primary_key=True),
        sa.Column("subject", sa.Text, primary_key=True),
        sa.Column("spent", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("limit_micros", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "budget_leases",
        sa.Column("lease_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("budget_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("window_start", sa.Date, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("budget_leases_expiry_idx", "budget_leases", ["expires_at"])
    op.create_table(
        "budget_alerts",
        sa.Column(
            "budget_id", UUID(as_uuid=True), sa.ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("window_start", sa.Date, primary_key=True),
        sa.Column("subject", sa.Text, primary_key=True),
        sa.Column("percent", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "costs_version",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO costs_version (id, version) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("costs_version")
    op.drop_table("budget_alerts")
    op.drop_index("budget_leases_expiry_idx", table_name="budget_leases")
    op.drop_table("budget_leases")
    op.drop_table("budget_usage")
    op.drop_index("budgets_scope_idx", table_name="budgets")
    op.drop_table("budgets")
    op.drop_table("tenant_prices")
    op.execute("DROP TRIGGER cost_ledger_rollup ON cost_ledger")
    op.execute("DROP FUNCTION cost_daily_rollup()")
    op.drop_table("cost_daily")
    op.drop_index("cost_ledger_tenant_request_idx", table_name="cost_ledger")
    op.drop_index("cost_ledger_tenant_time_idx", table_name="cost_ledger")
    op.drop_table("cost_ledger")
