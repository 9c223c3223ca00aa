"""The SR of an answer in a few milliseconds: highdicom builds the document once per shape, later answers fill it in.

Building a TID 1500 SR with highdicom costs several times the model's own prediction (each content item is a
pydicom dataset, validated as it is made; the document's constructor copies and searches the whole tree). Yet two
answers of one model to two films of one kind differ only in values: the film's UIDs and patient and study
attributes, the UIDs derived from them, the probabilities, the present/absent codes, the times. So:

1. the first answer of a *shape* — the model card, the labels with their rules and calibration flags, analysed or
   refused, the film's SOP class and the image attributes its image library entry describes but its size — is
   built by highdicom (:func:`cxrclip.pacs.sr.highdicom_sr`) from *sentinel* inputs: every value that varies is a
   unique marker (a UID no film has, a probability no answer gives, a size no film has);
2. the document is encoded once, element by element as pydicom's writer encodes it, and every element that holds
   a marker becomes a *slot* (found by its value, or by its place for the values a marker cannot be: the top
   level's patient and study attributes and times, each finding's present/absent code). A marker found a number
   of times other than expected, or an encoding that is not byte for byte pydicom's, and the shape is not
   templated: those answers keep being built by highdicom (logged once);
3. each answer fills the slots (each value encoded by pydicom's own element writer) and the parts are joined, the
   sequences' and items' lengths computed; the result is read back as a pydicom dataset (lazily: ~0.2 ms, and it
   writes back unchanged).

``tests/test_sr_template.py`` checks the result byte for byte against highdicom's document for the same inputs
(analysed and refused, archive films with missing Type 2 attributes, other character sets, another size).
"""

from __future__ import annotations

import copy
import datetime
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from cxrclip.predict.answer import Answer, LabelAnswer

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

ITEM = b"\xfe\xff\x00\xe0"
# Attributes written at the document's top level from the film (cxrclip.pacs.sr.COPIED), found there by tag
TOP_COPIED = {
    0x00100010: "PatientName", 0x00100020: "PatientID", 0x00100030: "PatientBirthDate", 0x00100040: "PatientSex",
    0x00080050: "AccessionNumber", 0x00200010: "StudyID", 0x00080020: "StudyDate", 0x00080030: "StudyTime",
    0x00080090: "ReferringPhysicianName",
}  # fmt: skip
# The times the document is made at, written as highdicom writes the moment: instance creation, content, and the
# contributing equipment's contribution date time
TIMES = {0x00080012: "DA", 0x00080013: "TM", 0x00080023: "DA", 0x00080033: "TM", 0x0018A002: "DT"}


def moment(tag: int, now: datetime.datetime):
    from pydicom.valuerep import DA, DT, TM

    kind = TIMES[tag]
    return DA(now.date()) if kind == "DA" else TM(now.time()) if kind == "TM" else DT(now)


QUALITATIVE, MEASUREMENTS = ("UMLS", "C0034375"), ("DCM", "126010")
CONCEPT_CODE, CONTENT = 0x0040A168, 0x0040A730
# Image attributes an SR does not hold (the image library describes the film's size, orientation and spacing); the
# frame of reference is a slot. Leaving them out of the shape lets films of one detector share a template.
NOT_IN_SR = (
    "SeriesNumber", "InstanceNumber", "FrameOfReferenceUID", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
)  # fmt: skip
# The film's size: numbers in the image library entry, slots (marked by sizes no film has), so that films of every
# size share a template — archives hold CR plates and cropped films of many sizes
SIZE = {"Rows": 4093, "Columns": 4091}
MAX_TEMPLATES = 32


class NotTemplated(Exception):
    """This shape cannot be templated; its answers are built by highdicom."""


def _uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.1175.{n}"  # markers: valid UIDs that name nothing


def _number(k: int, j: int) -> float:
    return 0.3 + (3 * k + j) * 1e-4 + 1.23e-7  # label k, measurement j (probability, threshold, uncalibrated)


GATE_SCORE = 0.2345678901
REASON = "cxrclip-template-reason-marker"


SHORT_TEXT = ("UI", "DS", "IS", "PN", "LO", "SH", "CS", "DA", "TM", "DT", "AS", "ST", "LT")  # 2-byte lengths


