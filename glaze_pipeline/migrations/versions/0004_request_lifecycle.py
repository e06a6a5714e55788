"""The request lifecycle: transitions history, a spend ledger, retries, rows held by a job.

* `request_transitions`: every status change of a request, in order (the repository writes it
  in the same transaction as the change), so a request's history is readable and testable.
* `request_spend`: per request and provider, calls sent, calls whose outcome is known, calls
  charged and their cost. A call is journalled *before* it leaves the machine and settled when
  its answer arrives, so a killed worker's spend is still on record (calls sent but never
  settled are counted as charged: the vendor bills on receipt).
* `enrichment_requests.retry_of`: a re-executed run gets a new request linked to the old one.
* `enrichment_requests.entities_done`: enrichment progress (entities finished so far).
* `rows.pending_request_id`: the job that holds the row `queued` or `running`, so whatever way
  the job ends, its rows are put back to the status their cells say.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_transitions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(40), nullable=False, index=True),
        sa.Column("from_status", sa.String(20)),
        sa.Column("to_status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("run_id", sa.String(64)),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "request_spend",
        sa.Column("request_id", sa.String(40), primary_key=True),
        sa.Column("provider", sa.String(100), primary_key=True),
        sa.Column("calls", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("settled", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("charged", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("cost", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("unit_cost", sa.Float, nullable=False, server_default=sa.text("0")),
    )
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.add_column(sa.Column("retry_of", sa.String(40)))
        batch.add_column(
            sa.Column("entities_done", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
    with op.batch_alter_table("rows") as batch:
        batch.add_column(sa.Column("pending_request_id", sa.String(40)))


def downgrade() -> None:
    with op.batch_alter_table("rows") as batch:
        batch.drop_column("pending_request_id")
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.drop_column("entities_done")
        batch.drop_column("retry_of")
    op.drop_table("request_spend")
    op.drop_table("request_transitions")
