"""The answer as a DICOM SR the radiologist's viewer reads (IHE Radiology "AI Results"), and back.

A Comprehensive 3D SR rooted at TID 1500 "Imaging Measurement Report", written with highdicom's TID 1500 builders
(documented in docs/USER_GUIDE.md, "Connect to your PACS"; PixelMed's validator finds no error and no item outside
the template, dciodvfy no error)::

    CONTAINER (DCM 126000 "Imaging Measurement Report")                                   TID 1500
      language, device observer (UID, "cxrclip", model = the model's name)                 TID 1204 / 1004
      CODE Procedure Reported = SCT 363679005 "Imaging procedure" (the radiograph, not the algorithm)
      CONTAINER Image Library: the radiograph                                              TID 1600
      CONTAINER (DCM 126010 "Imaging Measurements")
        analysed, one image-level group per label:                                         TID 1501
          TEXT Tracking Identifier = the label; UIDREF Tracking UID (a function of image, model, label)
          CODE Finding = SNOMED CT where one exists, else (99CXRCLIP, label)
          TID 4019: Algorithm Name / Version / Parameters (the model's: checkpoint SHA-256, preprocessing,
                    precision, calibration, gate; the label's: operating-point rule, calibrated yes/no)
          NUM Probability (DCM 122157) = the calibrated P(yes), INFERRED FROM a SCOORD polyline along the film's
              edges (an image-level answer; a viewer that draws measurements needs coordinates for each)
          NUM Threshold Value (DCM 122411); NUM (99CXRCLIP uncalibrated) = the raw sigmoid
          IMAGE Source image = the radiograph
        per label called YES with a heat map (--heatmap): a planar region group            TID 1410
          the label's own Tracking Identifier and UID (one finding: how likely, and where), SCOORD POLYLINE
          (closed) = the outline of the Grad-CAM's hottest connected area; the Segmentation beside it holds the
          area for every heat-map label
        refused (--report-refusals): one group "input gate": Finding (99CXRCLIP not-analysed),
          NUM (99CXRCLIP gate-score)
      CONTAINER (UMLS C0034375 "Qualitative Evaluations")
        CODE <finding> = SCT Present / Absent, per label (what the operating point decided)
        TEXT Comment = "Research software, not a medical device ..."; TEXT (99CXRCLIP not-analysed) = the reason

The model is also named in the Contributing Equipment Sequence (manufacturer, model name, version, the checkpoint's
SHA-256 as serial number, its parameters as the contribution description).

``read_sr`` turns such an SR — or one of the template written before (a PACS keeps what it was sent) — back into
the fields of ``inference.py --json`` (tests compare the two).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cxrclip import __version__
from cxrclip.io import atomic_write
from cxrclip.pacs.sr_template import Templates
from cxrclip.predict.answer import Answer
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
        "procedure": codes.SCT.ImagingProcedure,
        "probability": codes.DCM.Probability,
        "threshold": codes.DCM.ThresholdValue,
        "comment": codes.DCM.Comment,
        "qualitative": hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        "present": codes.SCT.Present,
        "absent": codes.SCT.Absent,
        "processing": codes.DCM.ProcessingEquipment,
        "uncalibrated": private("uncalibrated", "Uncalibrated probability"),
        "refused": private("not-analysed", "Not analysed"),
        "gate_score": private("gate-score", "Input gate score"),
        "unit": hd.sr.CodedConcept("1", "UCUM", "no units"),
    }


# SNOMED CT codes for the labels that have one (checked against pydicom's code dictionary and HL7's published value
# sets); a malposition is not the device, so it keeps a private code, like the labels no code names.
# A device's code says what the finding is (a Segmentation files its segment as a physical object).
FINDING_CODES = {
    "endotracheal tube in place": ("26412008", "Endotracheal tube", "device"),
    "central venous catheter in place": ("52124006", "Central venous catheter", "device"),
    "ng tube in place": ("17102003", "Nasogastric tube", "device"),
    "pneumothorax": ("36118008", "Pneumothorax", "finding"),
    "pneumomediastinum": ("16838000", "Pneumomediastinum", "finding"),
    "foreign body": ("19227008", "Foreign body", "finding"),
}


def finding_kind(label: str) -> str:
    """``device`` for a label whose code names a device, else ``finding``."""
    return FINDING_CODES.get(label.strip().lower(), ("", "", "finding"))[2]


@functools.lru_cache(maxsize=256)
def _finding_triple(label: str) -> tuple[str, str, str]:
    known = FINDING_CODES.get(label.strip().lower())
    if known:
        return known[0], "SCT", known[1]
    digest = hashlib.sha1(label.encode("utf-8")).hexdigest()[:6]  # unique per label; the meaning holds the text
    slug = "".join(ch for ch in label.lower() if ch.isalnum())[:9] or "label"
    return f"{slug}-{digest}", SCHEME, label[:64]


def finding_code(label: str):
    """The label's finding as a coded concept: SNOMED CT where one exists, else private. A new object each call
    (a content item is a dataset that lives in one tree)."""
    import highdicom as hd

    return hd.sr.CodedConcept(*_finding_triple(label))


def presence_code(present: bool):
    """The coded answer of the qualitative evaluations: SCT Present or Absent, as the content item holds it."""
    import highdicom as hd

    c = _codes()
    return hd.sr.CodedConcept.from_code(c["present"] if present else c["absent"])


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


def model_parameters(card: Mapping) -> list[str]:
    """What identifies how the model answered, as TID 4019 parameters and the contribution description."""
    gate = card.get("gate") or {}
    return [
        f"checkpoint_sha256={card['checkpoint_sha256']}",
        f"image_size={card.get('image_size')}",
        f"precision={card.get('precision', 'fp32')}",
        f"calibration={card.get('calibration', 'default')}",
        f"gate={'fitted' if gate.get('fitted') else 'none'}, enforced={gate.get('enforced', True)}",
    ]


def build_sr(source, result: Answer, card: Mapping, regions: Mapping[str, np.ndarray] | None = None):
    """A TID 1500 SR answering ``source`` (the radiograph's dataset; its pixel data is not needed) with one
    prediction ``result`` (an :class:`~cxrclip.predict.answer.Answer`) by the model ``card`` (``predictor.card()``).
    ``regions``: per label called YES, the outline of where the model looked (:func:`saliency_outline`), written as
    a planar region group a viewer draws on the film.

    The document is :func:`highdicom_sr`'s, byte for byte, filled into a template of the answer's shape
    (:mod:`cxrclip.pacs.sr_template`: a few ms instead of highdicom's ~80–100)."""
    sr = _templates().sr(source, result, card, regions)
    return sr if sr is not None else highdicom_sr(source, result, card, regions)


@functools.lru_cache(maxsize=1)
def _templates() -> Templates:
    return Templates(highdicom_sr, sys.modules[__name__])


def highdicom_sr(source, result: Answer, card: Mapping, regions: Mapping[str, np.ndarray] | None = None):
    """:func:`build_sr` made item by item with highdicom's TID 1500 builders (the reference the templates are made
    from and tested against)."""
    import highdicom as hd

    library = _library_entry(source)
    whole = whole_image(source)
    source = evidence_of(source)
    c = _codes()
    rel = hd.sr.RelationshipTypeValues
    params = model_parameters(card)
    name, sha = f"cxrclip {card['name']}"[:64], str(card["checkpoint_sha256"])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(card), name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=str(card["name"])[:64]
    )
    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"), observer_identifying_attributes=device
        )
    )
    image = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
    groups = []
    qualitative = []
    if result.analysed:
        for label, v in result.labels.items():
            algorithm = hd.sr.AlgorithmIdentification(name=name, version=__version__, parameters=[
                *params, f"rule={v.rule}", f"calibrated={'yes' if v.calibrated else 'no'}"])  # fmt: skip
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(tracking_uid(source, sha, label), label[:64]),
                finding_type=finding_code(label), algorithm_id=algorithm, source_images=[image],
                measurements=[_measure(c, c["probability"], v.probability, whole, source),
                              _measure(c, c["threshold"], v.threshold),
                              _measure(c, c["uncalibrated"], v.uncalibrated_probability)],
            ))  # fmt: skip
            qualitative.append(hd.sr.CodeContentItem(
                finding_code(label), presence_code(v.present), relationship_type=rel.CONTAINS
            ))  # fmt: skip
        for label, outline in (regions or {}).items():
            groups.append(_region_group(source, sha, label, outline, name, params))
    else:
        algorithm = hd.sr.AlgorithmIdentification(name=name, version=__version__, parameters=params)
        score = [] if result.gate.score is None else [_measure(c, c["gate_score"], result.gate.score)]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(tracking_uid(source, sha, "input gate"), "input gate"),
            finding_type=c["refused"], algorithm_id=algorithm, source_images=[image], measurements=score,
        ))  # fmt: skip
        qualitative.append(
            hd.sr.TextContentItem(c["refused"], str(result.reason)[:1024], relationship_type=rel.CONTAINS)
        )
    qualitative.append(hd.sr.TextContentItem(c["comment"], NOTICE, relationship_type=rel.CONTAINS))
    # The document is made around the first group only, and the rest appended to its Imaging Measurements after:
    # passed through the constructor, each group costs it ~20 ms (it copies and searches the whole tree). The groups
    # reference only the radiograph, already the evidence, so the evidence stays complete (PixelMed and dciodvfy
    # check the result).
    report = hd.sr.MeasurementReport(
        observation_context=observation, procedure_reported=c["procedure"], imaging_measurements=groups[:1],
        referenced_images=library,
    )  # fmt: skip
    root = report[0]
    box = hd.sr.ContainerContentItem(name=c["qualitative"], relationship_type=rel.CONTAINS)
    box.ContentSequence = hd.sr.ContentSequence(qualitative, is_root=False)
    root.ContentSequence.append(box)
    series_uid, sop_uid = sr_uids(source.SOPInstanceUID, sha)
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=c["processing"], manufacturer_model_name=name,
        software_versions=f"cxrclip {__version__}", device_serial_number=sha[:64],
        contribution_description="; ".join(params)[:1024],
    )  # fmt: skip
    sr = hd.sr.Comprehensive3DSR(
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
        contributing_equipment=[equipment],
    )
    measurements = next(i for i in sr.ContentSequence if _concept(i) == ("DCM", "126010"))
    for group in groups[1:]:
        measurements.ContentSequence.extend(group)
    sr.SeriesDescription = "cxrclip AI findings - not for diagnostic use"
    return sr


