"""Where the model looked, as a DICOM Segmentation a viewer overlays on the film: one segment per label, on the
radiograph's own pixel grid (the Grad-CAM carried back through the model's resize and crop), referencing the
radiograph, its UID a function of image, model and labels (the same answer is the same instance).

BINARY (the default): the pixels where the map is at least ``level`` (½) of its maximum — what the OHIF Viewer 3.13
overlays (it refuses FRACTIONAL segmentations: "not yet supported"). FRACTIONAL (``fractional=True``): the whole
map, 0–1 as PROBABILITY-type fractions in 1/255 steps, for viewers that show them (3D Slicer, highdicom).

A saliency map says which pixels moved the label's score most; it is not a segmentation of the finding (not a tube's
outline, not its tip) and must not be read as one — the segment's label and the series description say so."""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping

import numpy as np

from cxrclip import __version__
from cxrclip.pacs.seg_template import SegTemplates
from cxrclip.pacs.sr import MANUFACTURER, derived_uid, finding_code, finding_kind, image_header, sr_uids

SEG_SERIES_NUMBER = 9903
# display colours, one per segment, distinct on a grey film (Okabe–Ito's colour-blind-safe set, less black and grey)
COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF"]


@functools.lru_cache(maxsize=1)
def _categories():
    from pydicom.sr.codedict import codes

    return {"device": codes.SCT.PhysicalObject, "finding": codes.SCT.MorphologicallyAbnormalStructure}


def build_saliency_seg(source, maps: Mapping[str, np.ndarray], card: Mapping, *, level: float = 0.5,
                       fractional: bool = False):  # fmt: skip
    """The Segmentation of ``maps`` (label → H×W map in [0, 1] on the radiograph's grid) answering ``source`` (the
    radiograph's dataset, with its image attributes) by the model ``card``.

    It is :func:`highdicom_seg`'s, byte for byte, filled into a template of the answer's shape
    (:mod:`cxrclip.pacs.seg_template`: a few ms instead of highdicom's ~12 and more)."""
    seg = _templates().seg(source, maps, card, level=level, fractional=fractional)
    return seg if seg is not None else highdicom_seg(source, maps, card, level=level, fractional=fractional)


@functools.lru_cache(maxsize=1)
def _templates() -> SegTemplates:
    return SegTemplates(highdicom_seg, sys.modules[__name__])


def frames(maps: Mapping[str, np.ndarray], labels: list[str], *, level: float = 0.5,
           fractional: bool = False) -> np.ndarray:  # fmt: skip
    """The frames of ``labels``' maps (n × H × W, uint8) as :func:`highdicom_seg` writes them: BINARY, 1 where the map
    (clipped to [0, 1]) is at least ``level`` of its maximum and above 0; FRACTIONAL, the clipped map × 255 rounded to
    the nearest integer in float32, as highdicom rounds it."""
    out = np.empty((len(labels), *np.shape(maps[labels[0]])), np.uint8)
    for i, label in enumerate(labels):
        m = np.asarray(maps[label])
        if fractional:
            out[i] = np.around(np.clip(m, 0.0, 1.0).astype(np.float32) * 255.0)
            continue
        top = float(m.max())  # clipping first changes no comparison below: it is left out (a copy of a film)
        cut = level * min(max(top, 0.0), 1.0)
        if top != top:  # NaN: no pixel compares true
            out[i] = 0
        elif cut > 0:
            np.greater_equal(m, cut, out=out[i])
        else:
            np.greater(m, 0, out=out[i])
    return out


def seg_uids(source_sop_uid: str, model_sha256: str, labels: list[str], fractional: bool = False) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the Segmentation of ``labels`` answering one image by one model (BINARY and
    FRACTIONAL are two documents: two instances)."""
    return sr_uids(source_sop_uid, model_sha256, kind="seg:" + "|".join(labels) + (":fractional" if fractional else ""))


def segment_tracking_uid(source_sop_uid: str, model_sha256: str, label: str) -> str:
    """The tracking UID of ``label``'s segment in the Segmentation answering one image by one model."""
    return derived_uid(source_sop_uid, model_sha256, "seg", label)


