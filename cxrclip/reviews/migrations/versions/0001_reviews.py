"""The review table, append-only (a correction is a new row pointing at the one it corrects).

Revision ID: 0001_reviews
Revises:
"""

import sqlalchemy as sa
from alembic import op

from cxrclip.migrate import create_append_only, drop_append_only

revision = "0001_reviews"
down_revision = None

APPEND_ONLY = "reviews are append-only: a correction is a new review that supersedes the old one"


def upgrade() -> None:
    op.create_table(
        "cxrclip_reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False, index=True),
        sa.Column("image_name", sa.String(255)),
        sa.Column("image_path", sa.Text),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("calibration", sa.String(64), nullable=False),
        sa.Column("shown", sa.Text, nullable=False),
        sa.Column("verdicts", sa.Text, nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("supersedes", sa.Integer, sa.ForeignKey("cxrclip_reviews.id")),
    )
    create_append_only(op, "cxrclip_reviews", APPEND_ONLY)


def downgrade() -> None:
    drop_append_only(op, "cxrclip_reviews")
    op.drop_table("cxrclip_reviews")
