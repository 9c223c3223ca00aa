"""The Segmentation filled into a template is highdicom's byte for byte (issue 36 item 4): every archive variant,
any subset of the model's labels in any order, one segment, BINARY and FRACTIONAL, overlapping segments, sizes
whose bits do not fill whole bytes, maps outside [0, 1]; one template per shape serves every subset."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pydicom
import pytest

from cxrclip.pacs import seg as segmod
from cxrclip.pacs.seg import build_saliency_seg, highdicom_seg
from cxrclip.pacs.seg_template import SegTemplates
from cxrclip.pacs.sr import SourceError, evidence_of
from cxrclip.pacs.sr_template import NotTemplated, stamped
from cxrclip.paths import config_labels
from cxrclip.synthetic import radiograph_dicom
from tests.dicom_variants import variants
from tests.test_dicom_results import CARD, gaussian

NOW = datetime.datetime(2026, 12, 8, 1, 2, 3, 456789)
LABELS = config_labels("cgmh")
MODEL = dict(CARD, labels=LABELS)  # a predictor's card names its labels: one template serves every subset


def encoded(ds) -> bytes:
    fp = io.BytesIO()
    pydicom.dcmwrite(fp, ds)
    return fp.getvalue()


def reference(film, maps, card=MODEL, **kw) -> bytes:
    """highdicom's Segmentation, its times set to NOW (highdicom takes the moment it is built)."""
    return encoded(stamped(highdicom_seg(film, maps, card, **kw), NOW))


