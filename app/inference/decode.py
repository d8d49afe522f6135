"""Bytes -> a 2-D float32 grayscale slice. PNG/JPEG through OpenCV, DICOM through pydicom.

Intensities stay in float32 and are never squeezed into 8 bits here: DICOM gets its Modality
LUT (RescaleSlope/Intercept) and VOI LUT / window applied in float, MONOCHROME1 is inverted.
Scaling to the model's range happens once, in ``app.contract.preprocess``.
No DICOM tag value is ever put into a message or a warning (patient data).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from app.errors import InvalidImage, NoPixelData, PayloadTooLarge, UnsupportedMediaType

PNG = "image/png"
JPEG = "image/jpeg"
DICOM = "application/dicom"
MEDIA_TYPES = (PNG, JPEG, DICOM)

_SUFFIXES = {".png": PNG, ".jpg": JPEG, ".jpeg": JPEG, ".dcm": DICOM, ".dicom": DICOM}
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 [H, W]
    media_type: str
    warnings: list[str] = field(default_factory=list)


def sniff(data: bytes) -> str | None:
    """The media type the bytes' signature says, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if len(data) >= 132 and data[128:132] == b"DICM":
        return DICOM
    return None


def media_type_for_path(path: Path) -> str | None:
    return _SUFFIXES.get(path.suffix.lower())


def decode(data: bytes, declared: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes. ``declared`` is the client's media type, checked against the signature."""
    actual = sniff(data)
    if declared is not None and declared not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"media type {declared!r} is not supported; send one of {', '.join(MEDIA_TYPES)}")
    if actual is None:
        raise UnsupportedMediaType("the bytes are not a PNG, JPEG or DICOM (Part 10) file")
    if declared is not None and declared != actual:
        raise UnsupportedMediaType(f"declared {declared} but the bytes are {actual}")
    if actual == DICOM:
        return _decode_dicom(data, max_pixels)
    return _decode_raster(data, actual, max_pixels)


def decode_path(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    return decode(Path(path).read_bytes(), max_pixels=max_pixels)


def _to_gray(img: np.ndarray) -> tuple[np.ndarray, list[str]]:
    warnings: list[str] = []
    if img.ndim == 2:
        return img.astype(np.float32), warnings
    channels = img.shape[2]
    if channels == 4:  # BGRA: drop alpha
        img = img[:, :, :3]
    elif channels == 2:  # gray + alpha
        return img[:, :, 0].astype(np.float32), warnings
    f = img.astype(np.float32)
    spread = float(np.abs(f[:, :, 0] - f[:, :, 1]).mean() + np.abs(f[:, :, 1] - f[:, :, 2]).mean())
    if spread > 0.02 * max(float(f.max()), 1.0):
        warnings.append("the image has colour content; MRI slices are expected to be grayscale")
    # ITU-R BT.601 luma on BGR order, kept in float.
    gray = 0.114 * f[:, :, 0] + 0.587 * f[:, :, 1] + 0.299 * f[:, :, 2]
    return gray.astype(np.float32), warnings


def _decode_raster(data: bytes, media_type: str, max_pixels: int) -> DecodedImage:
    buf = np.frombuffer(data, dtype=np.uint8)
    # Read the header first so a decompression bomb is refused before its pixels are allocated.
    try:
        ok, width, height = _raster_size(data, media_type)
    except ValueError:
        ok, width, height = False, 0, 0
    if ok and width * height > max_pixels:
        raise PayloadTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InvalidImage(f"the {media_type} data could not be decoded (truncated or corrupt)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise PayloadTooLarge(f"image exceeds the limit of {max_pixels} pixels")
    gray, warnings = _to_gray(img)
    return DecodedImage(gray, media_type, warnings)


def _raster_size(data: bytes, media_type: str) -> tuple[bool, int, int]:
    """Width and height from a PNG IHDR or a JPEG SOF marker, without decoding pixels."""
    if media_type == PNG:
        if len(data) < 24:
            raise ValueError("short")
        return True, int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return True, width, height
        i += 2 + length
    return False, 0, 0


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidImage(f"the DICOM data could not be parsed ({type(exc).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NoPixelData("the DICOM file has no pixel data")
    warnings: list[str] = []
    if str(ds.get("Modality", "")).upper() not in ("MR", ""):
        warnings.append("the DICOM modality is not MR; the model was trained on MR slices")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols > max_pixels:
        raise PayloadTooLarge(f"image of {cols}x{rows} pixels exceeds the limit of {max_pixels} pixels")
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = getattr(tsyntax, "name", None) or str(tsyntax or "unknown")
        if "plugin" in str(exc).lower() or "decod" in str(exc).lower() or "handler" in str(exc).lower():
            raise UnsupportedMediaType(f"no decoder is installed for the transfer syntax {name}") from None
        raise InvalidImage(f"the DICOM pixel data could not be decoded ({name})") from None
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise InvalidImage(f"the DICOM pixel data could not be decoded ({type(exc).__name__})") from None
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        warnings.append(f"multi-frame DICOM ({frames} frames): the middle frame was used")
        arr = arr[frames // 2]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour DICOM (RGB / YBR converted to RGB by pydicom)
        gray, more = _to_gray(arr[:, :, ::-1])
        return DecodedImage(gray, DICOM, warnings + more)
    values = apply_modality_lut(arr, ds).astype(np.float32)
    values = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float32)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return DecodedImage(values, DICOM, warnings)
