"""The answer as a DICOM Comprehensive SR (highdicom), and back.

The template is our own, documented here and in docs/USER_GUIDE.md ("Connect to your PACS") — simpler than TID 1500,
whose measurement groups describe regions, not a whole-image classifier::

    CONTAINER (LN 18748-4 "Diagnostic imaging report")
      HAS OBS CONTEXT   device observer: UID, name "cxrclip", model = the model's name        (TID 1004)
      HAS CONCEPT MOD   TEXT Algorithm Name / Algorithm Version / Algorithm Parameters        (TID 4019)
                        (parameters: checkpoint SHA-256, gate, preprocessing size)
      CONTAINS          TEXT Comment = "Research software, not a medical device: not for diagnostic use. ..."
      CONTAINS          IMAGE Source Image = the radiograph (also in the evidence sequence)
      analysed:
      CONTAINS          CONTAINER Measurement Group, one per label:
                          CODE Finding = SNOMED CT code where one exists, else (99CXRCLIP, label)
                          TEXT (99CXRCLIP label) = the label's text, as in inference.py --json
                          NUM  Probability (DCM 122157), unit UCUM "1" = the calibrated P(yes)
                          NUM  Threshold Value (DCM 122411), unit "1"; TEXT (99CXRCLIP rule) = its rule
                          CODE (99CXRCLIP present) = Yes/No (SCT 373066001 / 373067005)
                          CODE (99CXRCLIP calibrated) = Yes/No; NUM (99CXRCLIP uncalibrated) = the raw sigmoid
      refused (--report-refusals):
      CONTAINS          TEXT (99CXRCLIP not-analysed) = the gate's reason; NUM (99CXRCLIP gate-score)

``read_sr`` turns such an SR back into the fields of ``inference.py --json`` (tests compare the two).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cxrclip import __version__
from cxrclip.io import atomic_write
from cxrclip.predict.answer import Answer, LabelAnswer
from cxrclip.predict.card import DISCLAIMER

logging.getLogger("highdicom").setLevel(logging.WARNING)  # otherwise a line per module it copies
SCHEME = "99CXRCLIP"  # a private coding scheme (PS3.16 8.2: "99" prefix) for what no standard code names
MANUFACTURER = "cxrclip"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
UID_NAMESPACE = uuid.UUID("6b0d3c1e-7a52-4c55-9d7e-2f0c8a1f4e21")  # cxrclip's namespace for derived UIDs
NOTICE = f"{DISCLAIMER} Each finding must be checked by a radiologist; probabilities come from a zero-shot model."


@functools.lru_cache(maxsize=1)
def _codes():
    """The concepts of the template, made once (every SR reuses them; nothing mutates them)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def private(value: str, meaning: str):
        return hd.sr.CodedConcept(value, SCHEME, meaning)

    return {
        "report": codes.LN.DiagnosticImagingReport,
        "group": codes.DCM.MeasurementGroup,
        "finding": codes.DCM.Finding,
        "probability": codes.DCM.Probability,
        "threshold": codes.DCM.ThresholdValue,
        "comment": codes.DCM.Comment,
        "source": codes.DCM.SourceImage,
        "label": private("label", "Label text"),
        "rule": private("rule", "Operating point rule"),
        "present": private("present", "Finding present"),
        "calibrated": private("calibrated", "Probability calibrated"),
        "uncalibrated": private("uncalibrated", "Uncalibrated probability"),
        "refused": private("not-analysed", "Not analysed"),
        "gate_score": private("gate-score", "Input gate score"),
        "yes": codes.SCT.Yes,
        "no": codes.SCT.No,
        "unit": hd.sr.CodedConcept("1", "UCUM", "no units"),
    }


# SNOMED CT codes (from pydicom's code dictionary) for the labels that have one; the others get a private code.
FINDING_CODES = {
    "pneumothorax": "Pneumothorax",
    "pneumomediastinum": "Pneumomediastinum",
    "foreign body": "ForeignBody",
}


def finding_code(label: str):
    from pydicom.sr.codedict import codes

    known = FINDING_CODES.get(label.strip().lower())
    if known:
        return getattr(codes.SCT, known)
    import highdicom as hd

    digest = hashlib.sha1(label.encode("utf-8")).hexdigest()[:6]  # unique per label; the meaning holds the text
    slug = "".join(ch for ch in label.lower() if ch.isalnum())[:9] or "label"
    return hd.sr.CodedConcept(f"{slug}-{digest}", SCHEME, label[:64])


def sr_uids(source_sop_uid: str, model_sha256: str, kind: str = "sr") -> tuple[str, str]:
    """(series UID, SOP instance UID) of the answer to one image by one model: derived from both, so a worker that
    answers the same image again (after a crash, on a second machine) writes the same instance, never a second one."""
    return (
        derived_uid(source_sop_uid, model_sha256, kind, "series"),
        derived_uid(source_sop_uid, model_sha256, kind, "instance"),
    )


