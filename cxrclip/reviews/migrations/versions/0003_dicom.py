"""A review of an image that came from a PACS records the image's DICOM identity (study, series, instance and SOP
class UIDs, as JSON), so the review can be stored back in the PACS as a verified SR beside the AI's answer.

Revision ID: 0003_dicom
Revises: 0002_predictions
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_dicom"
down_revision = "0002_predictions"


def upgrade() -> None:
    op.add_column("cxrclip_reviews", sa.Column("dicom", sa.Text))  # {"study", "series", "sop", "sop_class"} or NULL


def downgrade() -> None:
    op.drop_column("cxrclip_reviews", "dicom")  # ALTER TABLE ... DROP COLUMN: the append-only triggers stay
