"""Tables, columns, rows, the entity cache and enrichment requests.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tables",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tables"),
    )
    op.create_table(
        "columns",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("table_id", sa.String(40), nullable=False),
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("data_type", sa.String(20), nullable=False),
        sa.Column("field", sa.String(60), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["table_id"], ["tables.id"], name="fk_columns_table_id_tables", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_columns"),
        sa.UniqueConstraint("table_id", "key", name="uq_columns_table_id_key"),
    )
    op.create_index("ix_columns_table_id", "columns", ["table_id"])
    op.create_table(
        "rows",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("table_id", sa.String(40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("data", JSONType, nullable=False),
        sa.Column("meta", JSONType, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("last_run_at", TZ, nullable=True),
        sa.ForeignKeyConstraint(
            ["table_id"], ["tables.id"], name="fk_rows_table_id_tables", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rows"),
    )
    op.create_index("ix_rows_table_id_id", "rows", ["table_id", "id"])
    op.create_table(
        "entity_cache",
        sa.Column("entity_id", sa.String(400), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("found", sa.Boolean(), nullable=False),
        sa.Column("answer", JSONType, nullable=False),
        sa.Column("fetched_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("entity_id", "provider", name="pk_entity_cache"),
    )
    op.create_index("ix_entity_cache_expires_at", "entity_cache", ["expires_at"])
    op.create_table(
        "enrichment_requests",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("table_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("selection", JSONType, nullable=False),
        sa.Column("budget", sa.Float(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("cells_total", sa.Integer(), nullable=False),
        sa.Column("cells_done", sa.Integer(), nullable=False),
        sa.Column("cells_failed", sa.Integer(), nullable=False),
        sa.Column("cells_not_found", sa.Integer(), nullable=False),
        sa.Column("cells_skipped", sa.Integer(), nullable=False),
        sa.Column("rows_total", sa.Integer(), nullable=False),
        sa.Column("rows_written", sa.Integer(), nullable=False),
        sa.Column("entities", sa.Integer(), nullable=False),
        sa.Column("cache_hits", sa.Integer(), nullable=False),
        sa.Column("provider_calls", JSONType, nullable=False),
        sa.Column("cost_by_provider", JSONType, nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("budget_reserved", sa.Float(), nullable=False),
        sa.Column("estimate", JSONType, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("launched_at", TZ, nullable=True),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("updated_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_enrichment_requests"),
        sa.UniqueConstraint(
            "table_id", "idempotency_key", name="uq_enrichment_requests_table_id_idempotency_key"
        ),
    )
    op.create_index("ix_enrichment_requests_table_id", "enrichment_requests", ["table_id"])
    op.create_index(
        "ix_enrichment_requests_claim", "enrichment_requests", ["status", "priority", "created_at"]
    )


def downgrade() -> None:
    op.drop_table("enrichment_requests")
    op.drop_table("entity_cache")
    op.drop_table("rows")
    op.drop_table("columns")
    op.drop_table("tables")