def _encoded(tag: int, vr: str, value, encodings) -> bytes:
    """One element as pydicom writes it (explicit VR little endian). UIDs, decimal strings, doubles and ASCII text —
    most of an answer's values — are packed here directly (PS3.5 7.1.2: a 2-byte length, padded to even with NUL for
    UI and a space for the others; ASCII is the same bytes in every character set a DICOM file declares); the rest
    by pydicom's element writer."""
    if vr == "FD" and isinstance(value, float):
        return struct.pack("<HH2sHd", tag >> 16, tag & 0xFFFF, b"FD", 8, value)
    if vr == "PN" and type(value).__name__ == "PersonName" and "=" not in str(value):
        value = str(value)  # one component group: its text as written
    if vr in SHORT_TEXT and isinstance(value, str) and value.isascii():
        text = value.encode("ascii")
        if len(text) % 2:
            text += b"\x00" if vr == "UI" else b" "
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(text)) + text
    from pydicom.dataelem import DataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, DataElement(tag, vr, value), encodings)
    return fp.getvalue()


class _Seq:
    """A sequence whose items hold slots: its header is written once the items' lengths are known. ``extra``: items
    an answer adds at its end (the Imaging Measurements' region groups, one per outlined finding)."""

    __slots__ = ("head", "items", "extra")

    def __init__(self, tag: int, items: list[list]):
        self.head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\x00\x00"
        self.items, self.extra = items, []


def _join(parts: list, fill: Callable[[int], bytes]) -> bytes:
    out = []
    for part in parts:
        if type(part) is bytes:
            out.append(part)
        elif type(part) is int:
            out.append(fill(part))
        else:
            items = [_join(item, fill) for item in (*part.items, *part.extra)]
            value = b"".join(ITEM + struct.pack("<I", len(i)) + i for i in items)
            out.append(part.head + struct.pack("<I", len(value)) + value)
    return b"".join(out)


def _merge(parts: list, keep: list) -> list:
    """Adjacent constant bytes joined; a sequence without slots becomes bytes (but those in ``keep``: an answer
    changes their items)."""
    out: list = []
    for part in parts:
        if (
            isinstance(part, _Seq)
            and not any(part is k for k in keep)
            and all(len(item) == 1 and type(item[0]) is bytes for item in part.items)
        ):
            part = _join([part], None)
        if type(part) is bytes and out and type(out[-1]) is bytes:
            out[-1] += part
        else:
            out.append(part)
    return out


