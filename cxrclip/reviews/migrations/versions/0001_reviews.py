"""The review table, append-only (a correction is a new row pointing at the one it corrects).

Revision ID: 0001_reviews
Revises:
"""

import sqlalchemy as sa
from alembic import op

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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION cxrclip_reviews_append_only() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{APPEND_ONLY}'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER cxrclip_reviews_append_only BEFORE UPDATE OR DELETE ON cxrclip_reviews "
            "FOR EACH ROW EXECUTE FUNCTION cxrclip_reviews_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER cxrclip_reviews_no_{event.lower()} BEFORE {event} ON cxrclip_reviews "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER cxrclip_reviews_append_only ON cxrclip_reviews")
        op.execute("DROP FUNCTION cxrclip_reviews_append_only()")
    op.drop_table("cxrclip_reviews")
