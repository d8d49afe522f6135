"""decode: PNG/JPEG (8/16-bit, gray/RGB/RGBA) through OpenCV, DICOM through pydicom (LUTs, window,
MONOCHROME1, multi-frame, compressed syntaxes), and the typed errors for bad input."""

import io
import logging
import zlib

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.core.decode import DEFAULT_MAX_PIXELS, DICOM, JPEG, PNG, decode, normalise_media_type, sniff
from app.core.errors import InvalidImage, NoPixelData, PayloadTooLarge, UnsupportedMediaType
from app.settings import Settings


def encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_file(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def read_testdata_bytes(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (40, 50), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (40, 50), dtype=np.uint16)


# --- PNG / JPEG -------------------------------------------------------------------------------------

def test_decode_png_gray8_keeps_values():
    out = decode(encode(".png", GRAY8), PNG)
    assert out.media_type == PNG and out.pixels.dtype == np.float32
    assert np.array_equal(out.pixels, GRAY8.astype(np.float32)) and out.warnings == []


def test_decode_png_gray16_keeps_full_range():
    out = decode(encode(".png", GRAY16))
    assert np.array_equal(out.pixels, GRAY16.astype(np.float32))
    assert out.pixels.max() > 255


def test_decode_png_rgb_with_gray_content_has_no_warning():
    out = decode(encode(".png", np.dstack([GRAY8] * 3)))
    assert np.allclose(out.pixels, GRAY8, atol=0.01) and out.warnings == []


def test_decode_png_rgb16_colour_content_warns():
    colour = np.dstack([GRAY16, np.zeros_like(GRAY16), 65535 - GRAY16])
    out = decode(encode(".png", colour))
    assert out.pixels.shape == GRAY16.shape and out.pixels.max() > 255
    assert any("colour" in w for w in out.warnings)


def test_decode_png_rgba_drops_alpha():
    alpha = np.full_like(GRAY8, 17)
    out = decode(encode(".png", np.dstack([GRAY8, GRAY8, GRAY8, alpha])))
    assert np.allclose(out.pixels, GRAY8, atol=0.01)


def animated_png(frames: list[np.ndarray]) -> bytes:
    """An APNG (8-bit gray frames), written chunk by chunk: the first frame is the default image."""
    import struct

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    def pixels(frame: np.ndarray) -> bytes:
        return zlib.compress(b"".join(b"\x00" + row.tobytes() for row in frame))

    height, width = frames[0].shape
    frame_control = lambda seq: struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, 1, 10, 0, 0)
    out = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
           chunk(b"acTL", struct.pack(">II", len(frames), 0)), chunk(b"fcTL", frame_control(0)),
           chunk(b"IDAT", pixels(frames[0]))]
    for i, frame in enumerate(frames[1:]):
        seq = 1 + 2 * i
        out += [chunk(b"fcTL", frame_control(seq)), chunk(b"fdAT", struct.pack(">I", seq + 1) + pixels(frame))]
    return b"".join(out + [chunk(b"IEND", b"")])


