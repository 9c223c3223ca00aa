"""Where the model looked, as a DICOM Segmentation a viewer overlays on the film: one FRACTIONAL segment per label
(the Grad-CAM carried back onto the radiograph's pixel grid, 0–1 as PROBABILITY-type fractions), referencing the
radiograph, its UID a function of image, model and labels (the same answer is the same instance).

A saliency map says which pixels moved the label's score most; it is not a segmentation of the finding (not a tube's
outline, not its tip) and must not be read as one — the segment's label and the series description say so."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from cxrclip import __version__
from cxrclip.pacs.sr import MANUFACTURER, derived_uid, finding_code, image_header, sr_uids

SEG_SERIES_NUMBER = 9903
DEVICE_FINDINGS = {"26412008", "52124006", "17102003"}  # endotracheal tube, central venous catheter, NG tube
# CIE Lab display colours (DICOM's scaled 0–65535 form): one per segment, distinct on a grey film
COLOURS = [(32768, 65535, 32768), (45000, 20000, 60000), (50000, 52000, 15000), (30000, 15000, 25000)]


@functools.lru_cache(maxsize=1)
def _categories():
    from pydicom.sr.codedict import codes

    return {"device": codes.SCT.PhysicalObject, "finding": codes.SCT.MorphologicallyAbnormalStructure}


def build_saliency_seg(source, maps: Mapping[str, np.ndarray], card: Mapping):
    """The Segmentation of ``maps`` (label → H×W map in [0, 1] on the radiograph's grid) answering ``source`` (the
    radiograph's dataset, with its image attributes) by the model ``card``."""
    import highdicom as hd

    sha = str(card["checkpoint_sha256"])
    labels = list(maps)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"cxrclip {card['name']}"[:64], family=hd.sr.CodedConcept("113164", "DCM", "Artificial Intelligence"),
        version=__version__, parameters={"method": "Grad-CAM", "checkpoint_sha256": sha},
    )  # fmt: skip
    descriptions = []
    for i, label in enumerate(labels, start=1):
        code = finding_code(label)
        category = _categories()["device" if code.value in DEVICE_FINDINGS else "finding"]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=f"{label[:50]} saliency", segmented_property_category=category,
            segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=derived_uid(source.SOPInstanceUID, sha, "seg", label),
            tracking_id=f"{label[:52]}: saliency", display_color=hd.color.CIELabColor(*_lab(i)),
        ))  # fmt: skip
    rows, columns = int(source.Rows), int(source.Columns)
    stack = np.zeros((1, rows, columns, len(labels)), dtype=np.float32)
    for i, label in enumerate(labels):
        stack[0, :, :, i] = np.clip(maps[label], 0.0, 1.0)
    series_uid, sop_uid = sr_uids(source.SOPInstanceUID, sha, kind="seg:" + "|".join(labels))
    seg = hd.seg.Segmentation(
        source_images=[image_header(source)], pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY, max_fractional_value=255,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=f"cxrclip {card['name']}"[:64], software_versions=f"cxrclip {__version__}",
        device_serial_number=sha[:64], content_label="SALIENCY",
        content_description="Grad-CAM: where the model looked (not an outline of the finding)",
        omit_empty_frames=False,
    )  # fmt: skip
    # General Image, Type 2C without a frame of reference: written empty (the segments lie on the referenced film's
    # own grid; PixelMed's validator expects one value where the standard has two, so a copied pair would fail it)
    seg.PatientOrientation = ""
    seg.SeriesDescription = "cxrclip where the model looked - not for diagnostic use"
    return seg


def _lab(i: int) -> tuple[float, float, float]:
    """A CIE Lab colour for segment ``i`` (L 0–100, a and b −128–127), from :data:`COLOURS`."""
    L, a, b = COLOURS[(i - 1) % len(COLOURS)]
    return L / 65535 * 100, a / 65535 * 255 - 128, b / 65535 * 255 - 128
