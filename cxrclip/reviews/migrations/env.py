"""Alembic environment of the review store: run by :func:`cxrclip.migrate.upgrade_schema`."""

from cxrclip.migrate import run_migrations

run_migrations()