def highdicom_seg(source, maps: Mapping[str, np.ndarray], card: Mapping, *, level: float = 0.5,
                  fractional: bool = False):  # fmt: skip
    """:func:`build_saliency_seg` made by highdicom's Segmentation (the reference the templates are made from and
    tested against)."""
    import highdicom as hd

    sha = str(card["checkpoint_sha256"])
    header = image_header(source)  # a film without its UIDs is refused here
    labels = list(maps)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"cxrclip {card['name']}"[:64], family=hd.sr.CodedConcept("113164", "DCM", "Artificial Intelligence"),
        version=__version__, parameters={"method": "Grad-CAM", "checkpoint_sha256": sha},
    )  # fmt: skip
    descriptions = []
    for i, label in enumerate(labels, start=1):
        code = finding_code(label)
        category = _categories()[finding_kind(label)]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=f"{label[:50]} saliency", segmented_property_category=category,
            segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=segment_tracking_uid(header.SOPInstanceUID, sha, label),
            tracking_id=f"{label[:52]}: saliency",
            display_color=hd.color.CIELabColor.from_string(COLOURS[(i - 1) % len(COLOURS)]),
        ))  # fmt: skip
    rows, columns = int(header.Rows), int(header.Columns)
    stack = np.zeros((1, rows, columns, len(labels)), dtype=np.float32 if fractional else np.uint8)
    for i, label in enumerate(labels):  # the reference: the maps as they are, highdicom's rounding
        m = np.clip(maps[label], 0.0, 1.0)
        stack[0, :, :, i] = m if fractional else (m >= level * m.max()) & (m > 0)
    kind = {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY} if not fractional else {
        "segmentation_type": hd.seg.SegmentationTypeValues.FRACTIONAL, "max_fractional_value": 255,
        "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY}  # fmt: skip
    series_uid, sop_uid = seg_uids(header.SOPInstanceUID, sha, labels, fractional)
    seg = hd.seg.Segmentation(
        source_images=[header], pixel_array=stack, **kind,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=f"cxrclip {card['name']}"[:64], software_versions=f"cxrclip {__version__}",
        device_serial_number=sha[:64], content_label="SALIENCY",
        content_description="Grad-CAM: where the model looked, not the finding",
        omit_empty_frames=False, pixel_measures=hd.PixelMeasuresSequence(_spacing(header), None),
    )  # fmt: skip
    # one dimension organisation (by segment) for every Segmentation of this model: named by the model, not at random
    organisation = derived_uid(sha, "seg", "dimension organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = organisation
    # General Image, Type 2C without a frame of reference: written empty (the segments lie on the referenced film's
    # own grid; PixelMed's validator expects one value where the standard has two, so a copied pair would fail it)
    seg.PatientOrientation = ""
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "FrameOfReferenceUID" not in header and "PlaneOrientationSequence" not in shared:
        # a film has no patient frame: its rows and columns as the plane, the orientation viewers give a projection
        # image (the OHIF Viewer lays a Segmentation over a film only when it can compare the two)
        shared.PlaneOrientationSequence = hd.PlaneOrientationSequence("PATIENT", [1, 0, 0, 0, 1, 0])
    seg.SeriesDescription = "cxrclip where the model looked - not for diagnostic use"
    return seg


def _spacing(source) -> list[float]:
    """The film's pixel spacing in mm (at the detector for projection images: what viewers measure with), or 1 mm
    where the header has none: a viewer needs the Segmentation's Pixel Measures to lay it over the film."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = [float(v) for v in source[keyword].value]
            if len(value) == 2 and min(value) > 0:
                return value
        except Exception:  # absent or malformed
            continue
    return [1.0, 1.0]
