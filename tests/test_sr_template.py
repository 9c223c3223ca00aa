"""The SR filled into a template is highdicom's document byte for byte (issue 36 item 4): every archive variant,
analysed and refused, each finding present and absent, a second film of a shape after the first, a film of another
size; a shape that cannot be templated is built by highdicom."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pydicom
import pytest
from pydicom.valuerep import DA, DT, TM

from cxrclip.pacs import sr as srmod
from cxrclip.pacs.sr import build_sr, highdicom_sr, read_sr
from cxrclip.pacs.sr_template import MAX_TEMPLATES, NotTemplated, Templates
from cxrclip.predict.answer import Answer, GateVerdict
from cxrclip.synthetic import radiograph_dicom
from tests.dicom_variants import variants
from tests.test_dicom_results import CARD, FRONTAL, LATERAL, answer_of_13

NOW = datetime.datetime(2026, 12, 8, 1, 2, 3, 456789)


def encoded(ds) -> bytes:
    fp = io.BytesIO()
    pydicom.dcmwrite(fp, ds)
    return fp.getvalue()


def reference(source, result, card=CARD, regions=None) -> bytes:
    """highdicom's document, its times set to NOW (highdicom takes the moment it is built)."""
    ds = highdicom_sr(source, result, card, regions)
    ds.InstanceCreationDate, ds.InstanceCreationTime = DA(NOW.date()), TM(NOW.time())
    ds.ContentDate, ds.ContentTime = DA(NOW.date()), TM(NOW.time())
    for item in ds.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(NOW)
    return encoded(ds)


def flipped(result: Answer) -> Answer:
    """Every decision the other way, other values: the same shape."""
    labels = {n: v.model_copy(update={"present": not v.present, "probability": 1 - v.probability,
                                      "uncalibrated_probability": v.uncalibrated_probability / 3})
              for n, v in result.labels.items()}  # fmt: skip
    return result.model_copy(update={"labels": labels})


def test_every_archive_variant_analysed_and_refused_is_highdicoms_document_byte_for_byte():
    templates = Templates(highdicom_sr, srmod)
    refused_no_score = GateVerdict(analysed=False, kind="unreadable", reason="no pixels", stage="dicom")
    answers = [answer_of_13(), flipped(answer_of_13()), Answer(analysed=False, reason=LATERAL.reason, gate=LATERAL),
               Answer(analysed=False, reason="no pixels", gate=refused_no_score)]  # fmt: skip
    checked = 0
    for name, film in variants():
        try:
            srmod.evidence_of(film)
        except srmod.SourceError:
            continue  # a film without its UIDs gets no SR either way (tested in test_pacs)
        for result in answers:
            fast = templates.sr(film, result, CARD, now=NOW)
            assert fast is not None, name
            assert encoded(fast) == reference(film, result), (name, result.analysed)
            checked += 1
    assert checked >= 4 * 20
    # most variants differ in identity, character set or pixel encoding, not in what the SR holds: 4 answer shapes ×
    # 3 image library entries (the film's size, spacing and orientation, or none) served them all
    assert len(templates.templates) == 12 and not templates.untemplated


def test_a_second_film_fills_the_first_ones_template_and_reads_back_as_it():
    templates = Templates(highdicom_sr, srmod)
    first = radiograph_dicom(np.zeros((320, 256), np.uint16), patient_id="P-1")
    second = radiograph_dicom(np.ones((320, 256), np.uint16), patient_id="P-2")
    second.PatientName, second.StudyDate = "Chen^Mei", "19990101"
    first.FrameOfReferenceUID, second.FrameOfReferenceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    result = answer_of_13()
    templates.sr(first, result, CARD, now=NOW)
    made = templates.make
    templates.make = lambda *a: pytest.fail("the second film's shape should have been templated")
    sr = templates.sr(second, flipped(result), CARD, now=NOW)
    templates.make = made
    assert encoded(sr) == reference(second, flipped(result))
    back = read_sr(sr)
    assert back["source"] == second.SOPInstanceUID and sr.PatientName == "Chen^Mei" and sr.StudyDate == "19990101"
    assert {n: v["present"] for n, v in back["labels"].items()} == {
        n: v.present for n, v in flipped(result).labels.items()
    }
    # films of other sizes (archives hold CR plates and cropped films of many): the size is a slot of the same
    # template (the image library's Rows and Columns, each group's whole-image region), again highdicom's document
    templates.make = lambda *a: pytest.fail("a film of another size should have filled the same template")
    for rows, columns in [(512, 400), (2991, 2048), (7, 3)]:
        other = radiograph_dicom(np.zeros((rows, columns), np.uint16), patient_id="P-3")
        other.FrameOfReferenceUID = pydicom.uid.generate_uid()
        assert encoded(templates.sr(other, result, CARD, now=NOW)) == reference(other, result), (rows, columns)
    templates.make = made
    refused = Answer(analysed=False, reason=LATERAL.reason, gate=LATERAL)
    assert encoded(templates.sr(other, refused, CARD, now=NOW)) == reference(other, refused)
    assert len(templates.templates) == 2


