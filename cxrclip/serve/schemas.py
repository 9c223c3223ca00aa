"""The REST API's requests and answers as pydantic models: each route declares its ``response_model``, so
``/openapi.json`` documents every answer (and a client can be generated from it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cxrclip.predict.answer import Answer, Open
from cxrclip.reviews.store import MAX_COMMENT, MAX_REVIEWER

MAX_VERDICTS = 64  # labels per review (a model has 13; unknown ones are refused by name)


class ErrorDetail(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    """Every error: 401, 404, 409, 411, 413, 415, 422, 503."""

    error: ErrorDetail
    request_id: str


class Health(BaseModel):
    status: Literal["ok"]


class ModelInfo(Open):
    """What the model says about itself (the card) and how this server runs it."""

    name: str
    checkpoint_sha256: str
    labels: list[str]
    image_size: int | list[int] | None = None
    precision: str
    operating_points: dict[str, dict]
    calibration: str
    sites: list[str]
    gate: dict
    disclaimer: str
    reviews: bool = Field(description="True: this server keeps reviews (POST /v1/reviews)")
    user: str | None = Field(None, description="the reader whose token made this request (--users)")


class Heatmap(BaseModel):
    label: str
    png: str = Field(description="the Grad-CAM overlay as a data: URL")


class TextMatch(Open):
    text: str


class Prediction(Answer):
    """One image's answer, with what the page shows beside it."""

    input: dict = Field(description="what reading the upload found: format, size, DICOM attributes, warnings")
    image_sha256: str
    preview: str = Field(description="the picture the model saw, as a data: URL")
    texts: list[TextMatch] | None = None
    heatmap: Heatmap | None = None


class PredictResponse(Prediction):
    request_id: str
    seconds: float


class BatchError(BaseModel):
    file: str | None
    error: ErrorDetail


class BatchItem(Prediction):
    file: str | None


class BatchResponse(BaseModel):
    request_id: str
    results: list[BatchItem | BatchError] = Field(description="one per file, in order; a bad file gets its error")


class ReviewIn(BaseModel):
    image_sha256: str = Field(description="the image_sha256 /v1/predict returned", max_length=64)
    reviewer: str = Field("", description="who reviews (the page's field); a reader's own token (--users) overrides; "
                          "no control characters", max_length=MAX_REVIEWER)  # fmt: skip
    verdicts: dict[str, Literal["present", "absent", "unsure"]] = Field(
        description="label → verdict", max_length=MAX_VERDICTS
    )
    comment: str | None = Field(None, description="free text; tabs and line breaks, no other control characters",
                                max_length=MAX_COMMENT)  # fmt: skip
    supersedes: int | None = Field(None, description="the id of the review this one corrects")


class Review(BaseModel):
    """A saved review (append-only: a correction is a new review that supersedes it)."""

    model_config = ConfigDict(extra="allow")
    id: int
    created_at: str
    reviewer: str
    image_sha256: str
    image_name: str | None
    image_path: str | None
    model_sha256: str
    calibration: str
    shown: dict[str, dict] = Field(description="what the server showed per label when it was reviewed")
    verdicts: dict[str, Literal["present", "absent", "unsure"]]
    comment: str | None
    supersedes: int | None
    dicom: dict[str, str] | None = Field(None, description="a DICOM image's study, series, sop and sop_class UIDs")
    pacs: dict | None = Field(None, description="with --dicomweb: the verified SR stored in the PACS (sr_uid, stored, "
                              "ai_sr) or why not (error)")  # fmt: skip


class ReviewSaved(BaseModel):
    request_id: str
    review: Review


class ReviewList(BaseModel):
    reviews: list[Review]


class QueuedImage(BaseModel):
    image_sha256: str
    image_name: str
    score: float = Field(description="labels a shadow challenger called differently + nearness of the closest label "
                         "to its threshold (0–1)")  # fmt: skip
    nearest_label: str
    margin: float = Field(description="|probability − threshold| of the nearest label")
    disagree: list[str] = Field(description="labels the shadow challenger called differently")


class ReviewQueue(BaseModel):
    images: list[QueuedImage]


class MonitorReport(Open):
    """Per label the YES share per period against its expected band, and the agreement with reviewers."""

    model: str
    calibration: str
    period: Literal["day", "week"]
    periods: list[str]
    intake: list[dict]
    labels: dict[str, dict]
    reviews: int
    predictions: int
    shadow: dict | None = Field(None, description="with --shadow: champion vs challenger per label (agreement, YES "
                                "shares, each against the reviewers)")  # fmt: skip
