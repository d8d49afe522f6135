"""Shared by the DICOM result tests: dciodvfy (Debian dicom3tools), a sentinel patient, test slices,
the SOP class constants and ``wait_for`` for the Orthanc round trips."""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

MR, SR, SC = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"  # SOP classes
SENTINEL_NAME = "SENTINEL^PATIENTNAME"
SENTINEL_ID = "SENTINEL-ID-4711"
# Headers that make a slice one the model is validated for (axial, T1 post-contrast): MR2_UNCR.dcm is
# an oblique T1 pre-contrast slice, which the intended-use gate does not assess.
AXIAL_T1_POST = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ContrastBolusAgent": "gadolinium"}


def dciodvfy_errors(data: bytes) -> list[str]:
    """The ``Error`` lines dciodvfy prints for a Part 10 file (warnings are allowed)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; scripts/test.sh installs it)")
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        out = subprocess.run([tool, f.name], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def mr_slice(name: str = "MR_small.dcm", *, study_uid: str | None = None, series_uid: str | None = None,
             sop_uid: str | None = None, number: int | None = None, headers: dict | None = None) -> bytes:
    """A real MR slice from pydicom's test data, given the sentinel patient (and new UIDs, or other
    ``headers`` by keyword, when asked)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in (headers or {}).items():
        setattr(ds, keyword, value)
    ds.PatientName, ds.PatientID = SENTINEL_NAME, SENTINEL_ID
    for keyword, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                           ("SOPInstanceUID", sop_uid)):
        if value:
            setattr(ds, keyword, value)
    if sop_uid:
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if number is not None:
        ds.InstanceNumber = number
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def sr_texts(ds: pydicom.Dataset) -> str:
    """Every TEXT content item of a structured report, nested ones included, joined by spaces."""
    stack, texts = list(ds.get("ContentSequence", [])), []
    while stack:
        item = stack.pop()
        if item.get("ValueType") == "TEXT":
            texts.append(str(item.TextValue))
        stack.extend(item.get("ContentSequence", []))
    return " ".join(texts)


def assert_no_sentinel(*texts: str) -> None:
    for text in texts:
        assert SENTINEL_NAME not in text and "SENTINEL" not in text.upper(), "patient data in a log"


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(condition, timeout_s: float, what: str, logs=lambda: ""):
    """Poll ``condition`` twice a second until it is truthy (returned) or ``timeout_s`` ends (fails with ``logs()``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")
