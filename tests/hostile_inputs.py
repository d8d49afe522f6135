"""Hostile inputs, made in code: decompression bombs in every container and codec, lying headers,
fill bytes, truncated codestreams. Shared by the unit tests, the fuzzing and the server attacks.

Each bomb is small on the wire and huge once decoded: a real one (a PNG whose zlib stream holds
``width x height`` zero pixels), or a real file whose frame header was rewritten to a huge size
(libjpeg and OpenJPEG allocate what the header says before they find the data missing).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

BOMB_SIDE = 20000  # 400 M pixels: about 2 GB once decoded to float, as in issue 12


def dicom_sample(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name)).read_bytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.cache
def png_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A valid 8-bit gray PNG of zeros: ~0.1% of its decoded size."""
    deflate = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte + pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def apng_with_frame_outside(width: int = 32, height: int = 32) -> bytes:
    """An animated PNG whose first frame control claims a frame larger than the IHDR canvas."""
    pixels = zlib.compress(bytes((1 + width) * height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    fctl = struct.pack(">IIIIIHHBB", 0, BOMB_SIDE, BOMB_SIDE, 0, 0, 1, 10, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"acTL", struct.pack(">II", 1, 0))
            + png_chunk(b"fcTL", fctl) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b""))


def png_chunk_length_bomb(claimed: int = 0x7FFFFFFF) -> bytes:
    """A small valid PNG whose IDAT chunk claims ``claimed`` bytes: OpenCV allocated (and zeroed)
    that much before finding the data missing (found by the fuzzing: 2 GiB for a 100-byte file)."""
    img = np.random.default_rng(1).integers(0, 65535, (12, 10, 3), dtype=np.uint16)
    data = bytearray(cv2.imencode(".png", img)[1].tobytes())
    at = data.index(b"IDAT") - 4
    data[at : at + 4] = struct.pack(">I", claimed)
    return bytes(data)


def png_text_bomb(chunks: int = 200, kind: bytes = b"zTXt", inflated: int = 7_000_000,
                  side: int = 64) -> bytes:
    """A small valid gray PNG with ``chunks`` compressed ancillary chunks (zTXt, iTXt or iCCP), each
    a zlib stream of ``inflated`` zeros (just under libpng's 8 MB per-chunk cap), about 1/1000 of
    that on the wire: libpng inflated every one inside ``cv2.imdecode`` (issue 21: 200 OK after
    9.9 s, +1.5 GiB)."""
    image = cv2.imencode(".png", np.zeros((side, side), np.uint8))[1].tobytes()
    stream = zlib.compress(bytes(inflated), 9)
    prefix = {b"zTXt": b"Comment\x00\x00", b"iTXt": b"Comment\x00\x01\x00\x00\x00", b"iCCP": b"icc\x00\x00"}[kind]
    chunk = png_chunk(kind, prefix + stream)
    return image[:33] + chunk * chunks + image[33:]  # after IHDR, before the image data


def small_jpeg(shape: tuple[int, ...] = (16, 16), progressive: bool = False) -> bytes:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else []
    return cv2.imencode(".jpg", img, params)[1].tobytes()


def rewrite_jpeg_size(data: bytes, width: int, height: int, marker: int = 0xC0) -> bytes:
    """``data`` with the first frame header of kind ``marker`` (SOF0, SOF2, SOF55...) saying ``width x height``."""
    pos = data.index(bytes([0xFF, marker]))
    out = bytearray(data)
    out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def jpeg_bomb(fill_bytes: int = 0, width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A baseline JPEG whose SOF says ``width x height``; ``fill_bytes`` legal 0xFF fill bytes
    before the first marker after SOI (one used to defeat the old size parser)."""
    data = rewrite_jpeg_size(small_jpeg(), width, height)
    return data[:2] + b"\xff" * fill_bytes + data[2:]


def jpeg_with_second_frame(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A small, honest frame header followed by a second one that says ``width x height``."""
    data = small_jpeg()
    pos = data.index(b"\xff\xc0")
    length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    sof = bytearray(data[pos : pos + 2 + length])
    sof[5:9] = struct.pack(">HH", height, width)
    sos = data.index(b"\xff\xda")
    return data[:sos] + bytes(sof) + data[sos:]


def jpeg_scan_bomb(scans: int = 501) -> bytes:
    """A JPEG with ``scans`` scans (each a full pass over the image when decoded)."""
    data = small_jpeg()
    sos, eoi = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:sos] + data[sos:eoi] * scans + data[eoi:]


def rewrite_j2k_size(codestream: bytes, width: int, height: int) -> bytes:
    """A JPEG 2000 codestream whose SIZ says ``width x height`` (one tile of that size)."""
    pos = codestream.index(b"\xff\x4f\xff\x51") + 2  # the SIZ marker
    out = bytearray(codestream)
    out[pos + 6 : pos + 22] = struct.pack(">IIII", width, height, 0, 0)  # Xsiz, Ysiz, XOsiz, YOsiz
    out[pos + 22 : pos + 38] = struct.pack(">IIII", width, height, 0, 0)  # XTsiz, YTsiz, XTOsiz, YTOsiz
    return bytes(out)


