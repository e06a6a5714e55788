"""What the engine knows before it buys: unusable providers and unsent lookups on each request,
and what each provider has answered so far (the estimate's expected cost is built from it).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.add_column(sa.Column("unavailable_providers", JSON, nullable=True))
        batch.add_column(sa.Column("calls_not_sent", JSON, nullable=True))
    op.create_table(
        "provider_observations",
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("key_kind", sa.String(40), nullable=False),
        sa.Column("lookups", sa.Integer(), nullable=False),
        sa.Column("found", sa.Integer(), nullable=False),
        sa.Column("charged", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("fields", JSON, nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("provider", "key_kind", name="pk_provider_observations"),
    )


def downgrade() -> None:
    op.drop_table("provider_observations")
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.drop_column("calls_not_sent")
        batch.drop_column("unavailable_providers")
