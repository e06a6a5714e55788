"""Alembic environment: the engine comes from `glaze_pipeline.core.migrate`, never from an ini."""

from alembic import context

from glaze_pipeline.core.schema import Base

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