def test_decode_animated_png_uses_first_frame_and_warns():
    frames = [GRAY8, 255 - GRAY8, GRAY8 // 2]
    out = decode(animated_png(frames), PNG)
    assert np.array_equal(out.pixels, GRAY8.astype(np.float32))
    assert any("3 frames" in w for w in out.warnings)
    assert decode(encode(".png", GRAY8)).warnings == []  # a still PNG does not warn


def test_decode_jpeg_gray_and_rgb():
    smooth = cv2.GaussianBlur(GRAY8, (9, 9), 3)
    gray = decode(encode(".jpg", smooth), "image/jpeg")
    rgb = decode(encode(".jpg", np.dstack([smooth] * 3)), "image/jpg")
    assert gray.media_type == rgb.media_type == JPEG
    assert np.abs(gray.pixels - smooth).mean() < 3 and np.abs(rgb.pixels - smooth).mean() < 3


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_decode_refuses_decompression_bomb_before_decoding(ext):
    bomb = encode(ext, np.zeros((3000, 2000), np.uint8))  # compresses to a few kB
    with pytest.raises(PayloadTooLarge, match="2000x3000"):
        decode(bomb, max_pixels=1_000_000)


def test_default_pixel_limit_admits_4096_square_and_refuses_larger():
    """The default keeps a colour image's decode peak (~0.4 GiB) inside the CPU pod's memory limit."""
    assert Settings().max_pixels == DEFAULT_MAX_PIXELS
    assert decode(encode(".png", np.zeros((4096, 4096), np.uint8))).pixels.shape == (4096, 4096)
    with pytest.raises(PayloadTooLarge, match="4097x4096"):
        decode(encode(".png", np.zeros((4096, 4097), np.uint8)))


def test_decode_signature_mismatch_is_415():
    with pytest.raises(UnsupportedMediaType, match="declared image/jpeg but the bytes are image/png"):
        decode(encode(".png", GRAY8), "image/jpeg")


@pytest.mark.parametrize("declared", ["text/plain", "image/gif", "application/json"])
def test_decode_unsupported_declared_type_is_415(declared):
    with pytest.raises(UnsupportedMediaType, match="not supported"):
        decode(encode(".png", GRAY8), declared)


def test_decode_unknown_bytes_is_415():
    with pytest.raises(UnsupportedMediaType):
        decode(b"GIF89a" + bytes(100))


def test_decode_empty_is_400():
    with pytest.raises(InvalidImage, match="empty"):
        decode(b"", "image/png")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_decode_truncated_raster_is_400(ext):
    with pytest.raises(InvalidImage):
        decode(encode(ext, GRAY8)[:40])


def test_normalise_media_type_handles_parameters_and_generic_types():
    assert normalise_media_type("Image/PNG; charset=binary") == PNG
    assert normalise_media_type("application/octet-stream") is None
    assert normalise_media_type(None) is None
    assert normalise_media_type("image/pjpeg") == JPEG


def test_sniff_recognises_dicom_preamble():
    assert sniff(read_testdata_bytes("MR_small.dcm")) == DICOM


# --- DICOM ------------------------------------------------------------------------------------------

def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, written out independently, mapped to [0, 1]."""
    v = values.astype(np.float64)
    out = np.where(v <= center - 0.5 - (width - 1) / 2, 0.0,
                   np.where(v > center - 0.5 + (width - 1) / 2, 1.0, ((v - (center - 0.5)) / (width - 1) + 0.5)))
    return out


def test_decode_dicom_mr_applies_window_into_unit_range():
    ds = dicom_file("MR_small.dcm")
    out = decode(read_testdata_bytes("MR_small.dcm"), "application/dicom")
    expected = linear_window(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth))
    assert out.media_type == DICOM and out.pixels.shape == (64, 64)
    assert 0.0 <= out.pixels.min() and out.pixels.max() <= 1.0
    assert np.allclose(out.pixels, expected, atol=1e-5)
    assert out.warnings == []


def test_decode_dicom_applies_rescale_in_float_without_window():
    ds = dicom_file("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100.25
    out = decode(dicom_bytes(ds))
    assert np.allclose(out.pixels, ds.pixel_array * 0.5 - 100.25)  # fractions survive: float, no early cast


def test_decode_dicom_applies_voi_lut_sequence():
    ds = dicom_file("vlut_04.dcm")
    from pydicom.pixels import apply_voi

    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    expected = apply_voi(ds.pixel_array, ds).astype(np.float32) / (2**bits - 1)
    out = decode(read_testdata_bytes("vlut_04.dcm"))
    assert np.allclose(out.pixels, expected) and out.pixels.max() <= 1.0


def test_decode_dicom_inverts_monochrome1():
    ds = dicom_file("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    raw = ds.pixel_array.astype(np.float32)
    ds.PhotometricInterpretation = "MONOCHROME1"
    out = decode(dicom_bytes(ds))
    assert np.allclose(out.pixels, raw.max() + raw.min() - raw)
    # the brightest stored value becomes the darkest displayed one
    assert out.pixels.flat[np.argmax(raw)] == out.pixels.min()


def test_decode_dicom_real_monochrome1_file():
    out = decode(read_testdata_bytes("RG1_UNCI.dcm"))
    assert out.pixels.ndim == 2 and out.pixels.max() > out.pixels.min()
    assert out.modality not in ("MR", "")  # the pipeline makes that "not assessed" (ood_reasons "modality")


def test_decode_dicom_multiframe_uses_middle_frame():
    ds = dicom_file("emri_small.dcm")
    frames = int(ds.NumberOfFrames)
    out = decode(read_testdata_bytes("emri_small.dcm"))
    assert np.array_equal(out.pixels, ds.pixel_array[frames // 2].astype(np.float32))
    assert any("multi-frame" in w and "middle frame" in w for w in out.warnings)


def test_decode_dicom_multiframe_first_policy_uses_first_frame():
    ds = dicom_file("emri_small.dcm")
    out = decode(read_testdata_bytes("emri_small.dcm"), multiframe="first")
    assert np.array_equal(out.pixels, ds.pixel_array[0].astype(np.float32))
    assert any("multi-frame" in w and "first frame (1)" in w for w in out.warnings)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_implicit.dcm"])
def test_decode_dicom_transfer_syntaxes_give_the_same_slice(name):
    reference = decode(read_testdata_bytes("MR_small.dcm")).pixels
    assert np.allclose(decode(read_testdata_bytes(name)).pixels, reference, atol=1e-6)


def test_decode_dicom_jpeg2000_lossy_from_pydicom_data():
    out = decode(read_testdata_bytes("MR2_J2KI.dcm"))
    assert out.pixels.shape == (1024, 1024) and np.isfinite(out.pixels).all()


def test_decode_dicom_without_codec_names_the_transfer_syntax(monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if pylibjpeg-openjpeg and gdcm were absent
    with pytest.raises(UnsupportedMediaType, match="JPEG 2000 Image Compression \\(Lossless Only\\)"):
        decode(read_testdata_bytes("MR_small_jp2klossless.dcm"))


def test_decode_dicom_without_pixel_data_is_422():
    with pytest.raises(NoPixelData):
        decode(read_testdata_bytes("rtplan.dcm"))


def test_decode_dicom_truncated_pixel_data_is_400():
    with pytest.raises(InvalidImage):
        decode(read_testdata_bytes("MR_truncated.dcm"))


def test_decode_dicom_garbage_after_preamble_is_400():
    with pytest.raises(InvalidImage):
        decode(bytes(128) + b"DICM" + bytes(range(256)) * 4)


def test_decode_dicom_bomb_is_413_before_decoding():
    ds = dicom_file("MR_small.dcm")
    with pytest.raises(PayloadTooLarge):
        decode(dicom_bytes(ds), max_pixels=64 * 64 - 1)


def test_decode_dicom_never_reveals_tag_values(caplog):
    marker = "Secret^Patient^Marker"
    ds = dicom_file("CT_small.dcm")  # not MR: not assessed, with a warning
    ds.PatientName = marker
    ds.PatientID = marker
    ds.WindowCenter = "12345.6"
    # an invalid window value (pydicom warns and logs invalid values verbatim)
    data = dicom_bytes(ds).replace(b"12345.6", b"Xy-bad!")
    with caplog.at_level(logging.DEBUG):
        out = decode(data)
        with pytest.raises(InvalidImage) as bad:
            decode(data[:-300])
    text = " ".join(out.warnings) + str(bad.value.detail) + caplog.text
    assert any("window is invalid" in w for w in out.warnings)
    assert marker not in text and "Xy-bad!" not in text


def test_decode_corrupt_compressed_dicom_logs_nothing_from_the_decoders(caplog):
    # pydicom's module loggers (pydicom.pixels.decoders.base logs each failing plugin's exception,
    # whose text can quote tag values such as Rows) are silenced too, not only the "pydicom" logger.
    data = bytearray(read_testdata_bytes("SC_rgb_jpeg_gdcm.dcm"))
    start = len(data) // 2
    data[start:start + 64] = bytes(b ^ 0x5A for b in data[start:start + 64])
    with caplog.at_level(logging.DEBUG), pytest.raises(InvalidImage):
        decode(bytes(data))
    assert [r.name for r in caplog.records] == []


def test_decode_prefers_plugins_that_fail_cleanly_over_gdcm():
    from app.core.decode import _decoding_plugin

    assert _decoding_plugin(dicom_file("MR_small_jp2klossless.dcm")) == "pylibjpeg"
    assert _decoding_plugin(dicom_file("MR_small.dcm")) == ""  # uncompressed


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_jp2klossless.dcm", "emri_small.dcm", "MR_small_RLE.dcm",
                                  ".png", ".jpg"])
def test_decode_mutated_files_raise_only_typed_errors(name):
    """Fuzzing: corrupt bytes, truncations and overwritten runs give a 4xx error, never another
    exception (a 500) and never a crash (python-gdcm aborted the process on such JPEG 2000 data)."""
    from app.core.errors import ServiceError

    original = encode(name, GRAY8) if name.startswith(".") else read_testdata_bytes(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # the same cases every run
    for _ in range(120):
        data = bytearray(original)
        kind = rng.integers(0, 3)
        if kind == 0:
            for pos in rng.integers(132, len(data), rng.integers(1, 10)):
                data[pos] = rng.integers(0, 256)
        elif kind == 1:
            data = data[: rng.integers(132, len(data))]
        else:
            pos = rng.integers(132, len(data))
            data[pos:pos + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        try:
            decode(bytes(data))
        except ServiceError as error:
            assert 400 <= error.status < 500


_UNDER_ADDRESS_LIMIT = """
import resource, sys
import numpy as np
from app.core.errors import ServiceError
from app.core.decode import decode
data, spare = open(sys.argv[1], "rb").read(), int(sys.argv[2])
vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + spare, resource.RLIM_INFINITY))
try:
    decode(data)
    print("decoded")
