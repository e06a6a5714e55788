"""Alembic environment: the engine comes from `glaze_pipeline.core.migrate`, never from an ini."""

from alembic import context

from glaze_pipeline.core.schema import Base

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    # Our own version table, so the app schema can share a database with Dagster storage.
    version_table="glaze_alembic_version",
)
with context.begin_transaction():
    context.run_migrations()
