"""The answer to one image, as data. Every predictor produces :class:`Answer` objects; the writers (the table, the
CSV, ``--json``, the server, the SR builder, the PACS worker) read them by attribute. ``to_json()`` is what
``inference.py --json`` prints and ``POST /v1/predict`` returns (pinned by ``tests/test_golden.py``); the server
declares these models as its response models, so ``/openapi.json`` documents every answer. Fields a kind of
predictor adds (a routed model's ``member``) are declared; anything else a newer model adds is kept, not refused."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

ANSWER_VERSION = 1  # the answer's JSON form; a change that breaks a reader of it gets a new number


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
    answer_version: int = Field(ANSWER_VERSION, description="the version of this JSON form")

    def to_json(self) -> dict:
        """The JSON form: the fields this answer has, in order (a field it lacks is left out, never null), and the
        version of the form last."""
        return {**self.model_dump(exclude_unset=True, exclude={"answer_version"}), "answer_version": ANSWER_VERSION}

    @classmethod
    def of(cls, value: Answer | Mapping) -> Answer:
        """An answer, from itself or from its JSON form."""
        return value if isinstance(value, Answer) else cls.model_validate(value)

    @property
    def yes(self) -> list[str]:
        """The labels called YES, in the model's order."""
        return [n for n, v in (self.labels or {}).items() if v.present]
