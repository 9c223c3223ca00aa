"""Reading radiographs: JPEG, PNG (8/16-bit) and DICOM into one grayscale uint8 array."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cxrclip.exceptions import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")  # what a folder of images holds
# the attributes the input gate (cxrclip/predict/gate.py) reads, as facts of a DICOM input
GATE_ATTRIBUTES = {
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "image_laterality": "ImageLaterality",
    "presentation_intent": "PresentationIntentType",
}


class ImageReadError(UserError, OSError):
    """An image file that is missing or cannot be decoded."""


def is_dicom(path: str | Path) -> bool:
    return str(path).lower().endswith(DICOM_SUFFIXES)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric image to uint8 (a constant image becomes zeros)."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_dicom(path, facts: dict | None = None) -> np.ndarray:
    """A DICOM file (or file object) → grayscale uint8 (see :func:`dicom_image`); ``facts`` collects what was found."""
    import pydicom

    name = getattr(path, "name", path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageReadError(f"cannot decode DICOM {name}: {e}") from e
    return dicom_image(ds, facts, name)


def dicom_image(ds, facts: dict | None = None, name="DICOM") -> np.ndarray:
    """A DICOM dataset (read from a file or retrieved from a PACS) with the modality LUT (rescale slope/intercept)
    and the VOI LUT (window) applied, MONOCHROME1 inverted so that bone is bright; ``facts`` collects the attributes
    the input gate reads."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        if "PixelData" not in ds:
            raise ImageReadError(f"DICOM {name} has no pixel data")
        pixels = ds.pixel_array
    except ImageReadError:
        raise
    except Exception as e:  # a compressed image without its codec, truncated pixel data, ...
        raise ImageReadError(f"cannot decode DICOM {name}: {e}") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    if facts is not None:
        facts.update(
            format="DICOM",
            photometric_interpretation=photometric or None,
            bits_stored=int(getattr(ds, "BitsStored", 0) or 0) or None,
            modality=str(getattr(ds, "Modality", "")) or None,
            **{key: str(getattr(ds, attr, "") or "").strip() or None for key, attr in GATE_ATTRIBUTES.items()},
        )
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
        _warn(facts, "multi-frame DICOM: the first frame is used")
    if pixels.ndim == 3:
        _warn(facts, f"{photometric} colour DICOM averaged to grayscale")
        return to_uint8(pixels.mean(axis=-1))
    image = _lut(apply_modality_lut, pixels, ds, facts, "Rescale Slope / Intercept")
    image = _lut(lambda a, d: apply_voi_lut(a, d, index=0), image, ds, facts, "Window Center / Width (VOI LUT)")
    image = to_uint8(image)
    if photometric == "MONOCHROME1":
        image = 255 - image
        _warn(facts, "MONOCHROME1: inverted so that bone is bright")
    return image


def _lut(apply, pixels: np.ndarray, ds, facts: dict | None, what: str) -> np.ndarray:
    """One LUT step; a malformed one (a value that is not a number, an empty slope) is left out with a warning, as
    viewers do — the image is scaled to its own range afterwards either way."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's "invalid value for VR DS"; the warning below says it once
            return apply(pixels, ds)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        _warn(facts, f"malformed {what} not applied ({type(e).__name__})")
        return pixels


def _warn(facts: dict | None, text: str) -> None:
    if facts is not None:
        facts.setdefault("warnings", []).append(text)


def read_image(path: str | Path, facts: dict | None = None) -> np.ndarray:
    """Any supported file → a 2-D grayscale uint8 array; ``facts`` (a dict) collects what was found (format,
    DICOM attributes, warnings)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    if is_dicom(path):
        return read_dicom(path, facts)
    if facts is not None:
        facts.setdefault("format", None)
    return _read_pil(path, str(path), facts)


def _read_pil(source, name: str, facts: dict | None = None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                if facts is not None:
                    facts.update(format=im.format, mode=im.mode)
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    _warn(facts, f"{im.mode} image scaled to 8 bits by its own min and max")
                    return to_uint8(np.asarray(im))
                if im.mode != "L":
                    _warn(facts, f"{im.mode} image converted to grayscale")
                    im = im.convert("L")
                return np.asarray(im).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"cannot decode image {name}: {e}") from e


class UnsupportedImageError(ImageReadError):
    """A file that is not one of the supported image types."""


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or DICOM from the file's own bytes (never its name), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    return None


def decode_image_bytes(data: bytes, name: str = "upload") -> tuple[np.ndarray, dict]:
    """An uploaded file's bytes (PNG 8/16-bit, JPEG, DICOM) → grayscale uint8 and the facts of the input
    (format, size, photometric interpretation, warnings). Nothing is written to disk."""
    kind = sniff_format(data)
    if kind is None:
        raise UnsupportedImageError(f"{name}: not a PNG, JPEG or DICOM file (checked from its bytes)")
    facts: dict = {"format": kind, "bytes": len(data), "warnings": []}
    source = io.BytesIO(data)
    source.name = name
    image = read_dicom(source, facts) if kind == "DICOM" else _read_pil(source, name, facts)
    facts.update(height=int(image.shape[0]), width=int(image.shape[1]))
    return image, facts


def dicom_pixel_problem(path: str | Path) -> str | None:
    """Whether a DICOM's pixel data is all there, without decoding it: for uncompressed transfer syntaxes the
    bytes after the header must hold Rows × Columns × SamplesPerPixel × NumberOfFrames × BitsAllocated / 8."""
    import pydicom

    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        pixels_at = f.tell()  # pydicom stops at the (Pixel Data) element's tag
    if "Rows" not in ds or "Columns" not in ds:
        return "DICOM file has no image (no Rows/Columns)"
    size = os.path.getsize(path)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if size <= pixels_at:
        return "DICOM file has no pixel data"
    if syntax is None or syntax.is_compressed:
        return None  # encapsulated: the length is in the fragments; --deep decodes it
    header = 8 if syntax.is_implicit_VR else 12
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    values = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
    expected = (values * int(ds.get("BitsAllocated", 8) or 8) + 7) // 8
    available = size - pixels_at - header
    if available < expected:
        return f"DICOM pixel data is truncated ({max(available, 0)} of {expected} bytes)"
    return None


def check_image_header(path: str | Path) -> str | None:
    """A cheap readability check (header only); returns a problem description or None."""
    path = Path(path)
    if not path.is_file():
        return "image file not found"
    try:
        if is_dicom(path):
            return dicom_pixel_problem(path)
        else:
            with Image.open(path) as im:
                im.verify()
    except Exception as e:  # any failure here means "unreadable"; the message says why
        return f"unreadable image ({type(e).__name__}: {e})"
    return None