# DICOM test files whose encapsulated frame is rewritten; Rows / Columns keep saying the real size.
DICOM_CODECS = {
    "JPEG 2000": ("MR_small_jp2klossless.dcm", None),
    "JPEG baseline": ("SC_rgb_jpeg.dcm", 0xC0),
    "JPEG lossless": ("JPEG-LL.dcm", 0xC3),
    "JPEG-LS": ("MR_small_jpeg_ls_lossless.dcm", 0xF7),
}


def dicom_frame_bomb(codec: str, width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A real compressed DICOM whose frame header says ``width x height`` while Rows / Columns do not
    (the lengths of every element are unchanged, so the file stays well formed)."""
    name, marker = DICOM_CODECS[codec]
    data = dicom_sample(name)
    if marker is None:
        pos = data.index(b"\xff\x4f\xff\x51")
        return data[:pos] + rewrite_j2k_size(data[pos:], width, height)
    pixel_data = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010): rewrite the frame, not an icon before it
    return data[:pixel_data] + rewrite_jpeg_size(data[pixel_data:], width, height, marker)


def dicom_with(name: str, **tags) -> bytes:
    """A pydicom test file with some data elements changed, written back as Part 10 bytes."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_sample(name)))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflated_dicom_bomb(inflated_bytes: int = 1 << 30) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose dataset inflates to ``inflated_bytes``
    (one OB element of zeros), about 1/1000 of that on the wire."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(dicom_sample("MR_small.dcm")))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]  # (0002,0000) group length
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    body = [deflate.compress(b"\x11\x00\x10\x10OB\x00\x00" + struct.pack("<I", inflated_bytes))]
    body += [deflate.compress(chunk) for _ in range(inflated_bytes // len(chunk))]
    return data[:meta_end] + b"".join(body) + deflate.flush()


@functools.cache
def large_jpeg2000_dicom(side: int = 3072) -> bytes:
    """A legal, large lossless JPEG 2000 MR DICOM (16-bit, ~7 MB): OpenJPEG holds the GIL for about
    1.5 s decoding it, which stalls every thread of the process doing it."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(io.BytesIO(dicom_sample("MR_small.dcm")))
    y, x = np.mgrid[:side, :side]
    pixels = ((np.sin(x / 37.0) + np.cos(y / 53.0)) * 1000 + 2500).astype(np.uint16)
    pixels += np.random.default_rng(0).integers(0, 64, pixels.shape, dtype=np.uint16)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@functools.cache
def large_colour_png(side: int = 4096) -> bytes:
    """A legal 4096x4096 RGB PNG of about 1.4 MB: 48 MiB once decoded, ~270 MiB through preprocessing."""
    img = np.zeros((side, side, 3), np.uint8)
    img[::7, ::5] = 255
    img[:, :, 1] //= 2
    return cv2.imencode(".png", img)[1].tobytes()


def _mr_small_with(elements: bytes) -> bytes:
    """MR_small.dcm (explicit VR little endian) with ``elements`` encoded first in its dataset."""
    data = dicom_sample("MR_small.dcm")
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]  # (0002,0000) group length
    return data[:meta_end] + elements + data[meta_end:]


def _empty_private_elements(count: int) -> bytes:
    """``count`` distinct empty LO elements in odd (private) groups from 0x0009 on, 8 bytes each."""
    per_group = 0x10000 - 0x1000
    return b"".join(struct.pack("<HH2sH", 0x0009 + 2 * (i // per_group), 0x1000 + i % per_group, b"LO", 0)
                    for i in range(count))


@functools.cache
def dicom_element_bomb(elements: int = 3_900_000) -> bytes:
    """A real MR slice with ``elements`` empty data elements before its own (31 MB for 3.9 million):
    pydicom keeps a Python object of a few hundred bytes for each 8 bytes sent (issue 21)."""
    return _mr_small_with(_empty_private_elements(elements))


def dicom_nested_element_bomb(elements: int = 1_000_000, *, defined_length: bool = True) -> bytes:
    """The elements inside one item of Other Patient IDs Sequence (0010,1002), which the DICOM results
    copy: with a defined length pydicom reads them only when the sequence is first used."""
    item = _empty_private_elements(elements)
    if defined_length:
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
        return _mr_small_with(struct.pack("<HH2sHI", 0x0010, 0x1002, b"SQ", 0, len(item)) + item)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return _mr_small_with(struct.pack("<HH2sHI", 0x0010, 0x1002, b"SQ", 0, 0xFFFFFFFF) + item
                          + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def dicom_multivalue_bomb(values: int = 4_000_000) -> bytes:
    """A real MR slice whose Window Center (DS) holds ``values`` values "1": 2 bytes each on the
    wire, a Python object of ~200 bytes each once pydicom converts it."""
    value = b"1\\" * (values - 1) + b"1" + b" " * (values % 2 == 0)
    data = dicom_sample("MR_small.dcm")
    at = data.index(b"\x28\x00\x50\x10")  # (0028,1050) Window Center, if any: replace it
    length = struct.unpack("<H", data[at + 6 : at + 8])[0]
    element = struct.pack("<HH2sH", 0x0028, 0x1050, b"UN", 0) + struct.pack("<I", len(value)) + value
    return data[:at] + element + data[at + 8 + length :]
