"""The job table (one row per SOP Instance UID the worker has seen) and the cursor (name → value) — as cxrclip made
them before the job store had migrations (a store of that time is stamped with this revision, not recreated).

Revision ID: 0001_jobs
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_jobs"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "cxrclip_pacs_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sop_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("worker", sa.String(128)),
        sa.Column("lease_until", sa.Float),
        sa.Column("not_before", sa.Float, nullable=False, default=0.0),
        sa.Column("sr_uid", sa.String(64)),
        sa.Column("reason", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("result", sa.Text),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "cxrclip_pacs_cursor",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cxrclip_pacs_cursor")
    op.drop_table("cxrclip_pacs_jobs")
