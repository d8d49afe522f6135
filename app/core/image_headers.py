"""The real size of an image, read from its container's own header before any pixel is decoded.

A decoder allocates what the header it reads says, so these parsers read the same header the
decoder will: the PNG IHDR (and every APNG frame control, and every chunk's length), every JPEG / JPEG-LS frame header
(SOF0-15, SOF55, DHP) after any fill bytes, segments and scans, and the JPEG 2000 SIZ (raw
codestream or JP2 file). Pure functions on bytes; a malformed header is a :class:`HeaderError`.

A PNG's pixels are not the only thing libpng inflates: zTXt, iTXt and iCCP chunks are zlib streams
too (up to 8 MB each, hundreds per file), which no header states the size of.
:func:`png_pixel_chunks` therefore hands the decoder only the chunks that make the pixels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"

# Frame headers: SOF0-3, 5-7, 9-11, 13-15 (C4 DHT, C8 JPG, CC DAC are not frames), DHP (hierarchical
# mode's overall size) and SOF55 (JPEG-LS, ITU-T T.87).
JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI
_SOS, _EOI, _DNL = 0xDA, 0xD9, 0xDC
# More scans than any real progressive JPEG needs (libjpeg-turbo's fuzzers stop at 500): each scan
# is a full pass over the coefficients, so thousands of them are a CPU bomb in a small file.
MAX_JPEG_SCANS = 500
MAX_J2K_TILES = 65535  # ISO/IEC 15444-1 A.5.1


class HeaderError(ValueError):
    """The header is missing, truncated or inconsistent; the message says what, never any pixel data."""


@dataclass(frozen=True)
class FrameHeader:
    width: int
    height: int
    components: int
    bits: int  # sample precision
    codec: str  # "PNG", "JPEG", "JPEG-LS" or "JPEG 2000"

    @property
    def pixels(self) -> int:
        return self.width * self.height


def png_header(data: bytes) -> FrameHeader:
    """Size from the IHDR chunk, which must come first; every APNG frame (fcTL) must lie inside it."""
    if not data.startswith(PNG_SIGNATURE):
        raise HeaderError("not a PNG signature")
    if len(data) < 33 or data[12:16] != b"IHDR" or _u32(data, 8) != 13:
        raise HeaderError("the PNG does not start with a valid IHDR chunk")
    width, height, bits, colour = _u32(data, 16), _u32(data, 20), data[24], data[25]
    components = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if width == 0 or height == 0 or width >= 2**31 or height >= 2**31 or components is None:
        raise HeaderError("the PNG IHDR chunk has an invalid size or colour type")
    pos = 33
    while pos + 8 <= len(data):
        length, kind = _u32(data, pos), data[pos + 4 : pos + 8]
        # OpenCV allocates a chunk's declared length before reading it: an IDAT that claims 2 GiB in
        # a 100-byte file is a memory bomb. The whole file is here, so a longer claim is a lie.
        if pos + 12 + length > len(data):
            raise HeaderError("a PNG chunk claims more bytes than the file has (truncated or corrupt)")
        if kind == b"fcTL" and pos + 8 + 20 <= len(data):
            w, h, x, y = struct.unpack_from(">IIII", data, pos + 12)
            if w == 0 or h == 0 or x + w > width or y + h > height:
                raise HeaderError("an animated PNG frame lies outside the image's IHDR size")
        if kind == b"IEND":
            break
        pos += 12 + length
    return FrameHeader(width, height, components, bits, "PNG")


# Ancillary chunks that change the decoded pixels (tRNS adds an alpha channel; it is never
# compressed). Every other ancillary chunk (text, ICC profile, EXIF, animation...) is metadata the
# service never reads, and zTXt / iTXt / iCCP are zlib streams of unstated size.
PNG_PIXEL_ANCILLARY = frozenset({b"tRNS"})


def png_pixel_chunks(data: bytes) -> bytes:
    """The PNG with only the chunks its pixels need: the critical ones (IHDR, PLTE, IDAT, IEND, and
    any unknown critical chunk, which libpng refuses as before) and tRNS; nothing after IEND. The
    only zlib stream left is the image data, whose inflated size IHDR states (and the decode budget
    counts). ``data`` itself when nothing is dropped; call after :func:`png_header` accepted it."""
    kept, pos, dropped = [data[:8]], 8, False
    while pos + 12 <= len(data):
        length, kind = _u32(data, pos), data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if kind[0] & 0x20 == 0 or kind in PNG_PIXEL_ANCILLARY:  # bit 5 of the first letter: ancillary
            kept.append(data[pos:end])
        else:
            dropped = True
        pos = end
        if kind == b"IEND":
            break
    if not dropped and pos == len(data):
        return data
    return b"".join(kept)


def jpeg_header(data: bytes) -> FrameHeader:
    """The frame header of a JPEG or JPEG-LS stream, reading every marker the way libjpeg does:
    fill bytes (0xFF runs) before a marker, bytes outside any segment skipped, segments by their
    length, entropy-coded scans up to the next marker. With several frame headers (hierarchical
    mode, or a file that lies) the largest counts. A height of 0 is taken from the DNL marker."""
    if not data.startswith(b"\xff\xd8"):
        raise HeaderError("not a JPEG stream (no SOI marker)")
    n, pos = len(data), 2
    frames: list[FrameHeader] = []
    scans, lines = 0, 0
    while pos < n:
        pos = data.find(b"\xff", pos)  # bytes outside a segment are skipped, as libjpeg does
        if pos < 0:
            break
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            break
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > n:
            raise HeaderError("the JPEG stream ends inside a marker segment")
        length = _u16(data, pos)
        if length < 2 or pos + length > n:
            raise HeaderError("a JPEG marker segment has an invalid length (truncated or corrupt)")
        segment = data[pos + 2 : pos + length]
        pos += length
        if marker in JPEG_FRAME_MARKERS:
            if len(segment) < 6:
                raise HeaderError("a JPEG frame header is too short")
            codec = "JPEG-LS" if marker == 0xF7 else "JPEG"
            frames.append(FrameHeader(_u16(segment, 3), _u16(segment, 1), segment[5], segment[0], codec))
        elif marker == _DNL and len(segment) >= 2:
            lines = lines or _u16(segment, 0)
        elif marker == _SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise HeaderError(f"the JPEG stream has more than {MAX_JPEG_SCANS} scans")
            pos = _end_of_scan(data, pos)
    if not frames:
        raise HeaderError("the JPEG stream has no frame header (SOF)")
    frames = [f if f.height else FrameHeader(f.width, lines, f.components, f.bits, f.codec) for f in frames]
    largest = max(frames, key=lambda f: f.pixels)
    if largest.width == 0 or largest.height == 0 or largest.components == 0:
        raise HeaderError("the JPEG frame header has a zero size or no components")
    return largest


def _end_of_scan(data: bytes, pos: int) -> int:
    """The position of the marker that ends an entropy-coded scan. In JPEG data 0xFF is followed by
    0x00 (stuffing) or a restart marker, in JPEG-LS data by a byte below 0x80 (bit stuffing); both
    continue the scan. Any other 0xFF xx is a marker."""
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            return n
        following = data[pos + 1]
        if following < 0x80 or 0xD0 <= following <= 0xD7:
            pos += 2
        elif following == 0xFF:  # a fill byte before the marker
            pos += 1
        else:
            return pos


def j2k_header(data: bytes) -> FrameHeader:
    """The SIZ segment of a JPEG 2000 codestream, or of the codestream box of a JP2 file."""
    if data.startswith(JP2_SIGNATURE):
        data = _jp2_codestream(data)
    if not data.startswith(J2K_SOC_SIZ):
        raise HeaderError("not a JPEG 2000 codestream (no SOC and SIZ markers)")
    if len(data) < 42:
        raise HeaderError("the JPEG 2000 SIZ segment is truncated")
    length = _u16(data, 4)
    (_, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz) = struct.unpack_from(">HIIIIIIIIH", data, 6)
    if length != 38 + 3 * csiz or len(data) < 4 + length or csiz == 0:
        raise HeaderError("the JPEG 2000 SIZ segment is inconsistent or truncated")
    if xsiz <= xosiz or ysiz <= yosiz or xtsiz == 0 or ytsiz == 0 or xtosiz > xosiz or ytosiz > yosiz:
        raise HeaderError("the JPEG 2000 SIZ segment has an invalid image or tile size")
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    if tiles > MAX_J2K_TILES:
        raise HeaderError(f"the JPEG 2000 image has {tiles} tiles (at most {MAX_J2K_TILES})")
    components = data[42 : 42 + 3 * csiz]
    if any(components[i + 1] == 0 or components[i + 2] == 0 for i in range(0, len(components), 3)):
        raise HeaderError("the JPEG 2000 SIZ segment has a zero component subsampling")
    bits = max((components[i] & 0x7F) + 1 for i in range(0, len(components), 3))
    return FrameHeader(xsiz - xosiz, ysiz - yosiz, csiz, bits, "JPEG 2000")


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of the first contiguous-codestream box ('jp2c') of a JP2 file."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = _u32(data, pos), data[pos + 4 : pos + 8]
        header = 8
        if size == 1:  # a 64-bit size follows the type
            if pos + 16 > len(data):
                break
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - pos
        if size < header:
            break
        if kind == b"jp2c":
            return data[pos + header : pos + size]
        pos += size
    raise HeaderError("the JP2 file has no codestream box")


def _u16(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 2], "big")


def _u32(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 4], "big")