def derived_uid(*parts: str) -> str:
    """A UID that is a function of ``parts``: a name-based (SHA-1) UUID under the 2.25 root (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join(parts)).int}"


# What an answer copies from the radiograph (Patient, General Study and the reference): Type 1 UIDs, the rest
# Type 2 — written empty where the archive's file lacks them or holds a value that is not valid for its VR.
REFERENCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
COPIED = {
    "PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS", "AccessionNumber": "SH",
    "StudyID": "SH", "StudyDate": "DA", "StudyTime": "TM", "ReferringPhysicianName": "PN",
}  # fmt: skip
VALID = {
    "DA": re.compile(r"\d{8}"),
    "TM": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"),
    "CS": re.compile(r"[A-Z0-9 _]{0,16}"),
}
MAX_LENGTH = {"PN": 64 * 5, "LO": 64, "SH": 16, "CS": 16, "DA": 8, "TM": 16}


class SourceError(ValueError):
    """The radiograph lacks what an answer must reference (one of :data:`REFERENCE`)."""


def evidence_of(source):
    """The radiograph's identity as an answer copies it: the UIDs, and the patient and study attributes decoded from
    whatever character set the archive declared (single or multi-valued, with ISO 2022 code extensions) into
    Python text — the answer is written in UTF-8 (ISO_IR 192), so every name survives, transcoded. An attribute
    the source lacks, or holds malformed (a date that is not a date), is written empty, as Type 2 allows."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for keyword in REFERENCE:
        value = _text(source, keyword)
        if not value:
            raise SourceError(f"the image has no {keyword}; an answer cannot reference it")
        setattr(out, keyword, value)
    for keyword, vr in COPIED.items():
        value = _text(source, keyword)
        pattern = VALID.get(vr)
        if pattern is not None and not pattern.fullmatch(value.upper() if vr == "CS" else value):
            value = ""
        if keyword == "PatientSex" and value not in ("M", "F", "O"):
            value = ""
        setattr(out, keyword, value[: MAX_LENGTH[vr]])
    out.SpecificCharacterSet = "ISO_IR 192"
    return out


def _text(source, keyword: str) -> str:
    """One attribute as text; absent, undecodable or unparsable values are ''."""
    import warnings

    if keyword not in source:
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each odd character set; the answer is UTF-8 anyway
        try:
            value = source[keyword].value
        except Exception:  # a value pydicom cannot convert to its VR (a malformed date, a broken escape sequence)
            return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return "".join(ch for ch in str(value) if ch.isprintable()).strip()


def build_sr(source, result: Answer, card: Mapping):
    """A Comprehensive SR answering ``source`` (the radiograph's dataset; its pixel data is not needed) with one
    prediction ``result`` (an :class:`~cxrclip.predict.answer.Answer`) by the model ``card`` (``predictor.card()``)."""
    import highdicom as hd

    source = evidence_of(source)
    c = _codes()
    rel = hd.sr.RelationshipTypeValues
    root = hd.sr.ContainerContentItem(name=c["report"], template_id=None)
    items = []
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(card), name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=str(card["name"])[:64]
    )
    items += hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"), observer_identifying_attributes=device
        )
    )
    gate = card.get("gate") or {}
    parameters = [
        f"checkpoint_sha256={card['checkpoint_sha256']}",
        f"image_size={card.get('image_size')}",
        f"precision={card.get('precision', 'fp32')}",
        f"calibration={card.get('calibration', 'default')}",
        f"gate={'fitted' if gate.get('fitted') else 'none'}, enforced={gate.get('enforced', True)}",
    ]
    items += hd.sr.AlgorithmIdentification(
        name=f"cxrclip {card['name']}"[:64], version=__version__, parameters=parameters
    )
    items.append(hd.sr.TextContentItem(c["comment"], NOTICE, relationship_type=rel.CONTAINS))
    items.append(
        hd.sr.ImageContentItem(c["source"], source.SOPClassUID, source.SOPInstanceUID, relationship_type=rel.CONTAINS)
    )
    if not result.analysed:
        items.append(hd.sr.TextContentItem(c["refused"], str(result.reason)[:1024], relationship_type=rel.CONTAINS))
        if result.gate.score is not None:
            items.append(_num(c, c["gate_score"], result.gate.score))
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    series_uid, sop_uid = sr_uids(source.SOPInstanceUID, card["checkpoint_sha256"])
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # a model's answer is never a final, verified report
        is_verified=False,
    )
    # The label groups are highdicom content items too, appended after the document is built: passed through
    # ComprehensiveSR they cost ~170 ms per SR (it re-reads and searches the whole tree), appended ~25 ms.
    # They hold no references, so the evidence the constructor collected stays complete; dciodvfy checks the result.
    if result.analysed:
        for label, v in result.labels.items():
            sr.ContentSequence.append(_label_group(c, label, v))
    sr.SeriesDescription = "cxrclip AI findings - not for diagnostic use"
    return sr


