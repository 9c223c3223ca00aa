"""What one answer to a radiograph is in DICOM — the SR, and where the model looked (a Segmentation, an outline in
the SR, or the old Secondary Capture) — built the same way by ``inference.py --sr_out`` and ``cxrclip pacs``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cxrclip.pacs.seg import build_saliency_seg
from cxrclip.pacs.sr import build_heatmap_capture, build_sr, image_header
from cxrclip.predict.answer import Answer
from cxrclip.predict.gradcam import overlay, saliency_outline

EVERY_YES = "yes"  # --heatmap yes: every label the model calls YES
HEATMAP_FORMATS = ("seg", "fractional", "sc", "both")  # seg: BINARY; fractional: the whole map; sc: burnt in


def heatmap_labels(asked: Sequence[str], result: Answer) -> list[str]:
    """The labels whose Grad-CAM an answer carries: those asked for, in the model's order, and with ``yes`` every
    label called YES. A refused image has none."""
    if not result.analysed:
        return []
    return [n for n in result.labels if n in asked or (EVERY_YES in asked and result.labels[n].present)]


def answer_datasets(predictor, card: Mapping, ds, image: np.ndarray, result: Answer, asked: Sequence[str] = (),
                    heatmap_format: str = "seg") -> list:  # fmt: skip
    """``[SR, *maps]`` answering ``ds`` (its decoded pixels ``image``): with heatmap labels, the Segmentation of where
    the model looked (and the outline of it in the SR for each of those labels called YES) and/or the Grad-CAM
    burnt into Secondary Captures."""
    ds = image_header(ds)  # decoded once for every document of the answer (a film without its UIDs: SourceError)
    labels = heatmap_labels(asked, result)
    maps = {}
    if labels and heatmap_format in ("seg", "fractional", "both"):
        maps = {label: predictor.saliency_of(image, label) for label in labels}
    outlines = {label: saliency_outline(m) for label, m in maps.items() if result.labels[label].present}
    regions = {label: o for label, o in outlines.items() if len(o) >= 3}  # a map that is zero everywhere: none
    out = [build_sr(ds, result, card, regions=regions)]
    if maps:
        out.append(build_saliency_seg(ds, maps, card, fractional=heatmap_format == "fractional"))
    if labels and heatmap_format in ("sc", "both"):
        for label in labels:
            picture = overlay(predictor.picture_of(image, label), predictor.heatmap_of(image, label))
            out.append(build_heatmap_capture(ds, picture, label, card))
    return out
