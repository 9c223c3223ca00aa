"""The review store: SQLAlchemy over a SQLite file (default) or PostgreSQL (several servers sharing one), its schema
versioned with Alembic (``migrations/``, applied at open), append-only by database triggers: a correction of a review
is a new row whose ``supersedes`` names the old one. A database of a newer schema than this cxrclip knows is refused.

A review: who (``reviewer``), when, which image (its SHA-256; the file itself only with ``--keep-images``), which model
(its SHA-256) and calibration, what was shown (per label: probability, threshold, decision, calibrated), and the
reviewer's verdict per label — ``present``, ``absent`` or ``unsure`` — with an optional comment.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
)

from cxrclip.exceptions import InputError
from cxrclip.migrate import head_revision as _head_revision
from cxrclip.migrate import open_database

MIGRATIONS = Path(__file__).parent / "migrations"
VERDICTS = ("present", "absent", "unsure")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DICOM_KEYS = ("study", "series", "sop", "sop_class")  # a PACS image's identity in a review
# The store is append-only: what goes in stays, so every field is bounded (USER_GUIDE 5d).
MAX_REVIEWER = 128  # characters
MAX_COMMENT = 4000  # characters
MAX_IMAGE_NAME = 255
# C0 controls, DEL and C1 controls: PostgreSQL's text refuses NUL, SQLite keeps it; both refuse them here, alike.
# A comment may hold tabs and line breaks.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
NAME_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def bounded_text(value: str | None, what: str, limit: int, control: re.Pattern = CONTROL) -> str:
    """``value`` stripped, or an :class:`InputError` naming the field when it is too long or holds control
    characters (NUL included)."""
    value = (value or "").strip()
    if len(value) > limit:
        raise InputError(f"{what}: {len(value)} characters, at most {limit}")
    bad = control.search(value)
    if bad:
        raise InputError(f"{what}: control character U+{ord(bad.group()):04X} at position {bad.start()} is not allowed")
    return value


metadata = MetaData()
reviews = Table(
    "cxrclip_reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("reviewer", String(128), nullable=False),
    Column("image_sha256", String(64), nullable=False, index=True),
    Column("image_name", String(255)),
    Column("image_path", Text),
    Column("model_sha256", String(64), nullable=False),
    Column("calibration", String(64), nullable=False),
    Column("shown", Text, nullable=False),
    Column("verdicts", Text, nullable=False),
    Column("comment", Text),
    Column("supersedes", Integer, ForeignKey("cxrclip_reviews.id")),
    Column("dicom", Text),  # the image's DICOM UIDs (JSON) when it came from a PACS: its review goes back there
)
predictions = Table(
    "cxrclip_predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("image_sha256", String(64), nullable=False),
    Column("model_sha256", String(64), nullable=False),
    Column("calibration", String(64), nullable=False),
    Column("analysed", Boolean, nullable=False),
    Column("gate_score", Float),
    Column("labels", Text, nullable=False),
    Column("role", String(16)),  # answer (NULL in older rows) | shadow: a challenger answering silently
)
model_changes = Table(  # promotions and rollbacks (append-only): cxrclip/change/promote.py
    "cxrclip_model_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("action", String(16), nullable=False),
    Column("by", String(128), nullable=False),
    Column("from_sha256", String(64)),
    Column("from_path", Text),
    Column("to_sha256", String(64), nullable=False),
    Column("to_path", Text, nullable=False),
    Column("plan_sha256", String(64)),
    Column("evidence", Text),
)
SCHEMA_LOCK = 0x63787276  # PostgreSQL advisory lock key ("cxrv") held while migrating


def head_revision() -> str:
    return _head_revision(MIGRATIONS)


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


class ReviewStore:
    def __init__(self, db: str | Path):
        self.url, self.engine, self.revision = open_database(
            db, MIGRATIONS, version_table="alembic_version", lock_key=SCHEMA_LOCK, what="review store"
        )

    def close(self) -> None:
        self.engine.dispose()

    def add(
        self,
        *,
        reviewer: str,
        image_sha256: str,
        model_sha256: str,
        calibration: str,
        shown: Mapping,
        verdicts: Mapping[str, str],
        labels,
        comment: str | None = None,
        image_name: str | None = None,
        image_path: str | None = None,
        supersedes: int | None = None,
        dicom: Mapping[str, str] | None = None,
    ) -> dict:
        """Save one review (checked first: a known label for every verdict, a verdict from :data:`VERDICTS`, a
        reviewer, a SHA-256, an existing review to supersede); returns it as stored."""
        reviewer = bounded_text(reviewer, "reviewer", MAX_REVIEWER, NAME_CONTROL)
        if not reviewer:
            raise InputError("a review needs the reviewer's name")
        comment = bounded_text(comment, "comment", MAX_COMMENT)
        image_name = NAME_CONTROL.sub("?", str(image_name or ""))[:MAX_IMAGE_NAME]
        if not SHA256.match(image_sha256 or ""):
            raise InputError("image_sha256 must be 64 lowercase hex digits")
        unknown = sorted(set(verdicts) - set(labels))
        if unknown:
            raise InputError(f"verdicts for unknown labels {unknown}; labels: {list(labels)}")
        wrong = {k: v for k, v in verdicts.items() if v not in VERDICTS}
        if wrong:
            raise InputError(f"verdicts must be one of {list(VERDICTS)}: {wrong}")
        if not verdicts:
            raise InputError("a review needs a verdict for at least one label")
        row = {
            "created_at": datetime.datetime.now(datetime.timezone.utc),
            "reviewer": reviewer,
            "image_sha256": image_sha256,
            "image_name": image_name or None,
            "image_path": image_path,
            "model_sha256": model_sha256,
            "calibration": calibration,
            "shown": json.dumps(shown, sort_keys=True),
            "verdicts": json.dumps(dict(verdicts), sort_keys=True),
            "comment": comment or None,
            "supersedes": supersedes,
            "dicom": json.dumps({k: str(dicom[k]) for k in DICOM_KEYS}, sort_keys=True) if dicom else None,
        }
        with self.engine.begin() as conn:
            if supersedes is not None:
                old = conn.execute(select(reviews.c.image_sha256).where(reviews.c.id == supersedes)).scalar()
                if old is None:
                    raise InputError(f"supersedes: no review {supersedes}")
                if old != image_sha256:
                    raise InputError(f"supersedes: review {supersedes} is of another image")
            new_id = conn.execute(reviews.insert().values(**row)).inserted_primary_key[0]
        return self.get(new_id)

    def get(self, review_id: int) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(reviews).where(reviews.c.id == review_id)).mappings().first()
        return _as_dict(row) if row else None

    def list(self, since: datetime.datetime | None = None, limit: int | None = None) -> list[dict]:
        """Every review (oldest first), or those saved after ``since``."""
        q = select(reviews).order_by(reviews.c.id)
        if since is not None:
            q = q.where(reviews.c.created_at > since)
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [_as_dict(r) for r in conn.execute(q).mappings()]

    def log_prediction(self, image_sha256: str, model_sha256: str, calibration: str, result: Mapping,
                       role: str = "answer") -> None:  # fmt: skip
        """One image's first prediction by a server, for the monitor: analysed or not, the gate score, and per label
        the probability and the decision; ``role`` ``shadow``: a challenger's silent answer to the same image."""
        labels = {n: [v["probability"], bool(v["present"])] for n, v in (result.get("labels") or {}).items()}
        row = {
            "created_at": datetime.datetime.now(datetime.timezone.utc),
            "image_sha256": image_sha256,
            "model_sha256": model_sha256,
            "calibration": calibration,
            "analysed": bool(result.get("analysed", True)),
            "gate_score": (result.get("gate") or {}).get("score"),
            "labels": json.dumps(labels, sort_keys=True),
            "role": role,
        }
        with self.engine.begin() as conn:
            conn.execute(predictions.insert().values(**row))

    def predictions(self, since: datetime.datetime | None = None, role: str = "answer",
                    images: Collection[str] | None = None) -> list[dict]:  # fmt: skip
        """The log of the answers given (``role="shadow"``: a challenger's silent ones), oldest first; ``images``:
        only those of these images (SHA-256)."""
        q = select(predictions).order_by(predictions.c.id)
        q = q.where((predictions.c.role == role) | predictions.c.role.is_(None)) if role == "answer" else q.where(
            predictions.c.role == role)  # fmt: skip
        if since is not None:
            q = q.where(predictions.c.created_at > since)
        queries = [q] if images is None else [q.where(predictions.c.image_sha256.in_(c)) for c in _chunks(images)]
        with self.engine.connect() as conn:
            rows = [dict(r) for query in queries for r in conn.execute(query).mappings()]
        rows.sort(key=lambda r: r["id"])
        for r in rows:
            r["created_at"] = _utc(r["created_at"]).isoformat()
            r["labels"] = json.loads(r["labels"])
            r.pop("role", None)
        return rows

    def add_model_change(self, **row) -> dict:
        """One promotion or rollback (append-only: what is done is never edited)."""
        row = {**row, "created_at": datetime.datetime.now(datetime.timezone.utc)}
        with self.engine.begin() as conn:
            new_id = conn.execute(model_changes.insert().values(**row)).inserted_primary_key[0]
        return next(r for r in self.model_changes() if r["id"] == new_id)

    def model_changes(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(select(model_changes).order_by(model_changes.c.id)).mappings()]
        for r in rows:
            r["created_at"] = _utc(r["created_at"]).isoformat()
        return rows

    def reviewed_images(self, images: Collection[str]) -> set[str]:
        """Which of ``images`` (SHA-256) have a review."""
        column = reviews.c.image_sha256
        with self.engine.connect() as conn:
            return {sha for c in _chunks(images) for sha in conn.execute(select(column).where(column.in_(c))).scalars()}

    def current(self) -> list[dict]:
        """The reviews nobody has corrected: per chain of corrections, its last one."""
        rows = self.list()
        replaced = {r["supersedes"] for r in rows if r["supersedes"] is not None}
        return [r for r in rows if r["id"] not in replaced]


def _chunks(values: Collection[str], size: int = 500) -> list[list[str]]:
    """``values`` in lists of at most ``size``: the bound parameters of one IN (SQLite before 3.32 allows 999)."""
    values = list(values)
    return [values[i : i + size] for i in range(0, len(values), size)]


def _as_dict(row) -> dict:
    out = dict(row)
    out["created_at"] = _utc(out["created_at"]).isoformat()
    out["shown"] = json.loads(out["shown"])
    out["verdicts"] = json.loads(out["verdicts"])
    dicom = out.pop("dicom", None)
    if dicom:  # only a review of a PACS image has it (the rows of others are as they were)
        out["dicom"] = json.loads(dicom)
    return out
