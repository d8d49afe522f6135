"""Bytes -> a 2-D float32 grayscale slice. PNG/JPEG through OpenCV, DICOM through pydicom.

Intensities stay in float32 and are never squeezed into 8 bits here: DICOM gets its Modality
LUT (RescaleSlope/Intercept) and VOI LUT / window applied in float, MONOCHROME1 is inverted.
Scaling to the model's range happens once, in ``app.core.contract.preprocess``.
No DICOM tag value is ever put into a message or a warning (patient data).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import warnings as warnings_module
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from app.core import formats
from app.core.acquisition import Acquisition, read_acquisition
from app.core.dicom_read import element_limits, read_dataset, results_header
from app.core.errors import InvalidImage, NoPixelData, PayloadTooLarge, ServiceError, UnsupportedMediaType
from app.core.image_headers import (
    FrameHeader,
    HeaderError,
    j2k_header,
    jpeg_header,
    png_header,
    png_pixel_chunks,
)
from app.core.series import SliceGeometry, frame_geometries

PNG, JPEG, DICOM = (f.media_type for f in formats.FORMATS)  # the registry's media types, by name
MEDIA_TYPES = tuple(formats.BY_MEDIA_TYPE)

# 4096 x 4096: far above any MRI slice, and a colour image this size peaks near 0.4 GiB in decode
# and preprocess, so a few at once stay inside the CPU pod's 2 GiB limit (k8s/base).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Which frame of a multi-frame DICOM is classified (BTD_MULTIFRAME); a warning always says which.
MultiframePolicy = Literal["middle", "first"]
COLOUR_SAMPLE_PIXELS = 2**18


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 [H, W]
    media_type: str
    warnings: list[str] = field(default_factory=list)
    # A DICOM's attributes that DICOM results copy (``dicom_read.results_header``), when asked for
    source: Any = None
    modality: str | None = None  # a DICOM's Modality (upper case, "" when absent); None for PNG / JPEG
    # What an MR DICOM's headers say about the plane and sequence (the intended-use gate); None otherwise
    acquisition: Acquisition | None = None
    instance_sha256: str | None = None  # ``instance_uid_sha256`` of its SOP Instance UID; None when absent


def instance_uid_sha256(uid: str) -> str:
    """The sha256 (hex) of a SOP Instance UID, as a prediction record keeps it: readers' feedback names
    a PACS result's source instance by its UID, the record never holds the UID itself."""
    return hashlib.sha256(uid.strip().encode("ascii", "replace")).hexdigest()


def sniff(data: bytes) -> str | None:
    """The media type the bytes' signature says, or None."""
    found = formats.sniff(data)
    return None if found is None else found.media_type


def media_type_for_path(path: Path) -> str | None:
    found = formats.format_for_suffix(path.suffix)
    return None if found is None else found.media_type


# What clients send for our types; generic types mean "look at the bytes".
_ALIASES = {alias: f.media_type for f in formats.FORMATS for alias in f.aliases}
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
           multiframe: MultiframePolicy = "middle", source: bool = False,
           sniffed: str | None = None, frame: int | None = None) -> DecodedImage:
    """Decode image bytes. ``declared`` is the client's media type, checked against the signature;
    ``multiframe`` picks the frame of a multi-frame DICOM; ``source``: also read the DICOM attributes
    its DICOM results copy (a 400 for any other input, or a DICOM without the UIDs they reference);
    ``sniffed``: ``sniff(data)`` when the caller has it already (one sniff per request); ``frame``: this
    frame (0-based) of a DICOM instead of the policy's, as a series reads every frame of an Enhanced MR."""
    declared = normalise_media_type(declared)
    if declared is not None and declared not in MEDIA_TYPES:
        shown = declared if len(declared) <= 80 else declared[:80] + "..."
        raise UnsupportedMediaType(f"media type {shown!r} is not supported; send one of {', '.join(MEDIA_TYPES)}")
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    actual = sniffed or sniff(data)
    if actual is None:
        raise UnsupportedMediaType("the bytes are not a PNG, JPEG or DICOM (Part 10) file")
    if declared is not None and declared != actual:
        raise UnsupportedMediaType(f"declared {declared} but the bytes are {actual}")
    if source and actual != DICOM:
        raise InvalidImage("DICOM results need a DICOM input")
    try:
        if actual == DICOM:
            return _decode_dicom(data, max_pixels, multiframe, source, frame)
        return _decode_raster(data, actual, max_pixels)
    except MemoryError:  # a host worker's address-space limit (or the machine) said no
        raise PayloadTooLarge("decoding this image needs more memory than a decoder may use") from None


