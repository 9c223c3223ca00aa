"""The Segmentation of where the model looked, in a few milliseconds: highdicom builds it once per shape with a
segment for every label of the model, later answers choose theirs.

As for the SR (:mod:`cxrclip.pacs.sr_template`, whose machinery this is): the first answer of a *shape* — the model,
BINARY or FRACTIONAL, the film's SOP class, spacing and orientation — is built by highdicom
(:func:`cxrclip.pacs.seg.highdicom_seg`) from a sentinel film whose UIDs are markers, with one empty segment per
label of the model, and compiled into parts and slots. What differs between two answers of one shape:

- the film's UIDs and patient and study attributes, the UIDs derived from them (the Segmentation's own, each
  segment's tracking UID), the times, the film's size (Rows, Columns): slots, as in the SR;
- which labels have a segment and in what order: the Segment Sequence and the Per-Frame Functional Groups hold one
  item per label, an answer takes those of its labels in its order; the values that follow from an item's place
  (the segment number, its display colour, the frame's dimension index and segment) are the sentinel's at that
  place;
- the pixels, the number of frames and whether segments overlap: computed as highdicom computes them (the frames'
  bits packed end to end, the fractions rounded to 1/255, a NUL-free pad byte where the length is odd).

``tests/test_seg_template.py`` checks the result byte for byte against highdicom's Segmentation for the same inputs.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Mapping

import numpy as np

from cxrclip.pacs.sr_template import (
    NotTemplated,
    Template,
    TemplateCache,
    _encode,
    _encoded,
    _Seq,
    sentinel_film,
    stamped,
)

SEGMENTS, PER_FRAME = 0x00620002, 0x52009230  # the sequences with one item per label
# what follows from an item's place: the segment number, its display colour; the frame's dimension index, its segment
POSITIONAL = (0x00620004, 0x0062000D, 0x00209157, 0x0062000B)
NUMBER_OF_FRAMES, OVERLAP, PIXEL_DATA = 0x00280008, 0x00620013, 0x7FE00010
GRID = {0x00280010: "Rows", 0x00280011: "Columns"}  # the film's size: slots (films of any size share a template)
# the image attributes the Segmentation depends on (its spacing and orientation; the frame of reference and the size
# are slots): films of one detector share a template whatever their size and their pixels' encoding
IN_SEG = ("PixelSpacing", "ImagerPixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness")


class SegTemplate(Template):
    """One shape's Segmentation: its parts, the items of each label, and per slot how an answer fills it."""

    def __init__(self, sentinel, marks: dict, labels: list[str]):
        self.labels = labels
        self.per_label: list[tuple[_Seq, list]] = []  # (sequence, the items of each label in ``labels``' order)
        self.at: dict[tuple[int, int], bytes] = {}  # (tag, place) → the element the item at that place holds
        self.owner: int | None = None  # the label whose item is being compiled
        self.pixel_vr = b"OB" if int(sentinel.BitsAllocated) <= 8 else b"OW"
        super().__init__(sentinel, marks)

    def _special(self, tag: int, elem, depth: int, encodings):
        if depth == 0 and tag in (SEGMENTS, PER_FRAME):
            if len(elem.value) != len(self.labels):
                raise NotTemplated(f"{elem.keyword} does not hold one item per label")
            items = []
            for k, item in enumerate(elem.value):
                self.owner = k
                items.append(self._compile(item, encodings, 1, None))
            self.owner = None
            seq = _Seq(tag, [])
            self.per_label.append((seq, items))
            self.kept.append(seq)
            return seq
        if tag in POSITIONAL and self.owner is not None:  # outside a label's item: one segment's, constant
            self.at[tag, self.owner + 1] = _encoded(tag, elem.VR, elem.value, encodings)
            return self._slot(lambda c, k=self.owner: self.at[tag, c.place[k]])
        if depth == 0 and tag in (NUMBER_OF_FRAMES, OVERLAP, PIXEL_DATA):
            return self._slot(lambda c: c.top[tag])
        if depth == 0 and tag in GRID:
            keyword = GRID[tag]
            return self._slot(
                lambda c: struct.pack("<HH2sHH", 0x0028, tag & 0xFFFF, b"US", 2, int(c.evidence[keyword].value))
            )
        return None

    def fill(self, context) -> bytes:
        for seq, items in self.per_label:
            seq.items = [items[k] for k in context.order]
        return super().fill(context)


class SegContext:
    """What one answer fills in: the film's header (its identity, size and frame of reference), the moment, the
    Segmentation's UID and labels, each template label's place (``order``: the template's label indices in the
    answer's order), and the top-level elements computed from the pixels."""

    __slots__ = ("evidence", "now", "sop_uid", "labels", "order", "place", "top")

    def __init__(self, evidence, now, sop_uid, labels, order, top):
        self.evidence, self.now, self.sop_uid = evidence, now, sop_uid
        self.labels, self.order, self.top = labels, order, top
        self.place = {k: p for p, k in enumerate(order, start=1)}


