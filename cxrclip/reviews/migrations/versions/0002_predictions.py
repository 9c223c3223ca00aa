"""The prediction log the monitor reads: one row per image a server predicted (its first prediction), append-only.

Revision ID: 0002_predictions
Revises: 0001_reviews
"""

import sqlalchemy as sa
from alembic import op

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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION cxrclip_predictions_append_only() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{APPEND_ONLY}'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER cxrclip_predictions_append_only BEFORE UPDATE OR DELETE ON cxrclip_predictions "
            "FOR EACH ROW EXECUTE FUNCTION cxrclip_predictions_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER cxrclip_predictions_no_{event.lower()} BEFORE {event} ON cxrclip_predictions "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER cxrclip_predictions_append_only ON cxrclip_predictions")
        op.execute("DROP FUNCTION cxrclip_predictions_append_only()")
    op.drop_table("cxrclip_predictions")
