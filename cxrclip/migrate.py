"""Schema migrations (Alembic) for the project's two databases — the review store and the PACS worker's job store —
run the same way: on open, in one transaction, under a PostgreSQL advisory lock (processes starting together
migrate once), refusing a database a newer cxrclip wrote. Each store has its own migrations folder and version
table, so both may live in one database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, event

from cxrclip.exceptions import ConfigError
from cxrclip.io import database_url, redact_url


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


def open_database(db: str | Path, folder: Path, *, version_table: str, lock_key: int, what: str,
                  adopt: Callable | None = None, immediate: bool = False):  # fmt: skip
    """Open a store's database (a SQLite file path or a database URL) and migrate it: return ``(url, engine,
    revision)``. SQLite runs in WAL with a full sync at each commit (what was written survives kill -9 and a power
    cut) and foreign keys on; ``immediate``: every transaction takes the write lock at BEGIN, so two processes on
    one file never both read a row as free and then both write it (pysqlite's own transaction handling off)."""
    url = database_url(db)
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
            _sqlite_durable(engine, immediate)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        revision = upgrade_schema(engine, folder, version_table=version_table, lock_key=lock_key, what=what,
                                  adopt=adopt)  # fmt: skip
    except ConfigError:
        raise
    except Exception as e:  # a wrong URL, a missing driver, a server that refuses, a file that is not a database
        raise ConfigError(f"--db {redact_url(url)}: cannot open the {what} ({type(e).__name__}: {e})") from e
    return url, engine, revision


def _sqlite_durable(engine, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        if immediate:
            dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=FULL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    if immediate:

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_append_only(op, table: str, message: str) -> None:
    """In a migration: database triggers that refuse every UPDATE and DELETE on ``table`` with ``message``."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE FUNCTION {table}_append_only() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{message}'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
        )
    else:
        for event_name in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{event_name.lower()} BEFORE {event_name} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )


def drop_append_only(op, table: str) -> None:
    """In a migration's downgrade: drop what :func:`create_append_only` made (SQLite drops the triggers with the
    table)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
        op.execute(f"DROP FUNCTION {table}_append_only()")


def create_log_table(op, name: str, *columns, append_only: str | None = None) -> None:
    """In a migration: a log table — an integer id, the time of each row (``created_at``), then ``columns`` (and
    constraints) — append-only by triggers when ``append_only`` says why."""
    import sqlalchemy as sa

    op.create_table(name, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False), *columns)  # fmt: skip
    if append_only:
        create_append_only(op, name, append_only)