class Template:
    """One shape's document: its parts, and per slot how an answer fills it."""

    def __init__(self, sentinel: Dataset, marks: dict, code: Callable[[int], Callable] | None = None):
        self.fills: list[Callable] = []  # slot index → f(context) → the encoded element
        self.marks, self.code = marks, code
        self.found: dict = {}
        self.measurements: _Seq | None = None  # the Imaging Measurements container's content
        self.kept: list[_Seq] = []  # the sequences whose items an answer chooses
        self.shared: dict[tuple, int] = {}  # (tag, VR, marker, character set) → its one slot
        from pydicom.dataset import Dataset

        self.meta = Dataset(sentinel.file_meta)
        full = _encode(sentinel)
        self.preamble = full[:132] if full[128:132] == b"DICM" else b""
        self.parts = self._compile(sentinel, "iso8859", 0, None)
        self.regions: dict[str, list] = {}

    def _compile(self, ds: Dataset, parent_encoding, depth: int, labels: list | None) -> list:
        """``labels``: a counter when ``ds`` is an item of the qualitative evaluations (its CODEs, one per label)."""
        encodings = ds.get("SpecificCharacterSet", parent_encoding)
        parts: list = []
        for tag in sorted(ds.keys()):
            if tag >> 16 == 0x0002:
                continue  # the file meta, written apart
            elem = ds[tag]
            special = self._special(tag, elem, depth, encodings)
            if special is not None:
                parts.append(special)
            elif elem.VR != "SQ":
                slot = self._slot_of(tag, elem, depth, encodings)
                parts.append(slot if slot is not None else _encoded(tag, elem.VR, elem.value, encodings))
            elif tag == CONCEPT_CODE and labels is not None:
                parts.append(self._slot(self.code(labels[0], encodings)))
                labels[0] += 1
            else:
                if elem.is_undefined_length or any(
                    getattr(i, "is_undefined_length_sequence_item", False) for i in elem.value
                ):
                    raise NotTemplated("a sequence of undefined length")
                counter = [0] if tag == CONTENT and _concept(ds) == QUALITATIVE else None
                seq = _Seq(tag, [self._compile(item, encodings, depth + 1, counter) for item in elem.value])
                if tag == CONTENT and _concept(ds) == MEASUREMENTS:
                    self.measurements = seq
                    self.kept.append(seq)
                parts.append(seq)
        return _merge(parts, self.kept)

    def _special(self, tag: int, elem, depth: int, encodings) -> bytes | int | _Seq | None:
        """A document kind's own parts (an element the generic rules would get wrong): None here."""
        return None

    def _slot(self, fill: Callable) -> int:
        self.fills.append(fill)
        return len(self.fills) - 1

    def _slot_of(self, tag: int, elem, depth: int, encodings) -> int | None:
        """The slot of an element whose value an answer gives, or None (a constant). One marker in one element
        written the same way is one slot however often it occurs (the whole film's region in every label's group):
        an answer encodes it once."""
        vr, value = elem.VR, elem.value
        if depth == 0 and tag in TOP_COPIED:
            keyword = TOP_COPIED[tag]
            return self._slot(lambda c: _encoded(tag, vr, getattr(c.evidence, keyword), encodings))
        if tag in TIMES:
            return self._slot(lambda c: _encoded(tag, vr, moment(tag, c.now), encodings))
        kind = {"UI": "uid", "DS": "ds", "FD": "fd", "UT": "text", "FL": "fl"}.get(vr)
        if kind is None:
            return None
        if vr == "FL":
            value = tuple(value) if hasattr(value, "__iter__") else (value,)
        mark = (kind, value if vr in ("FD", "FL") else str(value))
        get = self.marks.get(mark)
        if get is None:
            return None
        self.found[mark] = self.found.get(mark, 0) + 1
        key = (tag, vr, mark, str(encodings))
        if key not in self.shared:
            self.shared[key] = self._slot(lambda c: _encoded(tag, vr, get(c), encodings))
        return self.shared[key]

    def split_regions(self, names: list[str], outlined: list[str]) -> None:
        """The document was made with every finding outlined: its Imaging Measurements hold the image-level group of
        each label, then the region group of each in ``outlined``'s order. Keep the first as the document and the
        second as items an answer adds, per label."""
        seq = self.measurements
        if seq is None or len(seq.items) != len(names) + len(outlined):
            raise NotTemplated("the Imaging Measurements are not one group per label and one region per outline")
        self.regions = dict(zip(outlined, seq.items[len(names) :]))
        seq.items = seq.items[: len(names)]

    def fill(self, context: Context) -> bytes:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info

        done: dict[int, bytes] = {}

        def slot_bytes(slot: int) -> bytes:  # only the slots of the items this answer has (an outline's, if any)
            if slot not in done:
                done[slot] = self.fills[slot](context)
            return done[slot]

        if self.measurements is not None:
            self.measurements.extra = [self.regions[name] for name in context.regions]
        self.meta.MediaStorageSOPInstanceUID = context.sop_uid
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, self.meta, enforce_standard=False)
        return self.preamble + fp.getvalue() + _join(self.parts, slot_bytes)


def _concept(ds) -> tuple[str, str] | None:
    name = ds.get("ConceptNameCodeSequence")
    return (str(name[0].CodingSchemeDesignator), str(name[0].CodeValue)) if name else None