def decode_path(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    return decode(Path(path).read_bytes(), max_pixels=max_pixels)


@dataclass(frozen=True)
class InstanceHeader:
    """What the PACS transports' series assembly needs of a received DICOM object (UIDs are patient
    data: never logged)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    geometry: tuple[SliceGeometry, ...]  # one per frame

    @property
    def frames(self) -> int:
        return len(self.geometry)


def _instance_number(ds: Any) -> int | None:
    """Instance Number as an int; None when absent or not a number."""
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None


def read_instance_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> InstanceHeader:
    """``read_study_uid``, the series, the instance and each frame's geometry (``frame_geometries``) of a
    DICOM Part 10 object, its header read under ``dicom_read``'s limits: what ``btd dicom-listen`` reads,
    in its isolated worker, of each object it receives in series mode. Typed errors as ``decode``;
    messages never quote tag values."""
    with _quiet_pydicom(), element_limits():
        try:
            ds = read_dataset(data, max_pixels, stop_before_pixels=True)
            number = _instance_number(ds)
            study, series, sop, sop_class = (str(ds.get(k, "") or "") for k in (
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"))
            return InstanceHeader(study, series, sop, sop_class, tuple(frame_geometries(ds, sop or None, number)))
        except (ServiceError, MemoryError):
            raise
        except Exception as exc:  # pydicom parses lazily: any element may fail on malformed input
            raise InvalidImage(f"the DICOM data could not be read ({type(exc).__name__})") from None


def _to_gray(img: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Luma in float32. Built channel by channel, never as a float copy of the whole colour image:
    a 4096² RGB image then peaks at its own size plus two float planes."""
    warnings: list[str] = []
    if img.ndim == 2:
        return img.astype(np.float32), warnings
    if img.shape[2] == 2:  # gray + alpha
        return img[:, :, 0].astype(np.float32), warnings
    # Colour content, judged on at most ~2^18 evenly spread pixels (every pixel of a small image).
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / COLOUR_SAMPLE_PIXELS)))
    sample = img[::step, ::step, :3].astype(np.float32)
    spread = float(np.abs(sample[:, :, 0] - sample[:, :, 1]).mean() + np.abs(sample[:, :, 1] - sample[:, :, 2]).mean())
    if spread > 0.02 * max(float(sample.max()), 1.0):
        warnings.append("the image has colour content; MRI slices are expected to be grayscale")
    # ITU-R BT.601 luma on BGR order (alpha, if any, ignored), kept in float.
    gray = np.multiply(img[:, :, 0], 0.114, dtype=np.float32)
    gray += np.multiply(img[:, :, 1], 0.587, dtype=np.float32)
    gray += np.multiply(img[:, :, 2], 0.299, dtype=np.float32)
    return gray, warnings


