"""Bytes -> a 2-D float32 grayscale slice. PNG/JPEG through OpenCV, DICOM through pydicom.

Intensities stay in float32 and are never squeezed into 8 bits here: DICOM gets its Modality
LUT (RescaleSlope/Intercept) and VOI LUT / window applied in float, MONOCHROME1 is inverted.
Scaling to the model's range happens once, in ``app.contract.preprocess``.
No DICOM tag value is ever put into a message or a warning (patient data).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings as warnings_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from app.errors import InvalidImage, NoPixelData, PayloadTooLarge, ServiceError, UnsupportedMediaType

PNG = "image/png"
JPEG = "image/jpeg"
DICOM = "application/dicom"
MEDIA_TYPES = (PNG, JPEG, DICOM)

_SUFFIXES = {".png": PNG, ".jpg": JPEG, ".jpeg": JPEG, ".dcm": DICOM, ".dicom": DICOM}
# 4096 x 4096: far above any MRI slice, and a colour image this size peaks near 0.4 GiB in decode
# and preprocess, so a few at once stay inside the CPU pod's 2 GiB limit (k8s/base).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Which frame of a multi-frame DICOM is classified (BTD_MULTIFRAME); a warning always says which.
MultiframePolicy = Literal["middle", "first"]


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


# What clients send for our types; generic types mean "look at the bytes".
_ALIASES = {"image/jpg": JPEG, "image/pjpeg": JPEG, "image/x-png": PNG, "application/dicom+octet-stream": DICOM}
GENERIC_MEDIA_TYPES = ("", "application/octet-stream", "binary/octet-stream")


def normalise_media_type(declared: str | None) -> str | None:
    """A client's Content-Type as one of MEDIA_TYPES, None when generic (sniff the bytes), or the
    bare unsupported type (lower case, parameters dropped) for :func:`decode` to refuse."""
    if declared is None:
        return None
    bare = declared.split(";", 1)[0].strip().lower()
    if bare in GENERIC_MEDIA_TYPES:
        return None
    return _ALIASES.get(bare, bare)


def decode(data: bytes, declared: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           multiframe: MultiframePolicy = "middle") -> DecodedImage:
    """Decode image bytes. ``declared`` is the client's media type, checked against the signature;
    ``multiframe`` picks the frame of a multi-frame DICOM."""
    declared = normalise_media_type(declared)
    if declared is not None and declared not in MEDIA_TYPES:
        shown = declared if len(declared) <= 80 else declared[:80] + "..."
        raise UnsupportedMediaType(f"media type {shown!r} is not supported; send one of {', '.join(MEDIA_TYPES)}")
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    actual = sniff(data)
    if actual is None:
        raise UnsupportedMediaType("the bytes are not a PNG, JPEG or DICOM (Part 10) file")
    if declared is not None and declared != actual:
        raise UnsupportedMediaType(f"declared {declared} but the bytes are {actual}")
    if actual == DICOM:
        return _decode_dicom(data, max_pixels, multiframe)
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
    frames = _png_frames(data) if media_type == PNG else 1
    if frames > 1:  # OpenCV decodes the default image, the first frame of an animated PNG
        warnings.append(f"animated PNG ({frames} frames): the first frame was used")
    return DecodedImage(gray, media_type, warnings)


def _png_frames(data: bytes) -> int:
    """The frame count of an animated PNG (its acTL chunk, which comes before the first IDAT), else 1."""
    pos = 8
    while pos + 16 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind == b"acTL":
            return max(1, int.from_bytes(data[pos + 8 : pos + 12], "big"))
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return 1


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


def _decode_dicom(data: bytes, max_pixels: int, multiframe: MultiframePolicy) -> DecodedImage:
    """DICOM Part 10 -> float32 slice: Modality LUT, then VOI LUT or window (to [0, 1]), MONOCHROME1
    inverted. Multi-frame policy: the middle frame (``frames // 2``) by default, or the first; with a warning."""
    with _quiet_pydicom():
        try:
            return _read_dicom(data, max_pixels, multiframe)
        except ServiceError:
            raise
        except Exception as exc:  # pydicom parses lazily: any element may fail on malformed input
            # Only the exception's type: its message can quote tag values (patient data).
            raise InvalidImage(f"the DICOM data could not be read ({type(exc).__name__})") from None


def _read_dicom(data: bytes, max_pixels: int, multiframe: MultiframePolicy) -> DecodedImage:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise InvalidImage("the DICOM file meta information has no transfer syntax (not a valid Part 10 file)")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NoPixelData("the DICOM file has no pixel data")
    warnings: list[str] = []
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in ("MR", ""):
        warnings.append("the DICOM modality is not MR; the model was trained on MR slices")
    rows, cols, frames = _int_tag(ds, "Rows"), _int_tag(ds, "Columns"), max(1, _int_tag(ds, "NumberOfFrames"))
    if rows <= 0 or cols <= 0:
        raise InvalidImage("the DICOM file has no valid image size (Rows / Columns)")
    if rows * cols > max_pixels:
        raise PayloadTooLarge(f"image of {cols}x{rows} pixels exceeds the limit of {max_pixels} pixels")
    plugin = _decoding_plugin(ds)
    frame = (frames // 2 if multiframe == "middle" else 0) if frames > 1 else None
    try:
        # decode only the frame we use (multi-frame), with a plugin that fails cleanly on bad data
        ds.pixel_array_options(index=frame, decoding_plugin=plugin)
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # a decoder exists (checked above): the data is bad
        raise InvalidImage(f"the DICOM pixel data could not be decoded ({type(exc).__name__})") from None
    if frame is not None:
        warnings.append(f"multi-frame DICOM ({frames} frames): the {multiframe} frame ({frame + 1}) was used")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM, RGB after pydicom's conversion
        gray, more = _to_gray(arr[:, :, 2::-1])
        return DecodedImage(gray, DICOM, warnings + more)
    if arr.ndim != 2:
        raise InvalidImage(f"the DICOM pixel data has an unexpected shape ({arr.ndim} dimensions)")
    values, more = _grayscale_luts(arr, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "").upper()
    if photometric == "MONOCHROME1":  # low values are white: invert so high values are bright
        values = np.float32(values.max() + values.min()) - values
    return DecodedImage(np.ascontiguousarray(values, dtype=np.float32), DICOM, warnings + more)


_PYDICOM_QUIET = threading.Lock()
# Top-level names of the loggers of pydicom and its decoding plugins.
_DECODER_LOGGER_ROOTS = ("pydicom", "pylibjpeg", "openjpeg", "_openjpeg", "libjpeg", "rle", "gdcm", "pyjpegls")


def _decoder_loggers() -> list[logging.Logger]:
    """Every existing logger of pydicom and its plugins: a child logger (pydicom.pixels.decoders.base
    logs each failing plugin's exception) is not silenced by disabling its parent."""
    import pydicom.pixels

    existing = list(logging.root.manager.loggerDict)  # one C-level copy: other threads may add loggers
    names = {*_DECODER_LOGGER_ROOTS, *(n for n in existing if n.split(".", 1)[0] in _DECODER_LOGGER_ROOTS)}
    return [logging.getLogger(name) for name in sorted(names)]


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom warns (and logs) with tag values in the message: keep them out of our logs.
    Warning filters and logger state are process-wide, so DICOM decoding holds a lock."""
    with _PYDICOM_QUIET:
        loggers = _decoder_loggers()
        saved = [logger.disabled for logger in loggers]
        for logger in loggers:
            logger.disabled = True
        try:
            with warnings_module.catch_warnings():
                warnings_module.simplefilter("ignore")
                yield
        finally:
            for logger, was_disabled in zip(loggers, saved):
                logger.disabled = was_disabled


def _int_tag(ds, keyword: str) -> int:
    try:
        return int(ds.get(keyword, 0) or 0)
    except (TypeError, ValueError):
        return 0


def _syntax_name(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "(none given)"
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


# python-gdcm aborts the whole process on some malformed compressed data (found by fuzzing JPEG 2000),
# so it is used only for a transfer syntax no other installed plugin decodes.
_PLUGIN_PREFERENCE = ("pylibjpeg", "pydicom", "pyjpegls", "pillow")


def _decoding_plugin(ds) -> str:
    """The pydicom decoding plugin to use ("" for uncompressed data); a compressed transfer syntax
    without any installed decoder (pylibjpeg / python-gdcm) is a 415 naming the syntax."""
    from pydicom.pixels import get_decoder

    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None or not getattr(uid, "is_compressed", False):
        return ""
    try:
        decoder = get_decoder(uid)
        available = decoder.available_plugins if decoder.is_available else ()
    except NotImplementedError:
        available = ()
    if not available:
        raise UnsupportedMediaType(
            f"no installed decoder can read the transfer syntax {_syntax_name(ds)}; "
            "install the dicom-codecs extra (pylibjpeg, python-gdcm) or send an uncompressed DICOM"
        )
    return next((p for p in _PLUGIN_PREFERENCE if p in available), available[0])


def _grayscale_luts(arr: np.ndarray, ds) -> tuple[np.ndarray, list[str]]:
    """Modality LUT (RescaleSlope / Intercept or LUT) then VOI: a VOI LUT Sequence, else the first
    Window Center / Width (LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3 C.11.2.1.2), output in [0, 1].
    Without either, the modality values are returned as they are (float32)."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    warnings: list[str] = []
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        try:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            lut = np.asarray(apply_voi(values, ds), dtype=np.float32)
            return lut / np.float32(2**bits - 1), warnings
        except (ValueError, TypeError, IndexError, AttributeError, KeyError):
            warnings.append("the DICOM VOI LUT is invalid; the full intensity range was used")
            return values, warnings
    window = _window(ds)
    if window is None:
        if "WindowCenter" in ds or "WindowWidth" in ds:
            warnings.append("the DICOM window is invalid; the full intensity range was used")
        return values, warnings
    center, width, function = window
    v = values.astype(np.float64)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (v - center) / width))
    elif function == "LINEAR_EXACT":
        out = np.clip((v - (center - width / 2)) / width, 0.0, 1.0)
    else:  # LINEAR: PS3.3 C.11.2.1.2.1 (centre - 0.5, width - 1)
        out = np.clip((v - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return out.astype(np.float32), warnings


def _window(ds) -> tuple[float, float, str] | None:
    """The first (center, width, function) of the VOI LUT Module, or None if absent or invalid."""

    def first(keyword: str) -> float | None:
        elem = ds.get(keyword)
        if elem is None:
            return None
        multi = hasattr(elem, "__len__") and not isinstance(elem, (str, bytes))
        value = (elem[0] if len(elem) else None) if multi else elem
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return number if np.isfinite(number) else None

    center, width = first("WindowCenter"), first("WindowWidth")
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if (function == "LINEAR" and width <= 1) or width <= 0:
        return None
    return center, width, function


quiet_pydicom = _quiet_pydicom  # for other readers of DICOM headers (app.pacs)