def _label_group(c, label: str, v: LabelAnswer):
    import highdicom as hd

    rel = hd.sr.RelationshipTypeValues
    group = hd.sr.ContainerContentItem(name=c["group"], relationship_type=rel.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(c["finding"], finding_code(label), relationship_type=rel.CONTAINS),
            hd.sr.TextContentItem(c["label"], label, relationship_type=rel.CONTAINS),
            _num(c, c["probability"], v.probability),
            _num(c, c["threshold"], v.threshold),
            hd.sr.TextContentItem(c["rule"], str(v.rule), relationship_type=rel.CONTAINS),
            _yes_no(c, c["present"], v.present),
            _yes_no(c, c["calibrated"], v.calibrated),
            _num(c, c["uncalibrated"], v.uncalibrated_probability),
        ],
        is_root=False,
    )
    return group


def _device_uid(card: Mapping) -> str:
    return derived_uid("device", str(card["checkpoint_sha256"]))


def _num(c, name, value):
    import highdicom as hd

    return hd.sr.NumContentItem(
        name, float(value), unit=c["unit"], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _yes_no(c, name, flag: bool):
    import highdicom as hd

    return hd.sr.CodeContentItem(
        name, c["yes"] if flag else c["no"], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def build_heatmap_capture(source, rgb: np.ndarray, label: str, card: Mapping):
    """The Grad-CAM overlay of one label as a Secondary Capture image in the radiograph's study."""
    import highdicom as hd

    series_uid, sop_uid = sr_uids(source.SOPInstanceUID, card["checkpoint_sha256"], kind=f"heatmap:{label}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence_of(source),
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
    )
    sc.SeriesDescription = f"cxrclip Grad-CAM {label} - not for diagnostic use"[:64]
    sc.Laterality = ""  # General Series, type 2C: the chest is not a paired body part
    sc.ImageComments = f"Grad-CAM of '{label}'. {DISCLAIMER}"
    sc.BurnedInAnnotation = "NO"
    return sc


def _concept(item) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def _value(item):
    kind = item.ValueType
    if kind == "NUM":
        measured = item.MeasuredValueSequence[0]
        return float(measured.get("FloatingPointValue", measured.NumericValue))
    if kind == "TEXT":
        return str(item.TextValue)
    if kind == "CODE":
        code = item.ConceptCodeSequence[0]
        return (str(code.CodingSchemeDesignator), str(code.CodeValue), str(code.CodeMeaning))
    if kind == "IMAGE":
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


YES = ("SCT", "373066001")


def read_sr(ds) -> dict:
    """An SR written by :func:`build_sr` → ``{"source", "analysed", "labels" | "reason", "algorithm", "notice"}``,
    the labels as ``inference.py --json`` prints them (without the ranking)."""
    out: dict = {"sop_instance_uid": str(ds.SOPInstanceUID), "algorithm": {}, "parameters": []}
    labels: dict = {}
    for item in ds.ContentSequence:
        concept, value = _concept(item), _value(item)
        if concept == ("DCM", "111001"):
            out["algorithm"]["name"] = value
        elif concept == ("DCM", "111003"):
            out["algorithm"]["version"] = value
        elif concept == ("DCM", "111002"):
            out["parameters"].append(value)
        elif concept == ("DCM", "121106"):
            out["notice"] = value
        elif concept == ("DCM", "121324"):
            out["source"] = value
        elif concept == (SCHEME, "not-analysed"):
            out["reason"] = value
        elif concept == (SCHEME, "gate-score"):
            out["gate_score"] = value
        elif concept == ("DCM", "125007"):
            fields = {_concept(i): (_value(i), i) for i in item.ContentSequence}
            name = fields[(SCHEME, "label")][0]
            labels[name] = {
                "finding": fields[("DCM", "121071")][0],
                "probability": fields[("DCM", "122157")][0],
                "threshold": fields[("DCM", "122411")][0],
                "rule": fields[(SCHEME, "rule")][0],
                "present": fields[(SCHEME, "present")][0][:2] == YES,
                "calibrated": fields[(SCHEME, "calibrated")][0][:2] == YES,
                "uncalibrated_probability": fields[(SCHEME, "uncalibrated")][0],
            }
    out["analysed"] = "reason" not in out
    if labels:
        out["labels"] = labels
    return out


def write_sr(sr, folder: str | Path) -> Path:
    """``<folder>/<SR SOP Instance UID>.dcm``, written atomically."""
    path = Path(folder) / f"{sr.SOPInstanceUID}.dcm"
    return atomic_write(path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))
