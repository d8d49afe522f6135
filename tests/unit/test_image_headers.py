"""Image sizes read from each container's header before decoding (app/core/image_headers.py),
and decode refusing bombs and lying headers in every container and codec before allocating pixels."""

from __future__ import annotations

import resource
import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from app.core.decode import decode
from app.core.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from app.core.image_headers import (
    MAX_J2K_TILES,
    MAX_JPEG_SCANS,
    HeaderError,
    j2k_header,
    jpeg_header,
    png_header,
    png_pixel_chunks,
)
from tests.hostile_inputs import (
    BOMB_SIDE,
    DICOM_CODECS,
    apng_with_frame_outside,
    deflated_dicom_bomb,
    dicom_frame_bomb,
    dicom_sample,
    dicom_with,
    jpeg_bomb,
    jpeg_scan_bomb,
    jpeg_with_second_frame,
    png_bomb,
    png_chunk,
    png_chunk_length_bomb,
    png_text_bomb,
    rewrite_j2k_size,
    rewrite_jpeg_size,
    small_jpeg,
)


def frame_of(name: str) -> bytes:
    import io

    import pydicom
    from pydicom.encaps import get_frame

    ds = pydicom.dcmread(io.BytesIO(dicom_sample(name)))
    return get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the parsers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,channels,bits,components", [(np.uint8, 1, 8, 1), (np.uint16, 3, 16, 3),
                                                            (np.uint8, 4, 8, 4)])
def test_png_header_reads_ihdr(dtype, channels, bits, components):
    img = np.zeros((30, 40, channels) if channels > 1 else (30, 40), dtype)
    header = png_header(cv2.imencode(".png", img)[1].tobytes())
    assert (header.width, header.height, header.bits, header.components, header.codec) == (40, 30, bits, components,
                                                                                             "PNG")


def test_png_header_refuses_ihdr_that_is_not_first_or_malformed():
    data = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    with pytest.raises(HeaderError, match="IHDR"):
        png_header(data[:8] + data[33:])  # IHDR removed: the next chunk comes first
    with pytest.raises(HeaderError, match="IHDR"):
        png_header(data[:8] + struct.pack(">I", 12) + data[12:])  # IHDR length is always 13
    zero_width = bytearray(data)
    zero_width[16:20] = bytes(4)
    with pytest.raises(HeaderError, match="invalid size"):
        png_header(bytes(zero_width))
    with pytest.raises(HeaderError):
        png_header(data[:20])


def test_png_header_refuses_a_chunk_longer_than_the_file():
    with pytest.raises(HeaderError, match="claims more bytes"):
        png_header(png_chunk_length_bomb())
    data = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    assert png_header(data).width == 8  # every chunk of a whole file fits
    with pytest.raises(HeaderError, match="claims more bytes"):
        png_header(data[:-20])  # truncated: the last chunks are cut


def test_png_header_refuses_an_animated_frame_outside_the_canvas():
    with pytest.raises(HeaderError, match="animated PNG frame"):
        png_header(apng_with_frame_outside())


