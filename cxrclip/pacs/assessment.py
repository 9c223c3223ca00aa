"""A reader's review of an AI answer, stored back in the PACS beside it: a verified DICOM SR (TID 2000 "Diagnostic
Imaging Report") that says per label what cxrclip answered and what the reader said of it — accepted, rejected, or
not assessed (the reader could not tell) — signed by the reader as verifying observer (VERIFIED, FINAL), citing
the radiograph as the source of every finding and cxrclip's SR as pertinent other evidence. The direction of IHE's
AI Result Assessment work: the archive holds the AI result and what a radiologist said of it.

Exactly once: the SR's UID is a function of the image and the review (a correction is a new review, so a new SR;
``Predecessor`` is not used, the review store keeps the chain). :func:`send_review` stores it only when the PACS does
not hold it yet, so the server's immediate send and ``cxrclip reviews to-pacs`` (which retries what a PACS outage
held back) never make two."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import NamedTuple

from cxrclip import __version__
from cxrclip.pacs.sr import MANUFACTURER, derived_uid, evidence_of, finding_code, sr_uids

REVIEW_SERIES_NUMBER = 9904
AI_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR: cxrclip's AI SR
ORGANIZATION = "cxrclip review"


class Reference(NamedTuple):
    """An instance by its UIDs (what a review SR cites of cxrclip's SR)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str


def review_uids(source_sop_uid: str, review_id: int) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SR of review ``review_id`` of an image: one series for an image's
    reviews, one instance per review."""
    return derived_uid(source_sop_uid, "review", "series"), derived_uid(source_sop_uid, "review", str(review_id))


def assessment(shown: Mapping, verdict: str | None) -> str:
    """What the reader said of cxrclip's decision on one label: accepted, rejected, or not assessed."""
    if verdict not in ("present", "absent"):
        return "not assessed (the reader could not tell)" if verdict == "unsure" else "not assessed"
    said = "present" if shown.get("present") else "absent"
    return "accepted" if verdict == said else f"rejected (the reader: {verdict})"


def build_review_sr(source, review: Mapping, ai_sr=None):
    """The verified SR of one review (a row of the review store) of the radiograph ``source`` (its dataset);
    ``ai_sr``: cxrclip's SR of that image by the reviewed model, when the PACS holds it (cited as evidence)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.sr.codedict import codes

    source = evidence_of(source)
    rel = hd.sr.RelationshipTypeValues
    reader = _person_name(review["reviewer"])
    source_of = hd.sr.CodedConcept("121112", "DCM", "Source of Measurement")
    verdicts = review["verdicts"]
    assessed = [n for n in review["shown"] if verdicts.get(n) in ("present", "absent")]
    # the findings the reader called present, coded; then per assessed label what cxrclip said and what the reader
    # said of it; then the labels the reader left (cxrclip's answers to them are in its own SR)
    findings = [hd.sr.CodeContentItem(codes.DCM.Finding, finding_code(n), relationship_type=rel.CONTAINS)
                for n in assessed if verdicts[n] == "present"]  # fmt: skip
    for label in assessed:
        shown = review["shown"][label]
        said = "present" if shown.get("present") else "absent"
        text = (f"{label}: cxrclip said {said} (probability {shown['probability']:.3f}, threshold "
                f"{shown['threshold']:.3f}, {shown['rule']}); {assessment(shown, verdicts[label])}.")  # fmt: skip
        item = hd.sr.TextContentItem(codes.DCM.Finding, text[:1024], relationship_type=rel.CONTAINS)
        film = hd.sr.ImageContentItem(source_of, source.SOPClassUID, source.SOPInstanceUID,
                                      relationship_type=rel.INFERRED_FROM)  # fmt: skip
        item.ContentSequence = hd.sr.ContentSequence([film], is_root=False)
        findings.append(item)
    left = [n for n in review["shown"] if n not in assessed]
    if left:
        unsure = [n for n in left if verdicts.get(n) == "unsure"]
        text = f"Not assessed by the reader: {', '.join(left)}" + (
            f" (could not tell: {', '.join(unsure)})." if unsure else "."
        )
        findings.append(hd.sr.TextContentItem(codes.DCM.Finding, text[:1024], relationship_type=rel.CONTAINS))
    if review.get("comment"):
        findings.append(hd.sr.TextContentItem(codes.DCM.Finding, f"Reader's comment: {review['comment']}"[:1024],
                                              relationship_type=rel.CONTAINS))  # fmt: skip
    section = hd.sr.ContainerContentItem(name=codes.DCM.Findings, relationship_type=rel.CONTAINS)
    section.ContentSequence = hd.sr.ContentSequence(findings, is_root=False)
    items = list(hd.sr.LanguageOfContentItemAndDescendants(
        language=hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")))  # fmt: skip
    items += hd.sr.ObservationContext(observer_person_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=reader),
    ))  # fmt: skip
    items.append(section)
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    series_uid, sop_uid = review_uids(source.SOPInstanceUID, int(review["id"]))
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=series_uid, series_number=REVIEW_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=True,
        is_verified=True, verifying_observer_name=reader, verifying_organization=ORGANIZATION,
    )  # fmt: skip
    when = review["created_at"]
    when = datetime.datetime.fromisoformat(when) if isinstance(when, str) else when
    sr.VerifyingObserverSequence[0].VerificationDateTime = when.strftime("%Y%m%d%H%M%S")
    sr.ContentDate, sr.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    sr.SeriesDescription = "cxrclip AI findings - reviewed by a reader"
    sr.SoftwareVersions = f"cxrclip {__version__}"
    if ai_sr is not None:  # the AI SR the reader assessed: pertinent other evidence (TID 2000 has no item for it)
        sop = Dataset()
        sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = ai_sr.SOPClassUID, ai_sr.SOPInstanceUID
        series = Dataset()
        series.SeriesInstanceUID, series.ReferencedSOPSequence = ai_sr.SeriesInstanceUID, Sequence([sop])
        study = Dataset()
        study.StudyInstanceUID, study.ReferencedSeriesSequence = ai_sr.StudyInstanceUID, Sequence([series])
        sr.PertinentOtherEvidenceSequence = Sequence([study])
    return sr


def _person_name(reviewer: str) -> str:
    """A reviewer's name as a DICOM person name: one component, the family name (``^`` and ``=`` kept out)."""
    name = "".join(ch for ch in str(reviewer) if ch.isprintable() and ch not in "^=\\")
    return (name[:63] or "unknown reader") + "^"


def send_review(pacs, review: Mapping) -> dict:
    """Store the SR of one review of a PACS image in its study, unless the PACS holds it already: ``{"sr_uid",
    "stored": True | False (already there), "ai_sr": UID | None}``. Raises what the PACS client raises."""
    study, series, sop = review["dicom"]["study"], review["dicom"]["series"], review["dicom"]["sop"]
    sr_uid = review_uids(sop, int(review["id"]))[1]
    ai_series, ai_uid = sr_uids(sop, review["model_sha256"])
    ai_known = pacs.has_instance(study, ai_uid)
    if pacs.has_instance(study, sr_uid):
        return {"sr_uid": sr_uid, "stored": False, "ai_sr": ai_uid if ai_known else None}
    ai_sr = Reference(study, ai_series, ai_uid, AI_SR_CLASS) if ai_known else None
    pacs.store([build_review_sr(pacs.retrieve(study, series, sop), review, ai_sr)], study)
    return {"sr_uid": sr_uid, "stored": True, "ai_sr": ai_uid if ai_known else None}
