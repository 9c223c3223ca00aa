"""Alembic environment of the PACS worker's job store: run by :func:`cxrclip.migrate.upgrade_schema`."""

from cxrclip.migrate import run_migrations

run_migrations()