# What the image library (TID 1602/1603) and a Segmentation copy of the radiograph's image attributes, where present
IMAGE_ATTRIBUTES = (
    "Modality", "Rows", "Columns", "PatientOrientation", "ImagerPixelSpacing", "PixelSpacing", "FrameOfReferenceUID",
    "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SeriesNumber",
    "InstanceNumber", "NumberOfFrames",
)  # fmt: skip


def image_header(source):
    """The radiograph's identity (:func:`evidence_of`) and its image attributes, each left out where absent or
    malformed. A header is its own header: an answer's builders given one (:func:`answer_datasets` makes it once
    for the SR and the Segmentation) do not decode the film again."""
    if getattr(source, "_cxrclip_image_header", False):
        return source
    header = evidence_of(source)
    for keyword in IMAGE_ATTRIBUTES:
        try:
            if keyword in source and source[keyword].value not in (None, ""):
                setattr(header, keyword, source[keyword].value)
        except Exception:  # a malformed value: left out
            continue
    header._cxrclip_image_header = True
    return header


def _library_entry(source) -> list | None:
    """The radiograph as TID 1600's image library describes it (size, orientation, detector spacing), or None where
    its header lacks what that needs (the SR still references it, in the evidence and in every group)."""
    import highdicom as hd

    entry = image_header(source)
    try:
        hd.sr.ImageLibraryEntryDescriptors(entry)
    except Exception:  # an archive's header without Type 1 orientation or spacing: no library entry
        return None
    return [entry]


