"""Alembic environment of the review store: run by :func:`cxrclip.reviews.store.upgrade` on the connection it
passes in ``config.attributes["connection"]`` (never from an alembic.ini)."""

from alembic import context

from cxrclip.reviews.store import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
