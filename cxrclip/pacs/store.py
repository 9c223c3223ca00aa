"""The PACS worker's job store (SQLAlchemy): a SQLite file for one machine, PostgreSQL for several workers.

One row per SOP Instance UID the worker has seen, in one of these states::

    baseline  on the PACS before the worker's first start (never analysed, unless --since says so)
    pending   found, waiting (``not_before``: the earliest retry after a transient error)
    working   claimed by ``worker`` until ``lease_until``; ``sr_uid`` once the answer is built
    done      its SR is in the PACS (``sr_uid``)
    refused   the input gate refused it (``reason``; ``sr_uid`` when --report-refusals stored an SR saying so)
    failed    will not be retried (``error``: an undecodable image, or too many attempts)
    skipped   found, not answered by policy (``reason``: its StudyDate is more than ``--accept-late-days`` before it
              reached the PACS)

Exactly once: a job is claimed in one transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite, and an update that only succeeds while the row is still pending), the SR's UID is a function of the image
and the model (the same answer is the same DICOM instance, so a repeated store cannot make a second one), and a job
whose worker died (its lease ran out, or its process is gone on this host) goes back to pending and is first
checked against the PACS before anything is stored again.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    select,
    update,
)

from cxrclip.migrate import open_database

SCHEMA_LOCK = 0x63787263  # a PostgreSQL advisory lock key ("cxrc") held while the schema is migrated
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "cxrclip_pacs_alembic_version"  # its own: the review store may share the database
FINAL = ("done", "refused", "failed", "skipped")

metadata = MetaData()
jobs = Table(
    "cxrclip_pacs_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("modality", String(16)),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(128)),
    Column("lease_until", Float),
    Column("not_before", Float, nullable=False, default=0.0),
    Column("sr_uid", String(64)),
    Column("reason", Text),
    Column("error", Text),
    Column("result", Text),  # the labels as inference.py --json gives them (JSON), for audit and monitoring
    Column("study_date", String(8)),  # the StudyDate the late-study policy read (migration 0002)
    Column("found_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
shadow = Table(  # a challenger's silent answers (--shadow): logged, never stored in the PACS
    "cxrclip_pacs_shadow",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sop_uid", String(64), nullable=False, index=True),
    Column("model_sha256", String(64), nullable=False),
    Column("analysed", Boolean, nullable=False),
    Column("labels", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("sop_uid", "model_sha256"),
)
cursor = Table(
    "cxrclip_pacs_cursor",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Job:
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str | None
    attempts: int
    sr_uid: str | None


def worker_id() -> str:
    """``host:pid:start``: who holds a claim (a restarted worker on the same host can tell its dead self apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"


class JobStore:
    def __init__(self, db: str | Path):
        # workers starting together: one migrates, the rest wait; a store made before migrations is adopted
        self.url, self.engine, self.revision = open_database(
            db,
            MIGRATIONS,
            version_table=VERSION_TABLE,
            lock_key=SCHEMA_LOCK,
            what="job store",
            adopt=_adopt,
            immediate=True,
        )
        self.postgres = self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    # --- the cursor -------------------------------------------------------------------------------------------
    def get(self, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(cursor.c.value).where(cursor.c.name == name)).scalar()

    def put(self, name: str, value: str) -> None:
        with self.engine.begin() as conn:
            self._put(conn, name, value)

    def _put(self, conn, name: str, value: str) -> None:
        if not conn.execute(
            update(cursor).where(cursor.c.name == name).values(value=value, updated_at=_now())
        ).rowcount:
            self._insert_ignore(cursor, [{"name": name, "value": value, "updated_at": _now()}], "name", conn)

    # --- jobs ---------------------------------------------------------------------------------------------------
    def add(self, found: Iterable[Mapping], state: str = "pending", cursor: Mapping[str, str] | None = None) -> int:
        """Record instances found on the PACS (``sop_uid``, ``study_uid``, ``series_uid``, ``modality``, and a
        ``reason`` for a skipped one); one already known is left as it is. ``cursor`` values are stored in the same
        transaction (what was read and how far it was read never disagree). Returns how many were new."""
        if not found and not cursor:  # nothing to write: no transaction
            return 0
        now = _now()
        rows = [
            {**{k: f.get(k) for k in ("sop_uid", "study_uid", "series_uid", "modality", "reason", "study_date")},
             "state": state,
             "attempts": 0, "not_before": 0.0, "found_at": now, "updated_at": now}
            for f in found
        ]  # fmt: skip
        with self.engine.begin() as conn:
            new = self._insert_ignore(jobs, rows, "sop_uid", conn) if rows else 0
            for name, value in (cursor or {}).items():
                self._put(conn, name, value)
        return new

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Job | None:
        """Take the oldest pending job that is due, for ``lease_s`` seconds; None when there is none. A job that
        has used ``max_attempts`` is marked failed instead of being handed out again."""
        while True:
            now = time.time()
            with self.engine.begin() as conn:
                q = select(jobs).where(jobs.c.state == "pending", jobs.c.not_before <= now).order_by(jobs.c.id).limit(1)
                if self.postgres:
                    q = q.with_for_update(skip_locked=True)
                row = conn.execute(q).mappings().first()
                if row is None:
                    return None
                if row["attempts"] >= max_attempts:
                    conn.execute(
                        update(jobs)
                        .where(jobs.c.sop_uid == row["sop_uid"], jobs.c.state == "pending")
                        .values(state="failed", error=f"gave up after {row['attempts']} attempts: {row['error']}",
                                finished_at=_now(), updated_at=_now())
                    )  # fmt: skip
                    continue
                taken = conn.execute(
                    update(jobs)
                    .where(jobs.c.sop_uid == row["sop_uid"], jobs.c.state == "pending")
                    .values(state="working", worker=worker, lease_until=now + lease_s, attempts=jobs.c.attempts + 1,
                            started_at=_now(), updated_at=_now())
                ).rowcount  # fmt: skip
                if taken == 1:
                    return Job(row["sop_uid"], row["study_uid"], row["series_uid"], row["modality"],
                               row["attempts"] + 1, row["sr_uid"])  # fmt: skip

    def release_stale(self) -> int:
        """Jobs whose worker is gone go back to pending: the lease ran out, or (this host) the process is dead."""
        now = time.time()
        host = socket.gethostname()
        with self.engine.begin() as conn:
            holders = conn.execute(select(jobs.c.worker).where(jobs.c.state == "working").distinct()).scalars().all()
            dead = [w for w in holders if w and _dead_here(w, host)]
            expired = jobs.c.lease_until < now
            condition = expired | jobs.c.worker.in_(dead) if dead else expired
            return conn.execute(
                update(jobs)
                .where(jobs.c.state == "working", condition)
                .values(state="pending", worker=None, lease_until=None, updated_at=_now())
            ).rowcount

    def note_sr(self, sop_uid: str, sr_uid: str) -> None:
        self._set(sop_uid, sr_uid=sr_uid)

    def finish(self, sop_uid: str, state: str, *, sr_uid=None, reason=None, error=None, result=None, worker=None):
        """A final state; ``worker``: who answered (kept for the audit)."""
        if state not in FINAL:
            raise ValueError(state)
        self._set(sop_uid, state=state, sr_uid=sr_uid, reason=reason, error=error, worker=worker, lease_until=None,
                  result=None if result is None else json.dumps(result), finished_at=_now())  # fmt: skip

    def retry(self, sop_uid: str, error: str, delay_s: float) -> None:
        """Back to pending after a transient failure, not before ``delay_s`` from now."""
        self._set(
            sop_uid, state="pending", error=error, worker=None, lease_until=None, not_before=time.time() + delay_s
        )

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {state: n for state, n in rows}

    def log_shadow(self, sop_uid: str, model_sha256: str, analysed: bool, labels: Mapping) -> None:
        """A challenger's silent answer to one instance (once per instance and challenger)."""
        row = {"sop_uid": sop_uid, "model_sha256": model_sha256, "analysed": analysed,
               "labels": json.dumps(labels, sort_keys=True), "created_at": _now()}  # fmt: skip
        with self.engine.begin() as conn:
            self._insert_ignore(shadow, [row], ("sop_uid", "model_sha256"), conn)

    def shadow_rows(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(select(shadow).order_by(shadow.c.id)).mappings()]
        for r in rows:
            r["labels"] = json.loads(r["labels"])
        return rows

    def rows(self, state: str | None = None) -> list[dict]:
        q = select(jobs).order_by(jobs.c.id)
        if state:
            q = q.where(jobs.c.state == state)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def _set(self, sop_uid: str, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.sop_uid == sop_uid).values(**values, updated_at=_now()))

    def _insert_ignore(self, table: Table, rows: list[dict], key: str | tuple[str, ...], conn) -> int:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        keys = [key] if isinstance(key, str) else list(key)
        return conn.execute(insert(table).on_conflict_do_nothing(index_elements=keys), rows).rowcount


def _adopt(conn) -> str | None:
    """A job store made before it had migrations holds the tables of revision 0001."""
    from sqlalchemy import inspect

    return "0001_jobs" if inspect(conn).has_table(jobs.name) else None


def _dead_here(worker: str, host: str) -> bool:
    name, _, rest = worker.partition(":")
    if name != host:
        return False
    try:
        os.kill(int(rest.split(":")[0]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False