def _decode_raster(data: bytes, media_type: str, max_pixels: int) -> DecodedImage:
    # The header the decoder will read says how much it will allocate: refuse a bomb before that.
    try:
        header = png_header(data) if media_type == PNG else jpeg_header(data)
    except HeaderError as exc:
        raise InvalidImage(f"the {media_type} header is invalid: {exc}") from None
    _check_pixels(header.width, header.height, max_pixels)
    # libpng inflates text and ICC chunks too (zlib streams no header sizes): it gets only the pixels'.
    pixels = png_pixel_chunks(data) if media_type == PNG else data
    img = cv2.imdecode(np.frombuffer(pixels, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InvalidImage(f"the {media_type} data could not be decoded (truncated or corrupt)")
    if img.shape[0] * img.shape[1] > max_pixels:  # the decoder disagreed with the header it was given
        raise PayloadTooLarge(f"image exceeds the limit of {max_pixels} pixels")
    gray, warnings = _to_gray(img)
    frames = _png_frames(data) if media_type == PNG else 1
    if frames > 1:  # OpenCV decodes the default image, the first frame of an animated PNG
        warnings.append(f"animated PNG ({frames} frames): the first frame was used")
    return DecodedImage(gray, media_type, warnings)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")


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


def _decode_dicom(data: bytes, max_pixels: int, multiframe: MultiframePolicy, source: bool = False,
                  frame: int | None = None) -> DecodedImage:
    """DICOM Part 10 -> float32 slice: Modality LUT, then VOI LUT or window (to [0, 1]), MONOCHROME1
    inverted. Multi-frame policy: the middle frame (``frames // 2``) by default, or the first; with a warning.
    Read under ``dicom_read``'s limits (deflate, element count, value sizes)."""
    with _quiet_pydicom(), element_limits():
        try:
            return _read_dicom(data, max_pixels, multiframe, source, frame)
        except (ServiceError, MemoryError):
            raise
        except Exception as exc:  # pydicom parses lazily: any element may fail on malformed input
            # Only the exception's type: its message can quote tag values (patient data).
            raise InvalidImage(f"the DICOM data could not be read ({type(exc).__name__})") from None


def read_study_uid(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The Study Instance UID of a DICOM Part 10 object ("" when it has none), its whole header read
    under ``dicom_read``'s limits: what ``btd dicom-listen`` checks, in its isolated worker, before it
    queues a received object. Typed errors as ``decode``; messages never quote tag values."""
    with _quiet_pydicom(), element_limits():
        try:
            ds = read_dataset(data, max_pixels, stop_before_pixels=True)
            return str(ds.get("StudyInstanceUID", "") or "")
        except (ServiceError, MemoryError):
            raise
        except Exception as exc:  # pydicom parses lazily: any element may fail on malformed input
            raise InvalidImage(f"the DICOM data could not be read ({type(exc).__name__})") from None


def _read_dicom(data: bytes, max_pixels: int, multiframe: MultiframePolicy, source: bool = False,
                chosen: int | None = None) -> DecodedImage:
    ds = read_dataset(data, max_pixels)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise InvalidImage("the DICOM file meta information has no transfer syntax (not a valid Part 10 file)")
    header = results_header(ds) if source else None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NoPixelData("the DICOM file has no pixel data")
    warnings: list[str] = []
    modality = str(ds.get("Modality", "") or "").strip().upper()  # not MR: out of distribution (pipeline)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    instance = instance_uid_sha256(uid) if uid.strip() else None
    rows, cols, frames = _int_tag(ds, "Rows"), _int_tag(ds, "Columns"), max(1, _int_tag(ds, "NumberOfFrames"))
    if rows <= 0 or cols <= 0:
        raise InvalidImage("the DICOM file has no valid image size (Rows / Columns)")
    if rows * cols > max_pixels:
        raise PayloadTooLarge(f"image of {cols}x{rows} pixels exceeds the limit of {max_pixels} pixels")
    plugin = _decoding_plugin(ds)
    if chosen is not None and not 0 <= chosen < frames:
        raise InvalidImage(f"the DICOM file has {frames} frame(s); frame {chosen + 1} was asked for")
    frame = chosen if chosen is not None else (frames // 2 if multiframe == "middle" else 0) if frames > 1 else 0
    acquisition = read_acquisition(ds, frame) if modality == "MR" else None  # the gate reads the headers
    if plugin:  # compressed: the codestream's own header must agree with Rows / Columns
        _check_encapsulated_frame(ds, frame, frames, rows, cols)
    try:
        # decode only the frame we use (the one checked above), with a plugin that fails cleanly on bad data
        ds.pixel_array_options(index=frame, decoding_plugin=plugin)
        arr = np.asarray(ds.pixel_array)
    except MemoryError:
        raise
    except Exception as exc:  # a decoder exists (checked above): the data is bad, or memory ran out
        if not _decoder_memory_fits(rows * cols * max(1, _int_tag(ds, "SamplesPerPixel"))):
            raise MemoryError from None
        raise InvalidImage(f"the DICOM pixel data could not be decoded ({type(exc).__name__})") from None
    if frames > 1 and chosen is None:  # a series names its frames itself
        warnings.append(f"multi-frame DICOM ({frames} frames): the {multiframe} frame ({frame + 1}) was used")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM, RGB after pydicom's conversion
        gray, more = _to_gray(arr[:, :, 2::-1])
        return DecodedImage(gray, DICOM, warnings + more, header, modality, acquisition, instance)
    if arr.ndim != 2:
        raise InvalidImage(f"the DICOM pixel data has an unexpected shape ({arr.ndim} dimensions)")
    values, more = _grayscale_luts(arr, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "").upper()
    if photometric == "MONOCHROME1":  # low values are white: invert so high values are bright
        values = np.float32(values.max() + values.min()) - values
    return DecodedImage(np.ascontiguousarray(values, dtype=np.float32), DICOM, warnings + more, header, modality,
                        acquisition, instance)


# The header reader for each compressed transfer syntax's frames. RLE has no size of its own: its
# decoder fills exactly Rows x Columns. Other syntaxes cannot be checked, so they are refused.
def _frame_header_readers() -> dict[str, Callable[[bytes], FrameHeader]]:
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    return {**{uid: jpeg_header for uid in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes)},
            **{uid: j2k_header for uid in JPEG2000TransferSyntaxes}}


def _check_encapsulated_frame(ds, index: int, frames: int, rows: int, cols: int) -> None:
    """The frame pydicom will decode, read exactly as it reads it (``get_frame`` with the same
    offsets), must say the size and samples the dataset says; a lie is a 400 before decoding."""
    from pydicom.encaps import get_frame
    from pydicom.uid import RLELossless

    uid = ds.file_meta.TransferSyntaxUID
    if uid == RLELossless:
        return
    read_header = _frame_header_readers().get(uid)
    if read_header is None:
        raise UnsupportedMediaType(f"the transfer syntax {_syntax_name(ds)} is not supported: the size of its "
                                   "frames cannot be checked before decoding")
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        header = read_header(get_frame(ds.PixelData, index, number_of_frames=frames, extended_offsets=offsets))
    except HeaderError as exc:
        raise InvalidImage(f"the encapsulated frame's header is invalid: {exc}") from None
    except Exception as exc:  # the encapsulation itself is broken
        raise InvalidImage(f"the encapsulated pixel data could not be read ({type(exc).__name__})") from None
    if (header.width, header.height) != (cols, rows):
        raise InvalidImage(f"the encapsulated {header.codec} frame is {header.width}x{header.height} pixels "
                           f"but Rows / Columns say {cols}x{rows}")
    samples = max(1, _int_tag(ds, "SamplesPerPixel"))
    if header.components != samples:
        raise InvalidImage(f"the encapsulated {header.codec} frame has {header.components} components "
                           f"but Samples per Pixel says {samples}")


_PYDICOM_QUIET = threading.Lock()
# Top-level names of the loggers of pydicom and its decoding plugins.
_DECODER_LOGGER_ROOTS = ("pydicom", "pylibjpeg", "openjpeg", "_openjpeg", "libjpeg", "rle", "gdcm", "pyjpegls")


def _decoder_loggers() -> list[logging.Logger]:
    """Every existing logger of pydicom and its plugins: a child logger (pydicom.pixels.decoders.base
    logs each failing plugin's exception) is not silenced by disabling its parent."""

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


def _decoder_memory_fits(samples: int) -> bool:
    """Whether a decode of ``samples`` samples still has room under this process's address-space
    limit (a host worker's). Codecs report a failed allocation as their own error (OpenJPEG through
    pylibjpeg: RuntimeError "failed to decode image"), not MemoryError: reserving, never touching,
    their working memory tells "too large for this decoder" (413) from "corrupt" (400)."""
    import resource

    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        return True
    try:
        np.empty(samples * formats.DICOM_BYTES_PER_PIXEL, np.uint8)  # address space only: no page is touched
    except MemoryError:
        return False
    return True


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


quiet_pydicom = _quiet_pydicom  # for other readers of DICOM headers (app.transports.pacs)


def read_slice_geometry(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, list[SliceGeometry]]:
    """(Series Instance UID, "" when none; one geometry per frame) of a DICOM Part 10 object, its header
    read under ``dicom_read``'s limits without the pixels: what a series reads of each instance, in the
    isolated worker, to check that they are one series and to order their slices. Typed errors as
    ``decode``; messages never quote tag values."""
    if sniff(data) != DICOM:
        raise UnsupportedMediaType("a series part is not a DICOM Part 10 file")
    with _quiet_pydicom(), element_limits():
        try:
            ds = read_dataset(data, max_pixels, stop_before_pixels=True)
            number = _instance_number(ds)
            uid = str(ds.get("SOPInstanceUID", "") or "") or None
            return str(ds.get("SeriesInstanceUID", "") or ""), frame_geometries(ds, uid, number)
        except (ServiceError, MemoryError):
            raise
        except Exception as exc:  # pydicom parses lazily: any element may fail on malformed input
            raise InvalidImage(f"the DICOM data could not be read ({type(exc).__name__})") from None
