"""Step outputs in the app database: the hand-off between steps that run in other processes or on
other machines (multiprocess and Celery executors; see core/step_outputs.py).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_outputs",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("step_key", sa.String(400), nullable=False),
        sa.Column("output_name", sa.String(200), nullable=False),
        sa.Column("mapping_key", sa.String(200), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "run_id", "step_key", "output_name", "mapping_key", name="pk_step_outputs"
        ),
    )
    op.create_index("ix_step_outputs_created_at", "step_outputs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_step_outputs_created_at", table_name="step_outputs")
    op.drop_table("step_outputs")
