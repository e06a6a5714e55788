"""An index on the rows a job holds (`rows.pending_request_id`), and only on those.

Every ending lets go of its request's rows (`Store.release_rows`) and the reconciler looks for
rows still held by an ended request (`Store.held_by_ended_requests`): with this partial index
both cost what is held, not a scan of the table. Rows not held (almost all of them, almost
always) are not in it, so it costs nothing to keep.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

HELD = sa.text("pending_request_id IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_rows_pending_request_id_id",
        "rows",
        ["pending_request_id", "id"],
        postgresql_where=HELD,
        sqlite_where=HELD,
    )


def downgrade() -> None:
    op.drop_index("ix_rows_pending_request_id_id", table_name="rows")
