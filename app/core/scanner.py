"""The scanner a DICOM slice was acquired on, as subgroup names for a site's acceptance test
(``btd validate``): the manufacturer and the main field strength. Like ``app.core.acquisition``, no
tag value ever leaves here, only names from the fixed lists below: Manufacturer is free text a site
writes (it can name a hospital's own build), so it is matched against known vendors and answered as
the vendor's name, or "other".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from app.core.decode import DEFAULT_MAX_PIXELS, quiet_pydicom
from app.core.dicom_read import element_limits, read_dataset

UNKNOWN = "unknown"  # the header does not say (or the file is a PNG / JPEG: no header)
OTHER = "other"
# A word (or two) of Manufacturer (0008,0070), lower case -> the vendor's name.
VENDORS = {
    "siemens": "Siemens", "ge": "GE", "gems": "GE", "general electric": "GE", "philips": "Philips",
    "canon": "Canon (Toshiba)", "toshiba": "Canon (Toshiba)", "hitachi": "Fujifilm (Hitachi)",
    "fujifilm": "Fujifilm (Hitachi)", "united imaging": "United Imaging", "uih": "United Imaging",
    "esaote": "Esaote", "neusoft": "Neusoft", "mindray": "Mindray", "imris": "IMRIS", "hyperfine": "Hyperfine",
}
# Magnetic Field Strength (0018,0087) is in tesla; some old files wrote gauss (15000 for 1.5 T).
MAX_TESLA = 20.0


@dataclass(frozen=True)
class Scanner:
    manufacturer: str = UNKNOWN  # a value of VENDORS, OTHER or UNKNOWN
    field_strength: str = UNKNOWN  # e.g. "1.5 T", "3 T", or UNKNOWN


def manufacturer_of(ds: Any) -> str:
    text = str(ds.get("Manufacturer", "") or "").strip().lower()
    if not text:
        return UNKNOWN
    words = re.findall(r"[a-z0-9]+", text)
    pairs = [" ".join(words[i:i + 2]) for i in range(len(words) - 1)]
    for key in (*pairs, *words):
        if key in VENDORS:
            return VENDORS[key]
    return OTHER


def field_strength_of(ds: Any) -> str:
    try:
        tesla = float(ds.get("MagneticFieldStrength", None))
    except (TypeError, ValueError):
        return UNKNOWN
    if tesla > MAX_TESLA:
        tesla /= 10_000.0  # gauss
    if not 0.0 < tesla <= MAX_TESLA:
        return UNKNOWN
    return f"{round(tesla, 1):g} T"


def scanner_of(ds: Any) -> Scanner:
    return Scanner(manufacturer_of(ds), field_strength_of(ds))


def read_scanner(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Scanner:
    """The scanner of a DICOM Part 10 file, its header read under ``dicom_read``'s limits (for a caller's
    own files: ``btd validate``); an unreadable header says nothing (the decode reports it)."""
    with quiet_pydicom(), element_limits():
        try:
            return scanner_of(read_dataset(data, max_pixels, stop_before_pixels=True))
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 -- pydicom parses lazily: any element may fail on malformed input
            return Scanner()