def spots(rows: int, cols: int, labels, seed: int = 0, spread: float = 0.15) -> dict:
    """A map per label: a Gaussian somewhere, scaled past [0, 1] at times (the builder clips), one all zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, label in enumerate(labels):
        m = gaussian(rows, cols, rng.uniform(0, rows), rng.uniform(0, cols), spread * min(rows, cols))
        out[label] = m * rng.choice([0.6, 1.0, 1.7]) - (0.1 if i % 3 == 1 else 0.0)
    if len(labels) > 2:
        out[labels[2]] = np.zeros((rows, cols), np.float32)
    return out


def test_every_archive_variant_is_highdicoms_segmentation_byte_for_byte():
    templates = SegTemplates(highdicom_seg, segmod)
    checked, classes = 0, set()
    for name, film in variants():
        try:
            evidence_of(film)
        except SourceError:
            continue  # a film without its UIDs gets no answer either way (tested in test_pacs)
        rows, cols = int(film.Rows), int(film.Columns)
        classes.add(film.SOPClassUID)
        for fractional in (False, True):
            maps = spots(rows, cols, [LABELS[4], LABELS[0], LABELS[9]], seed=checked)
            fast = templates.seg(film, maps, MODEL, fractional=fractional, now=NOW)
            assert fast is not None, name
            assert encoded(fast) == reference(film, maps, fractional=fractional), (name, fractional)
            checked += 1
    assert checked >= 2 * 20
    assert not templates.untemplated
    # the variants differ in identity, character set and pixel encoding, not in the grid the Segmentation lies on:
    # one template each for BINARY and FRACTIONAL per SOP class referenced served them all
    assert len(templates.templates) == 2 * len(classes) <= 4


def test_one_template_serves_every_subset_and_order_of_the_labels():
    templates = SegTemplates(highdicom_seg, segmod)
    subsets = [LABELS, LABELS[::-1], LABELS[3:5], [LABELS[7], LABELS[1], LABELS[12]], LABELS[::2]]
    for i, labels in enumerate(subsets):
        film = radiograph_dicom(np.zeros((96, 80), np.uint16), patient_id=f"P-{i}")
        maps = spots(96, 80, labels, seed=i)
        fast = templates.seg(film, maps, MODEL, now=NOW)
        assert encoded(fast) == reference(film, maps), labels
        assert [s.SegmentLabel for s in fast.SegmentSequence] == [f"{n} saliency" for n in labels]
        assert [s.SegmentNumber for s in fast.SegmentSequence] == list(range(1, len(labels) + 1))
        assert fast.NumberOfFrames == len(labels)
        for frame, label in zip(fast.pixel_array, labels):
            m = np.clip(maps[label], 0, 1)
            assert np.array_equal(frame.astype(bool), (m >= 0.5 * m.max()) & (m > 0)), label
    assert len(templates.templates) == 1 and not templates.untemplated
    # the segments overlap or not as the pixels say: two equal maps overlap wherever they are set
    film = radiograph_dicom(np.zeros((96, 80), np.uint16))
    same = gaussian(96, 80, 40, 40, 10)
    overlapping = templates.seg(film, {LABELS[0]: same, LABELS[1]: same}, MODEL, now=NOW)
    assert overlapping.SegmentsOverlap == "YES"
    assert encoded(overlapping) == reference(film, {LABELS[0]: same, LABELS[1]: same})
    apart = templates.seg(film, {LABELS[0]: same, LABELS[1]: gaussian(96, 80, 85, 70, 5)}, MODEL, now=NOW)
    assert apart.SegmentsOverlap == "NO"


@pytest.mark.parametrize("fractional", [False, True])
def test_one_segment_and_sizes_whose_bits_do_not_fill_whole_bytes(fractional):
    """One segment is written with its identification shared among the frames (its own template); 7 × 9 px packs
    63 bits per frame (frames run on mid-byte) and an odd number of bytes (highdicom's pad byte); films of two sizes
    fill one template."""
    templates = SegTemplates(highdicom_seg, segmod)
    for rows, cols, labels in [(7, 9, LABELS[:3]), (7, 9, LABELS[5:6]), (33, 17, LABELS[:1]), (33, 17, LABELS[1:6])]:
        film = radiograph_dicom(np.zeros((rows, cols), np.uint16))
        maps = spots(rows, cols, labels, seed=rows + len(labels), spread=0.4)
        fast = templates.seg(film, maps, MODEL, fractional=fractional, now=NOW)
        assert encoded(fast) == reference(film, maps, fractional=fractional), (rows, cols, labels)
        frames = np.asarray(fast.pixel_array).reshape(len(labels), rows, cols)
        if fractional:
            expected = np.stack([np.around(np.clip(maps[n], 0, 1) * 255) for n in labels])
            assert np.array_equal(frames, expected)
    # the size is a slot: both sizes' several segments share a template; each single segment (a label) has its own
    assert len(templates.templates) == 3 and not templates.untemplated


def test_build_saliency_seg_is_the_same_instance_for_the_same_answer_and_takes_its_time():
    film = radiograph_dicom(np.zeros((64, 48), np.uint16))
    maps = spots(64, 48, LABELS[:2])
    before = datetime.datetime.now().replace(microsecond=0)
    a, b = build_saliency_seg(film, maps, MODEL), build_saliency_seg(film, maps, MODEL)
    assert isinstance(a, pydicom.FileDataset)  # read back from the template's bytes
    made = datetime.datetime.strptime(a.ContentDate + a.ContentTime.split(".")[0], "%Y%m%d%H%M%S")
    assert before <= made <= datetime.datetime.now()
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    # the dimension organisation is the model's, not drawn at random: one answer, one document
    assert a.DimensionOrganizationSequence[0].DimensionOrganizationUID == b.DimensionIndexSequence[0][0x00209164].value
    assert encoded(stamped(a, NOW)) == encoded(stamped(b, NOW))
    other = dict(MODEL, checkpoint_sha256="cd" * 32)
    c = build_saliency_seg(film, maps, other)
    assert c.DimensionOrganizationSequence[0].DimensionOrganizationUID != (
        a.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )


def test_what_cannot_be_templated_is_built_by_highdicom(monkeypatch, caplog):
    templates = SegTemplates(highdicom_seg, segmod)
    film = radiograph_dicom(np.zeros((32, 32), np.uint16))
    maps = spots(32, 32, LABELS[:2])
    assert templates.seg(film, {"Not a label": maps[LABELS[0]]}, MODEL) is None  # highdicom says what it makes of it
    assert templates.seg(film, {LABELS[0]: np.zeros((8, 8), np.float32), LABELS[1]: maps[LABELS[1]]}, MODEL) is None

    def refuse(*args):
        raise NotTemplated("for the test")

    monkeypatch.setattr(templates, "make", refuse)
    assert templates.seg(film, maps, MODEL) is None
    assert "built by highdicom each time: for the test" in caplog.text and len(templates.untemplated) == 1
    monkeypatch.setattr(segmod, "_templates", lambda: templates)
    seg = build_saliency_seg(film, maps, MODEL)  # the shape refused: highdicom's
    assert encoded(stamped(seg, NOW)) == reference(film, maps)