def test_outlines_of_any_length_fill_the_template_of_their_labels():
    """--heatmap: the findings called YES carry a TID 1410 region (the Grad-CAM's outline). One template serves
    every set of outlined findings (a region group per finding, added to the Imaging Measurements as the answer
    has them) and outlines of any number of points, open or closed."""
    templates = Templates(highdicom_sr, srmod)
    names = list(answer_of_13().labels)
    rng = np.random.default_rng(0)
    for film_index, outlined in enumerate([names[:3], names[5:6], [], names[::2], names]):
        film = radiograph_dicom(np.zeros((320, 256), np.uint16), patient_id=f"P-{film_index}")
        labels = {n: v.model_copy(update={"present": n in outlined}) for n, v in answer_of_13().labels.items()}
        result = answer_of_13().model_copy(update={"labels": labels})
        regions = {}
        for i, name in enumerate(outlined):
            points = rng.uniform(0, 256, size=(int(rng.integers(3, 40)), 2)).astype(np.float32)
            regions[name] = points if (film_index + i) % 2 else np.concatenate([points, points[:1]])
        sr = templates.sr(film, result, CARD, regions, now=NOW)
        assert sr is not None and encoded(sr) == reference(film, result, regions=regions), film_index
        assert sorted(read_sr(sr).get("regions", {})) == sorted(outlined)
    assert len(templates.templates) == 1 and not templates.untemplated


def test_build_sr_takes_the_time_it_is_made():
    film = radiograph_dicom(np.zeros((64, 64), np.uint16))
    before = datetime.datetime.now().replace(microsecond=0)
    sr = build_sr(film, answer_of_13(), CARD)
    assert isinstance(sr, pydicom.FileDataset)  # read back from the template's bytes
    made = datetime.datetime.strptime(sr.ContentDate + sr.ContentTime.split(".")[0], "%Y%m%d%H%M%S")
    assert before <= made <= datetime.datetime.now()
    assert sr.ContributingEquipmentSequence[-1].ContributionDateTime.startswith(sr.ContentDate)


def test_a_shape_that_cannot_be_templated_is_built_by_highdicom(monkeypatch, caplog):
    templates = Templates(highdicom_sr, srmod)
    film = radiograph_dicom(np.zeros((64, 64), np.uint16))

    def refuse(*args):
        raise NotTemplated("for the test")

    monkeypatch.setattr(templates, "make", refuse)
    assert templates.sr(film, answer_of_13(), CARD) is None
    assert "built by highdicom each time: for the test" in caplog.text
    assert len(templates.untemplated) == 1
    monkeypatch.setattr(srmod, "_templates", lambda: templates)
    sr = build_sr(film, answer_of_13(), CARD)  # the shape refused: highdicom's, item by item
    assert not isinstance(sr, pydicom.FileDataset) and read_sr(sr)["analysed"]


def test_templates_are_bounded_and_a_marker_clash_is_refused():
    templates = Templates(highdicom_sr, srmod)
    result = Answer(analysed=True, gate=FRONTAL, labels=dict(list(answer_of_13().labels.items())[:1]))
    for n in range(MAX_TEMPLATES + 3):  # a model each: a shape each
        templates.sr(radiograph_dicom(np.zeros((32, 32), np.uint16)), result, dict(CARD, name=f"m{n}.tar"), now=NOW)
    assert len(templates.templates) == MAX_TEMPLATES
    # a document in which a marker turns up twice is not templated (its slots would be ambiguous)
    build = templates.build

    def twice(film, marked, card):
        ds = build(film, marked, card)
        ds.ReferencedPerformedProcedureStepSequence = [pydicom.Dataset()]
        ds.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID = ds.SOPInstanceUID
        return ds

    templates.build = twice
    assert templates.sr(radiograph_dicom(np.zeros((40, 40), np.uint16)), result, CARD) is None
