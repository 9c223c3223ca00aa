"""One radiograph written the ways archives hold it: what anonymised exports drop, the character sets of many
countries (names taken byte for byte from pydicom's own character-set test files), old and malformed dates,
transfer syntaxes, photometric interpretations, private tags. Each variant is a (name, dataset) pair; every one must
get an answer or a one-line reason from ``inference.py --sr_out`` and from the PACS worker, never a traceback."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataelem import DataElement

from cxrclip.synthetic import radiograph_dicom

# (file in pydicom's charset test data, what it is)
CHARSET_FILES = {
    "korean_iso2022_ir149": "chrI2.dcm",  # ['', 'ISO 2022 IR 149'], three-component name
    "korean_multi": "chrKoreanMulti.dcm",
    "japanese_iso2022_ir87": "chrH31.dcm",  # ['', 'ISO 2022 IR 87'], alphabetic=ideographic=phonetic
    "japanese_ir13_ir87": "chrH32.dcm",  # ['ISO 2022 IR 13', 'ISO 2022 IR 87'], half-width katakana
    "japanese_explicit_ir6": "chrJapMultiExplicitIR6.dcm",
    "chinese_utf8": "chrX1.dcm",  # ISO_IR 192
    "chinese_gb18030": "chrX2.dcm",
    "german_latin1": "chrGerm.dcm",  # ISO_IR 100
    "greek": "chrGreek.dcm",  # ISO_IR 126
    "russian": "chrRuss.dcm",  # ISO_IR 144
    "arabic": "chrArab.dcm",  # ISO_IR 127
    "hebrew": "chrHbrw.dcm",  # ISO_IR 138
}


def _film(size: int = 160) -> np.ndarray:
    """A frontal-looking film: bright mediastinum, darker lungs."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    lungs = np.exp(-(((x - 0.3) / 0.12) ** 2 + ((y - 0.5) / 0.25) ** 2)) + np.exp(
        -(((x - 0.7) / 0.12) ** 2 + ((y - 0.5) / 0.25) ** 2)
    )
    return (1.0 - 0.6 * lungs) * 4000


def _reread(ds) -> pydicom.Dataset:
    """Through bytes, as a PACS hands it over."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _charset(name: str, file: str) -> pydicom.Dataset:
    from pydicom.data import get_charset_files

    source = pydicom.dcmread(get_charset_files(file)[0])
    ds = radiograph_dicom(_film(), patient_id=f"CS-{name}"[:16])
    ds.SpecificCharacterSet = source.SpecificCharacterSet
    raw = source.PatientName.original_string if "PatientName" in source else None
    if raw is not None:
        ds[0x00100010] = DataElement(0x00100010, "PN", raw)  # the archive's bytes, escape sequences and all
        ds[0x00081030] = DataElement(0x00081030, "LO", raw.replace(b"^", b" ").replace(b"=", b" ")[:64])
    return ds


def _raw(ds, tag: int, vr: str, value: bytes) -> None:
    """An element as the file holds it, not converted (pydicom would refuse to make a malformed one)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _drop(ds, *keywords: str):
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _jpeg_baseline(ds) -> pydicom.Dataset:
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    pixels = (ds.pixel_array.astype(np.float32) * 255 / 4095).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([out.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.LossyImageCompression = "01"
    return ds


def variants() -> list[tuple[str, pydicom.Dataset]]:
    """Every variant, made anew (the caller may change them)."""
    from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless

    film = _film()
    out: list[tuple[str, pydicom.Dataset]] = []

    def add(name, ds):
        out.append((name, ds))

    add("complete", radiograph_dicom(film))
    add("type2_absent", _drop(radiograph_dicom(film), "PatientBirthDate", "PatientSex", "StudyTime"))
    add("no_study_date", _drop(radiograph_dicom(film), "StudyDate", "SeriesDate", "ContentDate"))
    add(
        "anonymised_export",
        _drop(
            radiograph_dicom(film),
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyID",
            "SeriesNumber",
            "InstanceNumber",
            "Manufacturer",
            "PatientOrientation",
        ),  # fmt: skip
    )
    add("old_study_date", radiograph_dicom(film, study_date="19980312"))
    ds = radiograph_dicom(film)
    ds[0x00080020] = DataElement(0x00080020, "DA", "2026-12-07")  # a malformed date (DA is YYYYMMDD)
    ds[0x00100030] = DataElement(0x00100030, "DA", "unknown")
    add("malformed_dates", ds)
    ds = radiograph_dicom(film)
    ds[0x00101010] = DataElement(0x00101010, "AS", "45 years")  # AS is nnnD/W/M/Y
    add("malformed_age", ds)
    for name, file in CHARSET_FILES.items():
        add(name, _charset(name, file))
    ds = radiograph_dicom(film)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds[0x00100010] = DataElement(0x00100010, "PN", "Müller^Jürgen".encode())  # declared Latin-1, holds UTF-8
    add("wrongly_declared_charset", ds)
    ds = radiograph_dicom(film)
    ds.SpecificCharacterSet = "ISO_IR 999"
    add("unknown_charset", ds)
    ds = radiograph_dicom(film)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    add("implicit_vr", ds)
    add("monochrome1_cr", radiograph_dicom(film, modality="CR", photometric="MONOCHROME1"))
    ds = radiograph_dicom(film)
    ds.PixelRepresentation = 1
    ds.PixelData = (ds.pixel_array.astype(np.int16) - 2048).tobytes()
    add("signed", ds)
    ds = radiograph_dicom(film)
    values = (ds.pixel_array.astype(np.float32) * 255 / 4095).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelData = 8, 8, 7, values.tobytes()
    add("8bit", ds)
    add("jpeg_baseline", _jpeg_baseline(radiograph_dicom(film)))
    ds = radiograph_dicom(film)
    ds.compress(JPEGLSLossless)
    add("jpeg_ls", ds)
    ds = radiograph_dicom(film)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    add("two_frames", ds)
    add("empty_view_position", radiograph_dicom(film, view=""))
    ds = radiograph_dicom(film)
    _raw(ds, 0x00281050, "DS", b"abc ")  # a window centre that is not a number
    _raw(ds, 0x00281051, "DS", b"400 ")
    add("malformed_window", ds)
    ds = radiograph_dicom(film)
    _raw(ds, 0x00281052, "DS", b"0 ")
    _raw(ds, 0x00281053, "DS", b"")  # an empty rescale slope
    add("empty_rescale_slope", ds)
    ds = radiograph_dicom(film)
    ds[0x00185101] = DataElement(0x00185101, "CS", "pa ")  # lower case, trailing space
    ds[0x00180015] = DataElement(0x00180015, "CS", "Chest")
    add("lower_case_view", ds)
    ds = radiograph_dicom(film)
    block = ds.private_block(0x0029, "ACME 1.1", create=True)
    block.add_new(0x10, "LO", "vendor data")
    block.add_new(0x11, "OB", b"\x00\x01" * 50)
    add("private_tags", ds)
    long_uid = "1.2.826.0.1.3680043.8.498." + "1" * (64 - 26)
    add("uid_64_characters", radiograph_dicom(film, sop_uid=long_uid[:-1] + "3", study_uid=long_uid[:-1] + "4"))
    return [(name, _reread(ds)) for name, ds in out]
