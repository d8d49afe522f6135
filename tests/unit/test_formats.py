"""The format registry (app.core.formats): each format's signature, suffixes and aliases, read by
the decoder, the decode budget, the API document and /v1/model alike."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from app.core import formats
from app.core.decode import MEDIA_TYPES, media_type_for_path, normalise_media_type, sniff


def samples() -> dict[str, bytes]:
    img = np.zeros((20, 30), np.uint8)
    return {"image/png": cv2.imencode(".png", img)[1].tobytes(), "image/jpeg": cv2.imencode(".jpg", img)[1].tobytes(),
            "application/dicom": Path(get_testdata_file("MR_small.dcm")).read_bytes()}


@pytest.mark.parametrize("fmt", formats.FORMATS, ids=lambda f: f.name)
def test_each_format_is_recognised_by_its_signature_suffixes_and_aliases(fmt):
    data = samples()[fmt.media_type]
    assert formats.sniff(data) is fmt and sniff(data) == fmt.media_type
    assert sniff(data[:formats.SIGNATURE_BYTES]) == fmt.media_type  # the first bytes are enough
    for suffix in fmt.suffixes:
        assert media_type_for_path(Path("a" + suffix.upper())) == fmt.media_type
    for alias in fmt.aliases:
        assert normalise_media_type(alias) == fmt.media_type


def test_the_decoder_accepts_exactly_the_registered_formats():
    assert MEDIA_TYPES == tuple(f.media_type for f in formats.FORMATS)
    assert formats.sniff(b"GIF89a" + bytes(200)) is None


def test_cheap_size_readings_match_the_images():
    data = samples()
    assert formats.PNG.pixels(data["image/png"]) == 20 * 30
    assert formats.JPEG.pixels(data["image/jpeg"]) == 20 * 30
    assert formats.DICOM.pixels(data["application/dicom"]) == 64 * 64  # MR_small: 1 sample
