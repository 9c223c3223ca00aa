"""A challenger's silent answers (``cxrclip pacs --shadow``): one row per instance and challenger, never an SR.

Revision ID: 0003_shadow
Revises: 0002_study_date
"""

import sqlalchemy as sa
from alembic import op

from cxrclip.migrate import create_log_table

revision, down_revision = "0003_shadow", "0002_study_date"


def upgrade() -> None:
    create_log_table(
        op, "cxrclip_pacs_shadow",
        sa.Column("sop_uid", sa.String(64), nullable=False, index=True),
        sa.Column("model_sha256", sa.String(64), nullable=False), sa.Column("analysed", sa.Boolean, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),  # as inference.py --json gives them; {} when refused
        sa.UniqueConstraint("sop_uid", "model_sha256"),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("cxrclip_pacs_shadow")
