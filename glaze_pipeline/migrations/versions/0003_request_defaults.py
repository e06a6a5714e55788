"""Server defaults on enrichment_requests: the app's INSERT names only what it means.

With these, `INSERT INTO enrichment_requests (table_id, selection) VALUES (...)` is a complete
request (kind enrich, status queued, a generated id), on Postgres and on SQLite.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID_DEFAULT = {
    "postgresql": "('req_' || substr(md5(random()::text || clock_timestamp()::text), 1, 16))",
    "sqlite": "('req_' || lower(hex(randomblob(8))))",
}
DEFAULTS = {
    "kind": "'enrich'",
    "priority": "0",
    "status": "'queued'",
    "cells_total": "0",
    "cells_done": "0",
    "cells_failed": "0",
    "cells_not_found": "0",
    "cells_skipped": "0",
    "rows_total": "0",
    "rows_written": "0",
    "entities": "0",
    "cache_hits": "0",
    "provider_calls": "'{}'",
    "cost_by_provider": "'{}'",
    "cost": "0",
    "budget_reserved": "0",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    false = "false" if dialect == "postgresql" else "0"
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.alter_column("id", server_default=sa.text(ID_DEFAULT[dialect]))
        for column, default in DEFAULTS.items():
            batch.alter_column(column, server_default=sa.text(default))
        batch.alter_column("cancel_requested", server_default=sa.text(false))
        batch.alter_column("updated_at", server_default=sa.func.now())


def downgrade() -> None:
    with op.batch_alter_table("enrichment_requests") as batch:
        for column in ("id", *DEFAULTS, "cancel_requested", "updated_at"):
            batch.alter_column(column, server_default=None)