class SegTemplates(TemplateCache):
    """The Segmentation templates of the shapes seen. ``build``: highdicom's builder; ``h``: the module that defines
    the Segmentation (:mod:`cxrclip.pacs.seg`: ``frames``, ``seg_uids``, ``image_header``, ...)."""

    def seg(self, source, maps: Mapping[str, np.ndarray], card: Mapping, *, level: float = 0.5,
            fractional: bool = False, now: datetime.datetime | None = None):  # fmt: skip
        """The Segmentation of ``maps`` as highdicom writes it, from the shape's template; None where the shape
        cannot be templated (the caller builds it with highdicom)."""
        h, sha = self.h, str(card["checkpoint_sha256"])
        header = h.image_header(source)
        labels = list(maps)
        known = [str(n) for n in card.get("labels") or labels]
        grid = (int(header.Rows), int(header.Columns)) if "Rows" in header and "Columns" in header else None
        if not labels or len(set(labels)) != len(labels) or set(labels) - set(known):
            return None  # highdicom says what it makes of it
        if any(np.shape(m) != grid for m in maps.values()):
            return None
        # one segment is written otherwise (highdicom shares its identification among the frames): its own template
        universe = labels if len(labels) == 1 else known
        image = tuple((k, str(header[k].value)) for k in IN_SEG if k in header)
        key = (str(card.get("name")), sha, fractional, str(header.SOPClassUID), image,
               "FrameOfReferenceUID" in header, tuple(universe))  # fmt: skip
        template = self.template(key, lambda: self.make(source, universe, card, fractional))
        if template is None:
            return None
        frames = h.frames(maps, labels, level=level, fractional=fractional)
        top = pixels(frames, fractional, template.pixel_vr)
        order = [template.labels.index(label) for label in labels]
        sop = h.seg_uids(header.SOPInstanceUID, sha, labels, fractional)[1]
        return self.filled(template, SegContext(header, now or datetime.datetime.now(), sop, labels, order, top))

    def make(self, source, labels: list[str], card: Mapping, fractional: bool) -> SegTemplate:
        """The shape's Segmentation built by highdicom from markers with a segment per label, compiled, and checked:
        filled with the sentinel's own values it must be pydicom's encoding of that Segmentation, byte for byte."""
        h, sha = self.h, str(card["checkpoint_sha256"])
        marks: dict = {}
        film = sentinel_film(h.image_header(source), marks)
        series, instance = h.seg_uids(film.SOPInstanceUID, sha, labels, fractional)
        marks["uid", series] = lambda c: h.seg_uids(c.evidence.SOPInstanceUID, sha, c.labels, fractional)[0]
        marks["uid", instance] = lambda c: c.sop_uid
        expected = {("uid", series): 1, ("uid", instance): 1}
        for label in labels:
            uid = h.segment_tracking_uid(film.SOPInstanceUID, sha, label)
            marks["uid", uid] = lambda c, n=label: h.segment_tracking_uid(c.evidence.SOPInstanceUID, sha, n)
            expected["uid", uid] = 1
        empty = np.zeros((int(film.Rows), int(film.Columns)), np.float32)
        sentinel = self.build(film, dict.fromkeys(labels, empty), card, fractional=fractional)
        template = SegTemplate(sentinel, marks, labels)
        wrong = {m: template.found.get(m, 0) for m, n in expected.items() if template.found.get(m, 0) != n}
        if wrong:
            raise NotTemplated(f"markers found other than as often as expected: {wrong}")
        now = datetime.datetime.now()
        stamped(sentinel, now)
        frames = h.frames(dict.fromkeys(labels, empty), labels, fractional=fractional)
        check = SegContext(film, now, sentinel.SOPInstanceUID, labels, list(range(len(labels))),
                           pixels(frames, fractional, template.pixel_vr))  # fmt: skip
        if template.fill(check) != _encode(sentinel):
            raise NotTemplated("the template does not encode as pydicom encodes the Segmentation")
        return template


def pixels(frames: np.ndarray, fractional: bool, vr: bytes) -> dict[int, bytes]:
    """The top-level elements that follow from the frames (n × rows × columns, 0/1 or 0–255), as highdicom writes
    them: the number of frames, whether segments overlap, and the pixel data (BINARY: the bits of all frames packed
    end to end, least significant first; padded with ``b"0"`` to an even length, as highdicom pads)."""
    n = len(frames)
    if fractional:
        data, overlap = frames.tobytes(), "NO" if n == 1 else "UNDEFINED"
        # highdicom: one FRACTIONAL segment cannot overlap; several are UNDEFINED
    elif frames[0].size % 8 == 0:  # each frame whole bytes: the overlap found on the packed bits (8× less to read)
        packed = np.packbits(frames.reshape(n, -1), axis=1, bitorder="little")
        data, overlap, seen = packed.tobytes(), "NO", packed[0].copy()
        for frame in packed[1:]:
            if np.bitwise_and(seen, frame).any():
                overlap = "YES"
                break
            seen |= frame
    else:
        data = np.packbits(frames, axis=None, bitorder="little").tobytes()
        overlap = "YES" if n > 1 and bool((frames.sum(axis=0, dtype=np.uint8) > 1).any()) else "NO"
    if len(data) % 2:
        data += b"0"
    return {
        NUMBER_OF_FRAMES: _encoded(NUMBER_OF_FRAMES, "IS", str(n), None),
        OVERLAP: _encoded(OVERLAP, "CS", overlap, None),
        PIXEL_DATA: struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, len(data)) + data,
    }
