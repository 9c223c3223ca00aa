"""The answer to one image, as data: the shape of what ``inference.py --json`` prints and ``POST /v1/predict``
returns, written once as pydantic models. The server declares them as its response models (so ``/openapi.json``
documents every answer), and a test validates real answers against them. Fields a kind of predictor adds (a routed
model's ``member``) are declared; anything else a newer model adds is kept, not refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class GateVerdict(Open):
    """The input gate's verdict (``cxrclip/predict/gate.py`` ``Verdict``; a routed model adds ``member`` and
    ``members``)."""

    analysed: bool
    kind: str = Field(description="frontal, lateral, ct, not_radiograph, inverted, rotated, unreadable, unchecked, …")
    reason: str | None = Field(None, description="why it was refused; None when analysed")
    stage: str = Field(description="dicom, pixels, image, or none (no image gate fitted)")
    score: float | None = Field(None, description="1 − P(frontal) from the image stage")
    threshold: float | None = None
    enforced: bool = True
    notes: list[str] = []
    note: str | None = None


class RankedText(BaseModel):
    text: str
    similarity: float
    probability: float = Field(description="softmax over the candidates (a ranking, not a calibrated probability)")


class LabelAnswer(Open):
    """One label's answer: calibrated P(yes), its operating point and the decision."""

    probability: float = Field(description="calibrated P(finding present) (see calibrated)")
    threshold: float = Field(description="the operating point, fitted on validation data (rule)")
    rule: str
    present: bool = Field(description="probability >= threshold")
    calibrated: bool = Field(description="False: too few validation cases; the probability is not calibrated")
    uncalibrated_probability: float
    member: str | None = Field(None, description="a routed model: the member that answered this label")


class Answer(Open):
    """One image's answer: labels (and the ranking) when the gate let it through, else the reason."""

    image: str | None = Field(None, description="the file (inference.py); absent in the API")
    analysed: bool = Field(description="False: the input gate refused it; no label probability is given")
    reason: str | None = None
    gate: GateVerdict
    ranking: list[RankedText] | None = None
    labels: dict[str, LabelAnswer] | None = None
    calibration: str | None = Field(None, description="default, or the site whose calibration answered")
    warnings: list[str] | None = Field(None, description="what reading the file worked around")
