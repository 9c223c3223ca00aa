"""The prediction log the monitor reads: one row per image a server predicted (its first prediction), append-only.

Revision ID: 0002_predictions
Revises: 0001_reviews
"""

import sqlalchemy as sa
from alembic import op

from cxrclip.migrate import create_append_only, drop_append_only

revision = "0002_predictions"
down_revision = "0001_reviews"

APPEND_ONLY = "the prediction log is append-only"


def upgrade() -> None:
    op.create_table(
        "cxrclip_predictions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("calibration", sa.String(64), nullable=False),
        sa.Column("analysed", sa.Boolean, nullable=False),
        sa.Column("gate_score", sa.Float),
        sa.Column("labels", sa.Text, nullable=False),  # {label: [probability, present]} (JSON); {} when refused
    )
    create_append_only(op, "cxrclip_predictions", APPEND_ONLY)


def downgrade() -> None:
    drop_append_only(op, "cxrclip_predictions")
    op.drop_table("cxrclip_predictions")