def _encode(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import dcmwrite

    fp = DicomBytesIO()
    dcmwrite(fp, ds)
    return fp.getvalue()


class Context:
    """What one answer fills in: the film's header (``image_header``: its identity as ``evidence_of`` decodes it, its
    size and frame of reference), the answer, the moment, the SR's UID and the outlines."""

    __slots__ = ("evidence", "result", "now", "sop_uid", "regions")

    def __init__(self, evidence, result, now, sop_uid, regions=None):
        self.evidence, self.result, self.now, self.sop_uid = evidence, result, now, sop_uid
        self.regions = regions or {}


def sentinel_film(film, marks: dict):
    """A copy of ``film`` (an ``image_header``) with markers for its UIDs, their fills added to ``marks``."""
    film = copy.deepcopy(film)  # the caller's header stays as it is
    for n, keyword in enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
        setattr(film, keyword, _uid(n))
        marks["uid", _uid(n)] = lambda c, k=keyword: getattr(c.evidence, k)
    if "FrameOfReferenceUID" in film:
        film.FrameOfReferenceUID = _uid(3)
        marks["uid", _uid(3)] = lambda c: str(c.evidence.FrameOfReferenceUID)
    return film


def stamped(ds, now: datetime.datetime):
    """``ds`` with the times it was made at (:data:`TIMES`) set to ``now``, where it has them."""
    for item in [ds, *ds.get("ContributingEquipmentSequence", [])]:
        for tag in TIMES:
            if tag in item:
                item[tag].value = moment(tag, now)
    return ds


class TemplateCache:
    """The templates of the shapes seen (the newest :data:`MAX_TEMPLATES`), made on first use; thread-safe.
    ``build``: highdicom's builder of the document; ``h``: the module that defines it."""

    def __init__(self, build: Callable, h):
        self.build, self.h = build, h
        self.templates: OrderedDict = OrderedDict()
        self.lock = threading.Lock()
        self.untemplated: set = set()

    def template(self, key, make: Callable[[], Template]) -> Template | None:
        """The template of the shape ``key``, made by ``make`` the first time; None where it cannot be."""
        with self.lock:
            template = self.templates.get(key)
            if template is not None:
                self.templates.move_to_end(key)
                return template
            if key in self.untemplated:
                return None
        try:
            template = make()
        except NotTemplated as e:
            log.warning("this kind of answer is built by highdicom each time: %s", e)
            with self.lock:
                self.untemplated.add(key)
            return None
        except Exception as e:  # highdicom refused the film or the answer: its own build says why, in its words
            log.debug("no template for this answer (%s: %s)", type(e).__name__, e)
            return None
        with self.lock:
            self.templates[key] = template
            while len(self.templates) > MAX_TEMPLATES:
                self.templates.popitem(last=False)
        return template

    def filled(self, template: Template, context):
        """``template`` filled for one answer, read back as a pydicom dataset (lazily)."""
        import pydicom
        from pydicom.filebase import DicomBytesIO

        with self.lock:  # a template's per-answer sequences and its meta dataset are reused
            data = template.fill(context)
        return pydicom.dcmread(DicomBytesIO(data))


class Templates(TemplateCache):
    """The SR's templates. ``h``: :mod:`cxrclip.pacs.sr` (``evidence_of``, ``image_header``, ...)."""

    def shape(self, header, result: Answer, card: Mapping) -> tuple:
        """What the document's structure depends on: the model, the answer's labels and rules (or its refusal), the
        film's SOP class and what the image library describes but the size (a slot). ``header``: the film's
        ``image_header``."""
        image = tuple((k, "slot" if k in SIZE else str(header[k].value)) for k in self.h.IMAGE_ATTRIBUTES
                      if k in header and k not in NOT_IN_SR)  # fmt: skip
        if result.analysed:
            what = ("analysed", tuple((n, v.rule, v.calibrated) for n, v in (result.labels or {}).items()))
        else:
            what = ("refused", result.gate.score is None)
        model = (str(card.get("name")), str(card["checkpoint_sha256"]), tuple(self.h.model_parameters(card)))
        return model, what, str(header.SOPClassUID), image, "FrameOfReferenceUID" in header

    def sr(self, source, result: Answer, card: Mapping, regions: Mapping | None = None,
           now: datetime.datetime | None = None):  # fmt: skip
        """The SR of ``result`` (with the outlines ``regions``) as highdicom writes it, from the shape's template;
        None where the shape cannot be templated (the caller builds it with highdicom)."""
        header = self.h.image_header(source)  # a film without its UIDs is refused before anything is built
        regions = dict(regions or {}) if result.analysed else {}
        if set(regions) - set(result.labels or {}):
            return None  # an outline of a finding the answer does not have: highdicom says what it makes of it
        template = self.template(self.shape(header, result, card), lambda: self.make(source, result, card))
        if template is None:
            return None
        sop = self.h.sr_uids(header.SOPInstanceUID, str(card["checkpoint_sha256"]))[1]
        return self.filled(template, Context(header, result, now or datetime.datetime.now(), sop, regions))

    def make(self, source, result: Answer, card: Mapping) -> Template:
        """The shape's document built by highdicom from markers, compiled, and checked: filled with the markers'
        own values it must be pydicom's encoding of that document, byte for byte."""
        from pydicom.valuerep import DS

        h, sha = self.h, str(card["checkpoint_sha256"])
        marks: dict = {}  # (kind, the marker as encoded) → f(context): the value the answer puts there
        film = sentinel_film(h.image_header(source), marks)
        expected: dict = {}
        series, instance = h.sr_uids(film.SOPInstanceUID, sha)
        marks["uid", series] = lambda c: h.sr_uids(c.evidence.SOPInstanceUID, sha)[0]
        marks["uid", instance] = lambda c: c.sop_uid
        expected.update({("uid", series): 1, ("uid", instance): 1})

        def number(x: float, get: Callable) -> None:
            marks["ds", str(DS(x, auto_format=True))] = lambda c: str(DS(get(c), auto_format=True))
            marks["fd", x] = lambda c: float(get(c))
            expected.update({("ds", str(DS(x, auto_format=True))): 1, ("fd", x): 1})

        sizes = []  # found once where the image library has an entry for the film, else never
        for keyword, size in SIZE.items():
            if keyword in film:
                setattr(film, keyword, size)
                sizes.append(("ds", str(DS(float(size), auto_format=True))))
                marks[sizes[-1]] = lambda c, k=keyword: str(DS(float(c.evidence[k].value), auto_format=True))
        whole = h.whole_image(film)  # the film's edges: the region each image-level group was inferred from
        if whole is not None:
            marks["fl", tuple(whole.flatten().tolist())] = lambda c: h.whole_image(c.evidence).flatten().tolist()

        def tracking(what: str, times: int = 1) -> None:
            uid = h.tracking_uid(film, sha, what)
            marks["uid", uid] = lambda c: h.tracking_uid(c.evidence, sha, what)
            expected["uid", uid] = times

        names = list(result.labels or {}) if result.analysed else []
        outlines = {}  # every finding outlined, each by a marker: a closed polyline no outline has
        for k, name in enumerate(names):
            outlines[name] = np.array([[0.5 + k, 0.25], [1.75, 2.5 + k], [3.25 + k, 0.75], [0.5 + k, 0.25]], np.float32)
            marks["fl", tuple(outlines[name].flatten().tolist())] = lambda c, n=name: (
                h.region_points(c.regions[n]).flatten().tolist()
            )
            expected["fl", tuple(outlines[name].flatten().tolist())] = 1

        if result.analysed:
            labels = {}
            for k, name in enumerate(names):
                v = result.labels[name]
                x = [_number(k, j) for j in range(3)]
                labels[name] = LabelAnswer(probability=x[0], threshold=x[1], rule=v.rule, present=True,
                                           calibrated=v.calibrated, uncalibrated_probability=x[2])  # fmt: skip
                for j, field in enumerate(("probability", "threshold", "uncalibrated_probability")):
                    number(x[j], lambda c, n=name, f=field: getattr(c.result.labels[n], f))
                tracking(name, 2)  # the finding's image-level group and its region group share it
            marked = Answer(analysed=True, gate=result.gate, labels=labels)
        else:
            score = None if result.gate.score is None else GATE_SCORE
            marked = Answer(analysed=False, reason=REASON, gate=result.gate.model_copy(update={"score": score}))
            marks["text", REASON] = lambda c: str(c.result.reason)[:1024]
            expected["text", REASON] = 1
            if score is not None:
                number(GATE_SCORE, lambda c: c.result.gate.score)
            tracking("input gate")
        sentinel = self.build(film, marked, card, outlines)

        def code(k: int, encodings) -> Callable:
            if k >= len(names):
                raise NotTemplated("a coded qualitative evaluation that is no label's")
            codes = {flag: _encoded(CONCEPT_CODE, "SQ", [h.presence_code(flag)], encodings) for flag in (True, False)}
            return lambda c: codes[bool(c.result.labels[names[k]].present)]

        template = Template(sentinel, marks, code)
        if outlines:
            template.split_regions(names, list(outlines))
        expected.update({m: 1 for m in sizes if m in template.found})
        wrong = {m: template.found.get(m, 0) for m, n in expected.items() if template.found.get(m, 0) != n}
        if wrong:
            raise NotTemplated(f"markers found other than as often as expected: {wrong}")
        now = datetime.datetime.now()
        stamped(sentinel, now)
        check = Context(film, marked, now, sentinel.SOPInstanceUID, outlines)
        if template.fill(check) != _encode(sentinel):
            raise NotTemplated("the template does not encode as pydicom encodes the document")
        return template