except ServiceError as exc:
    print(type(exc).__name__)
"""


@pytest.mark.parametrize("spare_mib,corrupt,expected", [(4, False, "PayloadTooLarge"),
                                                        (1024, True, "InvalidImage"),
                                                        (1024, False, "decoded")])
def test_decode_failure_under_an_address_space_limit_is_too_large_not_invalid(tmp_path, spare_mib, corrupt, expected):
    # A host worker's codec that cannot allocate reports its own error (OpenJPEG: RuntimeError "failed
    # to decode image" with OpenCV 5.1's larger mappings beside it), not MemoryError: still a 413.
    # Corrupt data with room to spare stays a 400. Run in a child: the limit is for the whole process.
    import subprocess
    import sys

    ds = dicom_file("MR_small.dcm")
    side = 1024
    y, x = np.mgrid[:side, :side]
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.compress(pydicom.uid.JPEG2000Lossless, ((x * 7 + y * 3) % 4000).astype(np.uint16), encoding_plugin="pylibjpeg")
    data = dicom_bytes(ds)
    if corrupt:  # the start-of-data marker (SOD) turned into an unknown one: the decoder fails on it
        data = data.replace(b"\xff\x93", b"\xff\x94", 1)
    path = tmp_path / "j2k.dcm"
    path.write_bytes(data)
    # Everything the decode imports is loaded first, so the limit leaves `spare` for the decode itself.
    script = "import app.engine.pipeline, pydicom, pydicom.pixels, pylibjpeg, openjpeg\n" + _UNDER_ADDRESS_LIMIT
    out = subprocess.run([sys.executable, "-c", script, str(path), str(spare_mib * 2**20)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip() == expected, out.stdout + out.stderr[-2000:]
