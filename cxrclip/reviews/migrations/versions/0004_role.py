"""The prediction log records whose answer a row is: ``answer`` (the model that answered; older rows: NULL) or
``shadow`` (a challenger answering silently beside it, never shown, for the monitor's comparison).

Revision ID: 0004_role
Revises: 0003_dicom
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_role"
down_revision = "0003_dicom"


def upgrade() -> None:
    op.add_column("cxrclip_predictions", sa.Column("role", sa.String(16)))  # answer | shadow; NULL: answer


def downgrade() -> None:
    op.drop_column("cxrclip_predictions", "role")  # ALTER TABLE ... DROP COLUMN: the append-only triggers stay
