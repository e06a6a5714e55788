"""AI workflows: AI columns' prompts, AI requests' results, and every LLM call's usage.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("columns") as batch:
        batch.add_column(sa.Column("prompt", sa.Text(), nullable=True))
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.add_column(sa.Column("result", JSON, nullable=True))
    op.create_table(
        "llm_calls",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(40), nullable=True),
        sa.Column("operation", sa.String(60), nullable=False),
        sa.Column("prompt_version", sa.String(80), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_llm_calls"),
    )
    op.create_index("ix_llm_calls_request_id", "llm_calls", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_llm_calls_request_id", table_name="llm_calls")
    op.drop_table("llm_calls")
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.drop_column("result")
    with op.batch_alter_table("columns") as batch:
        batch.drop_column("prompt")
