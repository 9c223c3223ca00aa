"""Promotions and rollbacks of the model a site answers with: append-only audit rows (who, when, both models'
hashes and paths, the change-control plan's hash, the evidence).

Revision ID: 0005_model_changes
Revises: 0004_role
"""

import sqlalchemy as sa
from alembic import op

from cxrclip.migrate import create_log_table, drop_append_only

revision, down_revision = "0005_model_changes", "0004_role"


def upgrade() -> None:
    create_log_table(
        op, "cxrclip_model_changes",
        sa.Column("action", sa.String(16), nullable=False),  # promote | rollback
        sa.Column("by", sa.String(128), nullable=False),
        sa.Column("from_sha256", sa.String(64)), sa.Column("from_path", sa.Text),
        sa.Column("to_sha256", sa.String(64), nullable=False), sa.Column("to_path", sa.Text, nullable=False),
        sa.Column("plan_sha256", sa.String(64)),
        sa.Column("evidence", sa.Text),  # the verdict (JSON) a promotion rests on; a rollback's reason
        append_only="model changes are append-only: a rollback is a new row",
    )  # fmt: skip


def downgrade() -> None:
    drop_append_only(op, "cxrclip_model_changes")
    op.drop_table("cxrclip_model_changes")
