"""One image of a data set (its path, label, split and group) and how its pixels are read: the
bottom of the training side, used by the data set listing (``data``) and near-duplicate grouping
(``dedup``) alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.core.decode import decode_path


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str = ""
    group: str = ""


def read_gray(path: Path) -> np.ndarray:
    """The float32 2-D slice the service would decode from this file."""
    return decode_path(path).pixels
