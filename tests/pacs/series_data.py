"""Series for the series-mode tests and bench: MR series with proper geometry (Image Position /
Orientation (Patient), Pixel Spacing, Slice Thickness) built from pydicom's test slice or from one
lgg-tcga-flair patient's slices."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from app.transports.pacs.results import result_uid
from tests.pacs.dicom_checks import SENTINEL_ID, SENTINEL_NAME

DATA = Path(os.environ.get("BTD_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
LGG = DATA / "lgg-tcga-flair"
LGG_PATIENT = "TCGA_CS_4943"  # a test-split patient with glioma and tumour-free slices
ORIENTATION = {"axial": [1, 0, 0, 0, 1, 0], "sagittal": [0, 1, 0, 0, 0, -1], "coronal": [1, 0, 0, 0, 0, -1]}
# Acquisition attributes that app.core.acquisition reads as each sequence.
FLAIR = {"ScanningSequence": "IR", "RepetitionTime": 9000, "EchoTime": 100, "InversionTime": 2500,
         "SeriesDescription": "AX FLAIR"}
T2 = {"ScanningSequence": "SE", "RepetitionTime": 4000, "EchoTime": 100, "SeriesDescription": "AX T2"}
T1_POST = {"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 15, "ContrastBolusAgent": "gadolinium",
           "SeriesDescription": "AX T1 POST"}


def _base(pixels: np.ndarray, plane: str, index: int, spacing: float, pixel_mm: float) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID = SENTINEL_NAME, SENTINEL_ID
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ImageOrientationPatient = ORIENTATION[plane]
    normal = np.cross(ORIENTATION[plane][:3], ORIENTATION[plane][3:])
    ds.ImagePositionPatient = [float(v) for v in np.array([-120.0, -120.0, -60.0]) + normal * index * spacing]
    ds.SliceLocation = index * spacing
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [pixel_mm, pixel_mm], spacing, spacing
    for keyword in ("ScanningSequence", "RepetitionTime", "EchoTime", "InversionTime", "SeriesDescription",
                    "ContrastBolusAgent"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def series(images: Sequence[np.ndarray], *, study_uid: str, name: str, plane: str = "axial",
           headers: dict | None = None, spacing: float = 5.0, pixel_mm: float = 0.9375,
           shuffle: bool = True) -> list[Dataset]:
    """One series of ``images`` (slice order, inferior first) with proper geometry; sent out of order
    when ``shuffle`` (a PACS sends in any order)."""
    series_uid = result_uid("test series", study_uid, name)
    out = []
    for index, pixels in enumerate(images):
        ds = _base(pixels, plane, index, spacing, pixel_mm)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = result_uid("test slice", series_uid, index)
        ds.InstanceNumber = index + 1
        ds.SeriesNumber = sum(map(ord, name)) % 900 + 1
        for keyword, value in (headers or FLAIR).items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out[::2] + out[1::2] if shuffle else out


def lgg_images(size: int | None = None, count: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """The LGG patient's FLAIR slices (inferior first) and their labels; resized to ``size`` and
    repeated up to ``count`` slices when asked. Skips the test when the data set is absent."""
    import pytest

    if not (LGG / "index.csv").is_file():
        pytest.skip(f"lgg-tcga-flair data set not found at {LGG} (set BTD_DATA_DIR)")
    with open(LGG / "index.csv") as f:
        rows = sorted((r for r in csv.DictReader(f) if r["patient"] == LGG_PATIENT), key=lambda r: int(r["slice"]))
    images = [cv2.imread(str(LGG / r["path"]), cv2.IMREAD_GRAYSCALE) for r in rows]
    labels = [r["label"] for r in rows]
    if size is not None:
        images = [cv2.resize(i, (size, size), interpolation=cv2.INTER_LINEAR) for i in images]
    if count is not None:
        images, labels = [images[i % len(images)] for i in range(count)], [labels[i % len(labels)] for i in range(count)]
    return images, labels


def synthetic_images(count: int, size: int = 256) -> list[np.ndarray]:
    """Head-like slices (a bright ellipse on dark) when no real data is needed."""
    out = []
    for i in range(count):
        image = np.zeros((size, size), np.uint16)
        cv2.ellipse(image, (size // 2, size // 2), (size * 3 // 8, size * 4 // 9), 0, 0, 360, 600 + 10 * i, -1)
        cv2.circle(image, (size // 2 + i, size // 2), size // 10, 1200, -1)
        out.append(image)
    return out
