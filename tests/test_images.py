import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrclip.data.images import ImageReadError, check_image_header, read_image, to_uint8

RAMP16 = np.tile(np.linspace(1000, 4000, 16).astype(np.uint16), (4, 1))


def test_8bit_png_and_jpeg_roundtrip(tmp_path):
    img = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    Image.fromarray(img).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), img)
    Image.fromarray(np.stack([img] * 3, -1)).save(tmp_path / "a.jpg", quality=100)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).max() <= 3


def test_16bit_png_uses_its_full_range(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out, to_uint8(RAMP16))
    assert np.all(np.diff(out[0].astype(int)) > 0)  # 16 distinct levels survive, in order


def write_dicom(path, pixels, **attrs):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_monochrome2_plain(tmp_path):
    out = read_image(write_dicom(tmp_path / "a.dcm", RAMP16))
    np.testing.assert_array_equal(out, to_uint8(RAMP16))


def test_dicom_monochrome1_is_inverted(tmp_path):
    out = read_image(write_dicom(tmp_path / "a.dcm", RAMP16, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(out, 255 - to_uint8(RAMP16))
    assert out[0, 0] == 255  # the lowest stored value is white in MONOCHROME1


def test_dicom_voi_window_is_applied(tmp_path):
    # window 2000..3000: everything below is black, above is white, a linear ramp in between
    out = read_image(write_dicom(tmp_path / "a.dcm", RAMP16, WindowCenter=2500, WindowWidth=1000))
    row = out[0]
    values = RAMP16[0].astype(float)
    assert np.all(row[values <= 2000] == 0) and np.all(row[values >= 3000] == 255)
    mid = (values > 2050) & (values < 2950)
    assert np.all((row[mid] > 0) & (row[mid] < 255))


def test_dicom_modality_lut_rescale(tmp_path):
    # a negative slope flips the ordering: the modality LUT must run before scaling
    out = read_image(write_dicom(tmp_path / "a.dcm", RAMP16, RescaleSlope=-1, RescaleIntercept=0))
    assert out[0, 0] == 255 and out[0, -1] == 0


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(tmp_path / "bad.png")
    assert "unreadable" in check_image_header(tmp_path / "bad.png")
    (tmp_path / "bad.dcm").write_bytes(b"nope")
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "bad.dcm")
    assert check_image_header(tmp_path / "nope.png") == "image file not found"


def test_dicom_header_check_passes_good_file(tmp_path):
    assert check_image_header(write_dicom(tmp_path / "a.dcm", RAMP16)) is None
    assert pydicom.dcmread(str(tmp_path / "a.dcm")).Modality == "CR"
