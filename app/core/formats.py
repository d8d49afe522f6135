"""The input formats, one registry entry each: media type, signature, file suffixes, the names
clients use for it, the cheap header reading the decode budget costs it by, and that cost per pixel.

Everything that knows formats reads this: the decoder's sniffing and media-type checks, the decode
budget, the OpenAPI document's request bodies, ``/v1/model`` (which the web page reads for its file
picker), ``btd predict``'s file search and training's image-folder scan. The decoders themselves are
in ``decode`` (OpenCV for rasters, pydicom for DICOM); their size checks in ``image_headers``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from app.core.image_headers import JPEG_FRAME_MARKERS

# Peak bytes that decoding and preprocessing take per decoded pixel (per sample for DICOM), measured
# with tracemalloc: the decoded planes, the float slice, the preprocessing's planes (pydicom's copies,
# LUTs and the codec's planes for DICOM).
RASTER_BYTES_PER_PIXEL = 17
DICOM_BYTES_PER_PIXEL = 32
HEADER_SCAN_BYTES = 64 * 1024  # where a cheap size reading looks (JPEG frame header, DICOM Rows / Columns)


def _png_pixels(head: bytes) -> int | None:
    """width x height from IHDR (the decoder checks it again, thoroughly)."""
    if len(head) < 24:
        return None
    return int.from_bytes(head[16:20], "big") * int.from_bytes(head[20:24], "big")


def _jpeg_pixels(head: bytes) -> int | None:
    """width x height of the first frame header, reading segments only (no scan data), else None."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", head, pos + 2)[0]
        if marker in JPEG_FRAME_MARKERS and pos + 9 <= len(head):
            height, width = struct.unpack_from(">HH", head, pos + 5)
            return width * height or None
        if marker == 0xDA:  # the first scan comes before any frame header: not a size we can trust
            return None
        pos += 2 + length
    return None


# (0028,0002) Samples per Pixel, (0028,0010) Rows and (0028,0011) Columns, explicit VR "US" or
# implicit VR, little endian.
_DICOM_SIZE = re.compile(rb"\x28\x00(\x02|\x10|\x11)\x00(?:US\x02\x00|\x02\x00\x00\x00)(..)", re.DOTALL)


def _dicom_samples(head: bytes) -> int | None:
    """The largest Rows x the largest Columns x the most Samples per Pixel found in the head (an
    icon's are smaller than the image's; 3 samples when none is said), else None."""
    found: dict[bytes, list[int]] = {b"\x02": [], b"\x10": [], b"\x11": []}
    for match in _DICOM_SIZE.finditer(head):
        found[match.group(1)].append(int.from_bytes(match.group(2), "little"))
    rows, columns, samples = found[b"\x10"], found[b"\x11"], found[b"\x02"]
    if not rows or not columns:
        return None
    return max(rows) * max(columns) * (max(samples) if samples else 3) or None


@dataclass(frozen=True)
class ImageFormat:
    media_type: str
    name: str
    signature: bytes
    signature_offset: int
    suffixes: tuple[str, ...]  # lower case, with the dot
    aliases: tuple[str, ...]  # other media types clients send for it
    bytes_per_pixel: int  # decode cost per pixel (per sample for DICOM)
    pixels: Callable[[bytes], int | None]  # cheap size reading from the first HEADER_SCAN_BYTES, or None
    cost_includes_file: bool = False  # DICOM: pydicom holds the whole file beside the pixels

    def matches(self, data: bytes) -> bool:
        end = self.signature_offset + len(self.signature)
        return len(data) >= end and data[self.signature_offset:end] == self.signature


PNG = ImageFormat("image/png", "PNG", b"\x89PNG\r\n\x1a\n", 0, (".png",), ("image/x-png",),
                  RASTER_BYTES_PER_PIXEL, _png_pixels)
JPEG = ImageFormat("image/jpeg", "JPEG", b"\xff\xd8\xff", 0, (".jpg", ".jpeg"), ("image/jpg", "image/pjpeg"),
                   RASTER_BYTES_PER_PIXEL, _jpeg_pixels)
DICOM = ImageFormat("application/dicom", "DICOM (Part 10)", b"DICM", 128, (".dcm", ".dicom"),
                    ("application/dicom+octet-stream",), DICOM_BYTES_PER_PIXEL, _dicom_samples,
                    cost_includes_file=True)
FORMATS: tuple[ImageFormat, ...] = (PNG, JPEG, DICOM)
BY_MEDIA_TYPE = {f.media_type: f for f in FORMATS}
SIGNATURE_BYTES = max(f.signature_offset + len(f.signature) for f in FORMATS)  # enough to sniff any


def sniff(data: bytes) -> ImageFormat | None:
    """The format the bytes' signature says, or None."""
    return next((f for f in FORMATS if f.matches(data)), None)


def format_for_suffix(suffix: str) -> ImageFormat | None:
    return next((f for f in FORMATS if suffix.lower() in f.suffixes), None)


def describe() -> list[dict[str, object]]:
    """The formats as ``/v1/model`` tells clients (the web page's file picker reads it)."""
    return [{"media_type": f.media_type, "name": f.name, "suffixes": list(f.suffixes)} for f in FORMATS]