def _region_group(source, sha: str, label: str, outline: np.ndarray, name: str, params):
    """TID 1410: where the model looked for ``label`` — a closed polyline in the film's pixel coordinates. The group
    carries the finding's own tracking identifier and UID (one finding, two groups: how likely, and where), so a
    viewer shows the image-level group's probability beside the drawn outline."""
    import highdicom as hd

    points = region_points(outline)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID),
    )  # fmt: skip
    method = "region=Grad-CAM, the connected area around its maximum at >= half of it (a saliency area)"
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=__version__, parameters=[*params, method])
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(tracking_uid(source, sha, label), label[:64]),
        referenced_region=region, finding_type=finding_code(label), algorithm_id=algorithm,
    )  # fmt: skip


def region_points(outline) -> np.ndarray:
    """An outline as the region's polyline: float32 (column, row) points, closed (TID 1410: first point == last)."""
    points = np.asarray(outline, dtype=np.float32)
    if len(points) and not np.array_equal(points[0], points[-1]):
        points = np.concatenate([points, points[:1]])
    return points


def tracking_uid(source, sha: str, what: str) -> str:
    """The tracking UID of one finding (or of the input gate) in the SR answering ``source`` by the model ``sha``."""
    return derived_uid(source.SOPInstanceUID, sha, "tracking", what)


