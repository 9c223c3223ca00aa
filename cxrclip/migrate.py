"""Schema migrations (Alembic) for the project's two databases — the review store and the PACS worker's job store —
run the same way: on open, in one transaction, under a PostgreSQL advisory lock (processes starting together
migrate once), refusing a database a newer cxrclip wrote. Each store has its own migrations folder and version
table, so both may live in one database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cxrclip.exceptions import ConfigError
from cxrclip.io import redact_url


def alembic_config(folder: Path):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(folder))
    return config


def head_revision(folder: Path) -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(folder)).get_current_head()


def upgrade_schema(engine, folder: Path, *, version_table: str, lock_key: int, what: str,
                   adopt: Callable | None = None) -> str:  # fmt: skip
    """Bring the database to the head of ``folder``'s migrations (creating the tables when empty) and return the
    revision. ``adopt(connection)``: for a database made before migrations existed, the revision its tables
    already are (stamped, then upgraded from there), or None."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    config = alembic_config(folder)
    known = {r.revision for r in ScriptDirectory.from_config(config).walk_revisions()}
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
        current = MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()
        if current is not None and current not in known:
            raise ConfigError(
                f"the {what} {redact_url(str(engine.url))} has schema revision {current}, newer than this "
                f"cxrclip knows (up to {head_revision(folder)}): upgrade cxrclip, or give --db another database"
            )
        config.attributes.update(connection=conn, version_table=version_table)
        if current is None and adopt is not None and (found := adopt(conn)):
            command.stamp(config, found)
        command.upgrade(config, "head")
        return MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()


def run_migrations() -> None:
    """The body of each migrations folder's ``env.py``: migrate the connection :func:`upgrade_schema` passed in
    (never from an alembic.ini)."""
    from alembic import context

    attributes = context.config.attributes
    context.configure(connection=attributes["connection"], render_as_batch=True,
                      version_table=attributes.get("version_table", "alembic_version"))  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()