def _chunk_kinds(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos + 12 <= len(data):
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + struct.unpack_from(">I", data, pos)[0]
    return kinds


def test_png_pixel_chunks_keeps_what_makes_the_pixels_and_drops_compressed_metadata():
    plain = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    assert png_pixel_chunks(plain) is plain  # nothing to drop: no copy
    text = png_chunk(b"tEXt", b"Comment\x00hello")
    trns = png_chunk(b"tRNS", b"\x00\x07")
    unknown_critical = png_chunk(b"ZZZZ", b"x")
    data = plain[:33] + text + trns + unknown_critical + plain[33:] + b"trailing bytes"
    assert _chunk_kinds(png_pixel_chunks(data)) == [b"IHDR", b"tRNS", b"ZZZZ", b"IDAT", b"IEND"]
    for kind in (b"zTXt", b"iTXt", b"iCCP"):
        assert _chunk_kinds(png_pixel_chunks(png_text_bomb(3, kind, inflated=1000))) == [b"IHDR", b"IDAT", b"IEND"]


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt", b"iCCP"])
def test_decode_never_inflates_png_text_or_icc_chunks(kind):
    """200 chunks of 7 MB of zeros each (issue 21: libpng inflated them all, 9.9 s and +1.5 GiB)."""
    data = png_text_bomb(200 if kind != b"iCCP" else 1, kind)
    before, started = peak_rss_mb(), time.perf_counter()
    decoded = decode(data)
    assert time.perf_counter() - started < 0.5
    assert peak_rss_mb() - before < 50
    assert decoded.pixels.shape == (64, 64)


def test_decode_palette_png_with_transparency_keeps_its_pixels():
    palette = png_chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255, 10, 200, 30]))
    trns = png_chunk(b"tRNS", b"\xff\x80")
    rows = b"".join(b"\x00" + bytes([(x + y) % 3 for x in range(8)]) for y in range(8))
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 3, 0, 0, 0))
    data = (b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"tEXt", b"a\x00b") + palette + trns
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert expected.shape == (8, 8, 4)  # tRNS made an alpha channel
    stripped = cv2.imdecode(np.frombuffer(png_pixel_chunks(data), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(stripped, expected)


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_header_reads_frame_of_baseline_and_progressive(progressive):
    header = jpeg_header(small_jpeg((30, 40, 3), progressive=progressive))
    assert (header.width, header.height, header.components, header.bits, header.codec) == (40, 30, 3, 8, "JPEG")


@pytest.mark.parametrize("fill_bytes", [1, 2, 7])
def test_jpeg_header_skips_fill_bytes_before_markers(fill_bytes):
    data = small_jpeg((30, 40))
    sof = data.index(b"\xff\xc0")
    filled = data[:2] + b"\xff" * fill_bytes + data[2:sof] + b"\xff" * fill_bytes + data[sof:]
    assert (jpeg_header(filled).width, jpeg_header(filled).height) == (40, 30)
    assert (jpeg_header(jpeg_bomb(fill_bytes)).width, jpeg_header(jpeg_bomb(fill_bytes)).height) == (BOMB_SIDE,
                                                                                                     BOMB_SIDE)


def test_jpeg_header_finds_a_frame_after_large_and_many_segments():
    data = small_jpeg((30, 40))
    app_segments = b"".join(b"\xff\xe1" + struct.pack(">H", 65535) + bytes(65533) for _ in range(20))
    comment_with_fake_sof = b"\xff\xfe" + struct.pack(">H", 11) + b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff"
    header = jpeg_header(data[:2] + app_segments + comment_with_fake_sof + data[2:])
    assert (header.width, header.height) == (40, 30)  # a SOF-looking run inside a segment is not a frame


def test_jpeg_header_takes_the_largest_of_several_frame_headers():
    header = jpeg_header(jpeg_with_second_frame())
    assert (header.width, header.height) == (BOMB_SIDE, BOMB_SIDE)


def test_jpeg_header_reads_jpeg_ls_sof55_and_lossless_sof3():
    ls = jpeg_header(frame_of("MR_small_jpeg_ls_lossless.dcm"))
    assert (ls.width, ls.height, ls.components, ls.bits, ls.codec) == (64, 64, 1, 16, "JPEG-LS")
    lossless = jpeg_header(frame_of("JPEG-LL.dcm"))
    assert (lossless.width, lossless.height, lossless.codec) == (256, 1024, "JPEG")


def test_jpeg_header_takes_the_height_from_dnl_when_the_frame_says_zero():
    data = rewrite_jpeg_size(small_jpeg((16, 16)), 16, 0)
    eoi = data.rindex(b"\xff\xd9")
    with_dnl = data[:eoi] + b"\xff\xdc\x00\x04" + struct.pack(">H", 9000) + data[eoi:]
    assert jpeg_header(with_dnl).height == 9000
    with pytest.raises(HeaderError, match="zero size"):
        jpeg_header(data)


def test_jpeg_header_refuses_scan_bombs_truncation_and_missing_frames():
    assert jpeg_header(jpeg_scan_bomb(MAX_JPEG_SCANS)).width == 16
    with pytest.raises(HeaderError, match="scans"):
        jpeg_header(jpeg_scan_bomb(MAX_JPEG_SCANS + 1))
    data = small_jpeg()
    sof = data.index(b"\xff\xc0")
    with pytest.raises(HeaderError, match="length"):
        jpeg_header(data[: sof + 6])  # truncated inside the frame header
    with pytest.raises(HeaderError, match="no frame header"):
        jpeg_header(b"\xff\xd8\xff\xd9")


@pytest.mark.parametrize("name,size,components", [("MR_small_jp2klossless.dcm", (64, 64), 1),
                                                  ("US1_J2KI.dcm", (640, 480), 3)])
def test_j2k_header_reads_siz(name, size, components):
    header = j2k_header(frame_of(name))
    assert ((header.width, header.height), header.components, header.codec) == (size, components, "JPEG 2000")


def test_j2k_header_reads_the_codestream_of_a_jp2_file():
    codestream = frame_of("MR_small_jp2klossless.dcm")
    signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    ftyp = struct.pack(">I", 20) + b"ftypjp2 " + bytes(4) + b"jp2 "
    jp2 = signature + ftyp + struct.pack(">I", 8 + len(codestream)) + b"jp2c" + codestream
    assert (j2k_header(jp2).width, j2k_header(jp2).height) == (64, 64)
    with pytest.raises(HeaderError, match="codestream box"):
        j2k_header(signature + ftyp)


def test_j2k_header_refuses_truncated_inconsistent_and_tile_bomb_siz():
    codestream = frame_of("MR_small_jp2klossless.dcm")
    with pytest.raises(HeaderError, match="truncated"):
        j2k_header(codestream[:30])
    bad_length = bytearray(codestream)
    bad_length[4:6] = struct.pack(">H", 44)  # 38 + 3 per component: 41
    with pytest.raises(HeaderError, match="inconsistent"):
        j2k_header(bytes(bad_length))
    tiny_tiles = bytearray(rewrite_j2k_size(codestream, 4096, 4096))
    tiny_tiles[24:32] = struct.pack(">II", 8, 8)  # XTsiz, YTsiz: 512 x 512 tiles
    with pytest.raises(HeaderError, match=f"at most {MAX_J2K_TILES}"):
        j2k_header(bytes(tiny_tiles))
    with pytest.raises(HeaderError):
        j2k_header(b"\xff\x4f\xff\x90" + bytes(60))  # SOC without SIZ


# --- decode refuses bombs before decoding -----------------------------------------------------------

BOMBS = {
    "png": (png_bomb, PayloadTooLarge),
    "jpeg": (lambda: jpeg_bomb(0), PayloadTooLarge),
    "jpeg after a fill byte": (lambda: jpeg_bomb(1), PayloadTooLarge),
    "jpeg second frame header": (jpeg_with_second_frame, PayloadTooLarge),
    "jpeg scans": (jpeg_scan_bomb, InvalidImage),
    "apng frame": (apng_with_frame_outside, InvalidImage),
    "png chunk length": (png_chunk_length_bomb, InvalidImage),
    "deflated dicom": (deflated_dicom_bomb, PayloadTooLarge),
    **{f"dicom {codec}": (lambda codec=codec: dicom_frame_bomb(codec), InvalidImage) for codec in DICOM_CODECS},
}


@pytest.mark.parametrize("name", BOMBS)
def test_decode_refuses_bomb_fast_without_allocating_it(name):
    make, error = BOMBS[name]
    data = make()
    before, started = peak_rss_mb(), time.perf_counter()
    with pytest.raises(error):
        decode(data)
    assert time.perf_counter() - started < 2.0
    assert peak_rss_mb() - before < 100  # the decoded bomb would be gigabytes


@pytest.mark.parametrize("codec", DICOM_CODECS)
def test_decode_dicom_frame_that_contradicts_rows_and_columns_is_400(codec):
    small = dicom_frame_bomb(codec, width=32, height=16)  # smaller than Rows/Columns: a lie all the same
    with pytest.raises(InvalidImage, match="Rows / Columns say"):
        decode(small)


def test_decode_dicom_frame_with_other_samples_than_the_dataset_is_400():
    with pytest.raises(InvalidImage, match="Samples per Pixel says 3"):
        decode(dicom_with("MR_small_jp2klossless.dcm", SamplesPerPixel=3, PhotometricInterpretation="RGB"))


def test_decode_dicom_frame_over_the_pixel_limit_is_413_even_when_rows_and_columns_agree():
    data = dicom_with("MR_small_jp2klossless.dcm", Rows=BOMB_SIDE, Columns=BOMB_SIDE)
    with pytest.raises(PayloadTooLarge):
        decode(data)


def test_decode_dicom_checks_the_frame_it_decodes_in_a_multiframe_file():
    good = decode(dicom_sample("emri_small_jpeg_ls_lossless.dcm"))
    assert good.pixels.shape == (64, 64) and any("multi-frame" in w for w in good.warnings)


def test_decode_deflated_dicom_within_the_limit_still_decodes():
    assert decode(dicom_sample("image_dfl.dcm")).pixels.shape == (512, 512)


def test_decode_compressed_syntax_without_a_header_reader_is_415(monkeypatch):
    import app.core.decode as decode_module

    monkeypatch.setattr(decode_module, "_frame_header_readers", dict)
    with pytest.raises(UnsupportedMediaType, match="cannot be checked"):
        decode(dicom_sample("MR_small_jp2klossless.dcm"))
    assert decode(dicom_sample("MR_small_RLE.dcm")).pixels.shape == (64, 64)  # RLE fills Rows x Columns exactly


def test_decode_colour_image_peaks_near_its_own_size():
    """Luma is built channel by channel: a 4096² RGB decode no longer holds a float copy of all 3 channels."""
    img = np.random.default_rng(0).integers(0, 256, (4096, 4096, 3), dtype=np.uint8)
    data = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
    del img
    import tracemalloc

    tracemalloc.start()
    out = decode(data)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert out.pixels.shape == (4096, 4096) and out.pixels.dtype == np.float32
    assert peak < 3 * 64 + 8  # decoded RGB (48 MiB) + luma and one temporary (64 MiB each); was ~400
