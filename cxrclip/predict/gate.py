"""The input gate: only a frontal chest radiograph gets an answer.

A model trained on frontal chest films answers a lateral film, a CT slice or a photograph with probabilities
that look as calibrated as any other; they are noise. Every path that predicts (``inference.py``, ``cxrclip
serve``, the bundle) asks the gate first, in three steps, and an input it refuses gets a reason and no label
probability:

1. **DICOM attributes** (when the input is DICOM): Modality (CR/DX/DR), BodyPartExamined, ViewPosition (PA/AP),
   Presentation Intent. A value that rules the input out refuses it; a missing or unknown one is written down
   and left to the image stage, never taken as a pass.
2. **The pixels**: a blank or constant image is unreadable.
3. **The image itself**: :class:`ImageGate`, a multinomial logistic regression over the model's own image
   embedding and a 32×32 thumbnail of the pixels (frontal vs lateral / CT / not a radiograph / inverted / ...),
   fitted by ``cxrclip fit-gate``. The embedding knows anatomy but is nearly blind to polarity — a negative film
   embeds close to its positive — while the thumbnail sees at once that the lungs are bright and the mediastinum
   dark. Its score is 1 − P(frontal); the threshold is chosen on validation frontal films for a target
   false-refusal rate (1 %).

Scoring is NumPy only (the bundle predicts without torch); fitting is ``cxrclip/fit_gate.py`` (scikit-learn).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cxrclip.exceptions import UserError

FRONTAL = "frontal"
FORMAT = 1
REASONS = {
    "lateral": "lateral view",
    "ct": "CT or other cross-sectional image",
    "not_radiograph": "not a radiograph",
    "rotated": "rotated film (not upright)",
    "inverted": "inverted (negative) image",
    "unreadable": "unreadable image",
}
ACCEPTED_MODALITIES = ("CR", "DX", "DR")  # DR is not a DICOM term, but some systems write it
FRONTAL_VIEWS = ("PA", "AP")
VIEW_KINDS = {"LL": "lateral", "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral", "LLD": "lateral decubitus",
              "RLD": "lateral decubitus", "LLO": "oblique", "RLO": "oblique", "OBL": "oblique"}  # fmt: skip
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO")
OTHER_PARTS = ("ABDOMEN", "PELVIS", "SKULL", "HEAD", "BRAIN", "HAND", "FOOT", "KNEE", "ANKLE", "HIP", "SHOULDER",
               "ELBOW", "WRIST", "SPINE", "NECK", "LEG", "ARM", "EXTREMITY", "BREAST", "FINGER", "FEMUR", "TIBIA",
               "HUMERUS", "FOREARM", "JAW", "SINUS", "DENTAL", "TEETH", "HEART")  # fmt: skip
MIN_CONTRAST = 2.0  # grey-level standard deviation under which an image is taken as blank
PIXEL_SIDE = 32  # the thumbnail the image stage reads beside the embedding (side × side grey levels)


class GateError(UserError, ValueError):
    """Gate data that cannot be fitted or a stored gate that cannot be read."""


def describe(kind: str) -> str:
    return REASONS.get(kind, kind.replace("_", " "))


@dataclass(frozen=True)
class Precheck:
    """What the DICOM attributes and the pixels say before the model looks: a refusal (``kind`` and ``reason``)
    or nothing against, with ``notes`` on what was checked and what was missing."""

    kind: str | None = None
    reason: str | None = None
    notes: tuple[str, ...] = ()
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # pixel_features(image)

    @property
    def refused(self) -> bool:
        return self.kind is not None


def dicom_check(facts: Mapping | None) -> Precheck:
    """Stage 1 from the attributes :func:`cxrclip.data.images.read_dicom` collected (``facts``); no facts or a
    non-DICOM input: nothing against it, the image stage decides."""
    if not facts or facts.get("format") != "DICOM":
        return Precheck()
    notes: list[str] = []

    def value(key: str) -> str:
        return str(facts.get(key) or "").strip().upper()

    modality = value("modality")
    if not modality:
        notes.append("Modality missing: the image stage decides")
    elif modality not in ACCEPTED_MODALITIES:
        kind = "ct" if modality in ("CT", "MR", "PT", "NM") else "not_radiograph"
        return Precheck(kind, f"DICOM Modality {modality}, not a radiograph (CR/DX)", tuple(notes))
    else:
        notes.append(f"Modality {modality}")
    part = value("body_part")
    if not part:
        notes.append("BodyPartExamined missing: the image stage decides")
    elif any(p in part for p in CHEST_PARTS):
        notes.append(f"BodyPartExamined {part}")
    elif any(p in part for p in OTHER_PARTS):
        return Precheck("not_chest", f"DICOM BodyPartExamined {part}, not the chest", tuple(notes))
    else:
        notes.append(f"BodyPartExamined {part} not recognised: the image stage decides")
    view = value("view_position")
    first = view.replace("_", " ").split(" ")[0] if view else ""
    if not view:
        notes.append("ViewPosition missing: the image stage decides")
    elif first in FRONTAL_VIEWS:
        notes.append(f"ViewPosition {view}")
    elif first in VIEW_KINDS or view in VIEW_KINDS:
        kind = VIEW_KINDS.get(first) or VIEW_KINDS[view]
        return Precheck("lateral" if kind == "lateral" else kind.replace(" ", "_"),
                        f"DICOM ViewPosition {view}: {kind} view", tuple(notes))  # fmt: skip
    else:
        notes.append(f"ViewPosition {view} not recognised: the image stage decides")
    if value("presentation_intent") == "FOR PROCESSING":
        return Precheck("unprocessed", "DICOM Presentation Intent FOR PROCESSING: a raw detector image", tuple(notes))
    laterality = value("image_laterality")
    if laterality in ("L", "R"):
        notes.append(f"ImageLaterality {laterality} (one side imaged): the image stage decides")
    return Precheck(notes=tuple(notes))


def pixel_check(image: np.ndarray) -> Precheck:
    """Stage 2: a blank or constant image (a failed export, a black frame) is unreadable."""
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 8:
        return Precheck("unreadable", f"unreadable image: shape {tuple(image.shape)}")
    spread = float(image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)].std())
    if spread < MIN_CONTRAST:
        return Precheck("unreadable", f"unreadable image: blank (grey-level spread {spread:.1f})")
    return Precheck()


def pixel_features(image: np.ndarray, side: int = PIXEL_SIDE) -> np.ndarray:
    """The image as the gate's pixel part reads it: a ``side`` × ``side`` area-averaged thumbnail, grey levels in
    [0, 1] (the same on every path: the image as read, before the model's transform)."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 1:
        return np.zeros(side * side, dtype=np.float32)
    thumb = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize((side, side), Image.Resampling.BOX)
    return np.asarray(thumb, dtype=np.float32).ravel() / 255.0


def precheck(image: np.ndarray, facts: Mapping | None = None, thumbnail: bool = False) -> Precheck:
    """Stages 1 and 2 together: the first refusal, else the DICOM stage's notes; with ``thumbnail`` (a gate that
    reads the pixels: :attr:`InputGate.reads_pixels`) the image's thumbnail for stage 3 — made only then, it costs
    a few milliseconds on a full-size film."""
    dicom = dicom_check(facts)
    thumb = pixel_features(image) if thumbnail else None
    if dicom.refused:
        return Precheck(dicom.kind, dicom.reason, dicom.notes, thumb)
    pixels = pixel_check(image)
    kind, reason = (pixels.kind, pixels.reason) if pixels.refused else (None, None)
    return Precheck(kind, reason, dicom.notes, thumb)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class ImageGate:
    """Stage 3: frontal chest radiograph vs the other kinds, over the model's L2-normalized image embedding and,
    when ``pixel_side`` > 0, the image's :func:`pixel_features` after it. ``coef`` (kinds × (dim + side²)) and
    ``intercept`` already hold the standardization; ``score`` = 1 − P(frontal); an image is refused when its
    score is above ``threshold``. (A gate stored before the pixel part has ``pixel_side`` 0 and reads the same.)"""

    kinds: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray
    threshold: float
    target_frr: float
    evidence: dict = field(default_factory=dict)
    pixel_side: int = 0

    def __post_init__(self):
        if FRONTAL not in self.kinds or len(self.kinds) < 2:
            raise GateError(f"a gate needs the kind {FRONTAL!r} and at least one other, got {list(self.kinds)}")
        if self.coef.shape != (len(self.kinds), self.coef.shape[1]) or self.intercept.shape != (len(self.kinds),):
            raise GateError(f"gate weights of shape {self.coef.shape} / {self.intercept.shape} for kinds {self.kinds}")

    @property
    def synthetic_only(self) -> bool:
        """Fitted on synthetic frontal films only (the demo's): its refusals of real films mean little."""
        return bool((self.evidence.get("fitted_on") or {}).get("synthetic_only"))

    @property
    def dim(self) -> int:
        """The embedding's size (the pixel part comes after it)."""
        return int(self.coef.shape[1]) - self.pixel_side**2

    def probabilities(self, emb, pixels=None) -> np.ndarray:
        """Images × kinds: P(kind | embedding, pixels); ``pixels``: :func:`pixel_features` per image, needed when
        the gate reads them."""
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise GateError(f"the gate was fitted on {self.dim}-d embeddings, got {emb.shape}: refit it for this model")
        if self.pixel_side:
            if pixels is None:
                raise GateError("this gate also reads the image's pixels: pass pixel_features() of each image")
            pixels = np.asarray(pixels, dtype=np.float64).reshape(len(emb), -1)
            if pixels.shape[1] != self.pixel_side**2:
                raise GateError(f"the gate reads {self.pixel_side}² pixels, got {pixels.shape[1]}")
            emb = np.concatenate([emb, pixels], axis=1)
        return _softmax(emb @ self.coef.T + self.intercept)

    def scores(self, emb, pixels=None) -> tuple[np.ndarray, list[str]]:
        """Per image: 1 − P(frontal), and the most likely kind other than frontal."""
        probs = self.probabilities(emb, pixels)
        j = self.kinds.index(FRONTAL)
        others = probs.copy()
        others[:, j] = -1.0
        return 1.0 - probs[:, j], [self.kinds[k] for k in others.argmax(axis=1)]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "kinds": list(self.kinds),
            "coef": self.coef.astype(float).tolist(),
            "intercept": self.intercept.astype(float).tolist(),
            "threshold": float(self.threshold),
            "target_frr": float(self.target_frr),
            "evidence": json.loads(json.dumps(self.evidence, default=float)),  # plain data: weights_only loads it
            "pixel_side": int(self.pixel_side),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ImageGate:
        if data.get("format") != FORMAT:
            raise GateError(f"stored gate format {data.get('format')!r}; this cxrclip reads format {FORMAT}")
        try:
            return cls(
                tuple(data["kinds"]),
                np.asarray(data["coef"], dtype=np.float64),
                np.asarray(data["intercept"], dtype=np.float64),
                float(data["threshold"]),
                float(data["target_frr"]),
                dict(data.get("evidence") or {}),
                int(data.get("pixel_side", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise GateError(f"the stored gate cannot be read ({e}); fit it again with `cxrclip fit-gate`") from e


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one input: ``analysed`` (labels are shown) or refused with ``reason``."""

    analysed: bool
    kind: str
    reason: str | None
    stage: str  # "dicom", "pixels", "image", or "none" (no image gate fitted and nothing against)
    score: float | None = None
    threshold: float | None = None
    enforced: bool = True
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["notes"] = list(self.notes)
        if self.score is not None:
            out["score"] = round(self.score, 4)
        if not self.enforced:
            out["note"] = "--no-gate: labels shown although the gate would refuse this input" if self.reason else ""
        return out


SYNTHETIC_ONLY = (
    "this model's gate has seen only the demo's synthetic films, not real radiographs: fit one on your own frontal "
    "films with `cxrclip fit-gate --checkpoint CKPT --frontal FRONTAL.csv --other OTHER.csv` (docs/USER_GUIDE.md 5b)"
)
NO_IMAGE_GATE = (
    "no image gate fitted for this model (`cxrclip fit-gate` fits one): only DICOM attributes and blank images "
    "were checked"
)


class InputGate:
    """The three stages for one model: ``image_gate`` may be None (a model with no fitted gate: only the DICOM
    and pixel stages run, and every answer says so); ``enforced=False`` (``--no-gate``) still computes and
    records the verdict but shows the labels."""

    def __init__(self, image_gate: ImageGate | None, enforced: bool = True):
        self.image_gate, self.enforced = image_gate, enforced

    @property
    def reads_pixels(self) -> bool:
        """Its image stage reads a thumbnail beside the embedding (the prechecks must carry one)."""
        return self.image_gate is not None and self.image_gate.pixel_side > 0

    def describe(self) -> dict:
        """What ``/v1/model`` and the bundle card say about the gate."""
        if self.image_gate is None:
            return {"fitted": False, "enforced": self.enforced, "note": NO_IMAGE_GATE}
        g = self.image_gate
        out = {"fitted": True, "enforced": self.enforced, "kinds": list(g.kinds), "threshold": g.threshold,
               "target_frr": g.target_frr, "evidence": g.evidence}  # fmt: skip
        return {**out, "note": SYNTHETIC_ONLY} if g.synthetic_only else out

    def verdicts(self, emb, prechecks: Sequence[Precheck]) -> list[Verdict]:
        emb = np.asarray(emb)
        if len(prechecks) != len(emb):
            raise ValueError(f"{len(prechecks)} prechecks for {len(emb)} embeddings")
        if self.image_gate is not None and len(emb):
            pixels = [p.pixels for p in prechecks] if self.image_gate.pixel_side else None
            if pixels is not None and any(p is None for p in pixels):
                raise GateError("this gate also reads the image's pixels: the prechecks carry none")
            scores, kinds = self.image_gate.scores(emb, None if pixels is None else np.stack(pixels))
        else:
            scores, kinds = [None] * len(emb), [None] * len(emb)
        threshold = None if self.image_gate is None else self.image_gate.threshold
        out = []
        for pre, score, kind in zip(prechecks, scores, kinds):
            score = None if score is None else float(score)
            if pre.refused:
                stage = "pixels" if pre.kind == "unreadable" else "dicom"
                verdict = Verdict(False, pre.kind, pre.reason, stage, score, threshold, notes=pre.notes)
            elif score is not None and score > threshold:
                reason = f"{describe(kind)} (gate score {score:.2f})"
                if self.image_gate.synthetic_only:  # the refusal may say more about the gate than about the image
                    reason += f"; {SYNTHETIC_ONLY}"
                verdict = Verdict(False, kind, reason, "image", score, threshold, notes=pre.notes)
            elif score is not None:
                verdict = Verdict(True, FRONTAL, None, "image", score, threshold, notes=pre.notes)
            else:
                verdict = Verdict(True, "unchecked", None, "none", notes=(*pre.notes, NO_IMAGE_GATE))
            if not self.enforced and not verdict.analysed:
                verdict = Verdict(True, verdict.kind, verdict.reason, verdict.stage, score, threshold, False,
                                  verdict.notes)  # fmt: skip
            out.append(verdict)
        return out


def stored_gate(data: Mapping | None, dim: int, *, enforced: bool = True, where: str = "the model") -> InputGate:
    """The :class:`InputGate` of a checkpoint's or bundle's stored ``gate`` entry (None: no image gate), checked
    against the model's embedding size."""
    image_gate = ImageGate.from_dict(data) if data else None
    if image_gate is not None and image_gate.dim != dim:
        raise GateError(
            f"{where}: its gate was fitted on {image_gate.dim}-d embeddings but the model gives {dim}-d ones; "
            "fit the gate again with `cxrclip fit-gate`"
        )
    return InputGate(image_gate, enforced)