def _device_uid(card: Mapping) -> str:
    return derived_uid("device", str(card["checkpoint_sha256"]))


def _measure(c, name, value, where: np.ndarray | None = None, source=None):
    """A NUM (TID 300); ``where``: the outline it was inferred from, on ``source``."""
    import highdicom as hd

    coordinates = None
    if where is not None:
        image = hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID)
        coordinates = [hd.sr.CoordinatesForMeasurement(hd.sr.GraphicTypeValues.POLYLINE, where, image)]
    return hd.sr.Measurement(name=name, value=float(value), unit=c["unit"], referenced_coordinates=coordinates)


def whole_image(source) -> np.ndarray | None:
    """The film's outline (a closed polyline along its edges): what an image-level answer was inferred from."""
    try:
        rows, columns = int(source.Rows), int(source.Columns)
    except Exception:  # absent or malformed
        return None
    return np.array([[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]], dtype=np.float32)


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


YES = ("SCT", "373066001")  # the template before TID 1500 said Yes / No
PRESENT = ("SCT", "52101004")
REPORT = ("DCM", "126000")
ALGORITHM = {("DCM", "111001"): "name", ("DCM", "111003"): "version"}
PARAMETER = ("DCM", "111002")


def read_sr(ds) -> dict:
    """An SR written by :func:`build_sr` (or by the template before it) → ``{"source", "analysed", "labels" |
    "reason", "algorithm", "parameters", "notice"}`` (and ``"regions"``: label → outline, where the SR has them), the
    labels as ``inference.py --json`` prints them (without the ranking)."""
    if _concept(ds) != REPORT:
        return _read_before_tid1500(ds)
    out: dict = {"sop_instance_uid": str(ds.SOPInstanceUID), "algorithm": {}, "parameters": []}
    labels: dict = {}
    regions: dict = {}
    by_code: dict = {}
    for item in ds.ContentSequence:
        concept = _concept(item)
        if concept == ("DCM", "126010"):  # Imaging Measurements
            for group in item.get("ContentSequence", []):
                _read_group(group, out, labels, regions, by_code)
        elif concept == ("DCM", "111028"):  # Image Library
            for entry in item.ContentSequence:
                for image in entry.get("ContentSequence", []):
                    if image.ValueType == "IMAGE":
                        out["source"] = _value(image)
        elif concept == ("UMLS", "C0034375"):  # Qualitative Evaluations
            for entry in item.ContentSequence:
                what, value = _concept(entry), _value(entry)
                if what == ("DCM", "121106"):
                    out["notice"] = value
                elif what == (SCHEME, "not-analysed"):
                    out["reason"] = value
                elif entry.ValueType == "CODE" and what in by_code:
                    labels[by_code[what]]["present"] = value[:2] == PRESENT
    out["analysed"] = "reason" not in out
    out.setdefault("source", out.pop("group_source", None))
    if labels:
        out["labels"] = labels
    if regions:
        out["regions"] = regions
    return out


