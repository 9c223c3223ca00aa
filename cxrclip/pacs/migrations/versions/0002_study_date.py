"""Each job keeps its study's StudyDate (what the late-study policy read; listed by ``--status --skipped``).

Revision ID: 0002_study_date
Revises: 0001_jobs
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_study_date"
down_revision = "0001_jobs"


def upgrade() -> None:
    op.add_column("cxrclip_pacs_jobs", sa.Column("study_date", sa.String(8)))


def downgrade() -> None:
    with op.batch_alter_table("cxrclip_pacs_jobs") as batch:
        batch.drop_column("study_date")
