"""Postgres: NOTIFY glaze_requests on every queued request, for the push launcher.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no LISTEN/NOTIFY: the launcher polls there
    op.execute(
        """
        CREATE OR REPLACE FUNCTION glaze_notify_request() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('glaze_requests', NEW.id);
            RETURN NEW;
        END
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER enrichment_requests_notify
        AFTER INSERT OR UPDATE OF status ON enrichment_requests
        FOR EACH ROW WHEN (NEW.status = 'queued')
        EXECUTE FUNCTION glaze_notify_request()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS enrichment_requests_notify ON enrichment_requests")
    op.execute("DROP FUNCTION IF EXISTS glaze_notify_request()")