def _read_group(group, out: dict, labels: dict, regions: dict, by_code: dict) -> None:
    fields: dict = {}
    params: list[str] = []
    outline = None
    for item in group.ContentSequence:
        concept = _concept(item)
        if concept == ("DCM", "111001") or concept == ("DCM", "111003"):
            out["algorithm"][ALGORITHM[concept]] = _value(item)
        elif item.ValueType == "SCOORD":
            outline = np.asarray(item.GraphicData, dtype=np.float32).reshape(-1, 2)
            out.setdefault("group_source", _value(item.ContentSequence[0]))
        elif item.ValueType == "IMAGE":
            out.setdefault("group_source", _value(item))
        elif concept == PARAMETER:
            params.append(_value(item))
        fields[concept] = _value(item)
    tracking = fields[("DCM", "112039")]
    own = [x for x in params if x.startswith(("rule=", "calibrated=", "region="))]
    if not out["parameters"]:
        out["parameters"] = [x for x in params if x not in own]
    if outline is not None:  # TID 1410: where the model looked for the label it is tracked under
        regions[tracking] = outline
        return
    finding = fields[("DCM", "121071")]
    if finding[:2] == (SCHEME, "not-analysed"):
        if ("99CXRCLIP", "gate-score") in fields:
            out["gate_score"] = fields[("99CXRCLIP", "gate-score")]
        return
    rule = next((x.removeprefix("rule=") for x in own if x.startswith("rule=")), None)
    labels[tracking] = {
        "finding": finding,
        "probability": fields[("DCM", "122157")],
        "threshold": fields[("DCM", "122411")],
        "rule": rule,
        "present": None,  # from the Qualitative Evaluations
        "calibrated": "calibrated=yes" in own,
        "uncalibrated_probability": fields[(SCHEME, "uncalibrated")],
    }
    by_code[finding[:2]] = tracking


def _read_before_tid1500(ds) -> dict:
    """The template cxrclip wrote before TID 1500 (a DIAGNOSTIC IMAGING REPORT with one group per label)."""
    out: dict = {"sop_instance_uid": str(ds.SOPInstanceUID), "algorithm": {}, "parameters": []}
    labels: dict = {}
    for item in ds.ContentSequence:
        concept, value = _concept(item), _value(item)
        if concept in ALGORITHM:
            out["algorithm"][ALGORITHM[concept]] = value
        elif concept == PARAMETER:
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
            fields = {_concept(i): _value(i) for i in item.ContentSequence}
            labels[fields[(SCHEME, "label")]] = {
                "finding": fields[("DCM", "121071")],
                "probability": fields[("DCM", "122157")],
                "threshold": fields[("DCM", "122411")],
                "rule": fields[(SCHEME, "rule")],
                "present": fields[(SCHEME, "present")][:2] == YES,
                "calibrated": fields[(SCHEME, "calibrated")][:2] == YES,
                "uncalibrated_probability": fields[(SCHEME, "uncalibrated")],
            }
    out["analysed"] = "reason" not in out
    if labels:
        out["labels"] = labels
    return out


def write_sr(sr, folder: str | Path) -> Path:
    """``<folder>/<SR SOP Instance UID>.dcm``, written atomically."""
    path = Path(folder) / f"{sr.SOPInstanceUID}.dcm"
    return atomic_write(path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))
