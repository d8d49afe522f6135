"""Which images exist, their labels, and their split: ImageFolder trees and split files.

Torch-free. Images are read through ``app.core.decode.decode_path``, the service's own
decoder, so training sees pixels exactly as production does (DICOM LUTs, RGB -> gray).
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from app.core import formats
from model_export.dedup import grouped_split
from model_export.samples import Sample, read_gray  # noqa: F401  (read_gray: part of this module's API)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(suffix for f in formats.FORMATS for suffix in f.suffixes)
SPLITS = ("train", "val", "test")


def shared_data_dir() -> Path:
    """``$BTD_DATA_DIR``, else ``../shared/data`` beside the repository root."""
    if os.environ.get("BTD_DATA_DIR"):
        return Path(os.environ["BTD_DATA_DIR"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def scan_image_folder(root: Path) -> list[Sample]:
    """``<root>/<label>/*.{jpg,jpeg,png,dcm}`` -> samples (no split yet). Labels are the folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    samples = [
        Sample(path, label_dir.name)
        for label_dir in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(label_dir.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise ValueError(f"no images under {root}/<label>/ (expected {', '.join(IMAGE_SUFFIXES)})")
    return samples


def read_split_file(
    split_file: Path,
    root: Path | None = None,
    *,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str = "split",
    group_column: str = "group",
) -> list[Sample]:
    """Rows of a CSV split file; relative paths resolve against ``root`` (default: the file's folder).
    The column names are options so other index files (e.g. figshare-cheng's) read too."""
    split_file = Path(split_file)
    root = Path(root) if root is not None else split_file.parent
    with split_file.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for column in (path_column, label_column):
            if column not in header:
                raise ValueError(f"{split_file} has no column {column!r} (columns: {', '.join(header)})")
        samples = [
            Sample(
                root / row[path_column],
                row[label_column],
                row.get(split_column, "") or "",
                row.get(group_column, "") or "",
            )
            for row in reader
        ]
    if not samples:
        raise ValueError(f"{split_file} lists no images")
    missing = [s.path for s in samples[:50] if not s.path.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)}+ listed images are missing, e.g. {missing[0]}")
    return samples


def write_split_file(samples: Sequence[Sample], path: Path, root: Path) -> Path:
    """The split as a CSV (``path,label,split,group``, paths relative to ``root``) that
    ``read_split_file`` reads back: a split made here can then be reused exactly by evaluate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "group"])
        for s in samples:
            writer.writerow([Path(s.path).relative_to(root).as_posix(), s.label, s.split, s.group])
    return path


def labels_of(samples: Iterable[Sample]) -> tuple[str, ...]:
    """The class names present, sorted (logit order)."""
    labels = tuple(sorted({s.label for s in samples}))
    if len(labels) < 2:
        raise ValueError(f"need at least two classes, found {list(labels)}")
    return labels


def select(samples: Sequence[Sample], split: str) -> list[Sample]:
    chosen = [s for s in samples if s.split == split]
    return chosen


def limit_per_class(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` samples per (split, class), chosen at random with ``seed``."""
    if limit <= 0:
        return samples
    shuffled = samples[:]
    random.Random(seed).shuffle(shuffled)
    taken: dict[tuple[str, str], int] = {}
    chosen = []
    for s in shuffled:
        key = (s.split, s.label)
        if taken.get(key, 0) < limit:
            taken[key] = taken.get(key, 0) + 1
            chosen.append(s)
    return sorted(chosen, key=lambda s: str(s.path))


def summarise(samples: Sequence[Sample]) -> dict:
    """Counts per split and class: the training-data summary stored in the model's metadata."""
    by_split: dict[str, dict[str, int]] = {}
    for split in sorted({s.split for s in samples}):
        counts = Counter(s.label for s in samples if s.split == split)
        by_split[split or "unsplit"] = dict(sorted(counts.items()))
    return {"images": len(samples), "groups": len({s.group for s in samples}), "per_split": by_split}


def load_samples(
    data: Path,
    split_file: Path | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    **columns: str,
) -> list[Sample]:
    """Samples with splits: from the split file when given, else a stratified split grouped by
    near-duplicates of an ImageFolder tree (see :mod:`model_export.dedup`)."""
    if split_file is not None:
        samples = read_split_file(split_file, data, **columns)
        unknown = {s.split for s in samples} - set(SPLITS) - {""}
        if unknown:
            log.warning("split file has splits %s besides %s", sorted(unknown), SPLITS)
        return samples
    samples = scan_image_folder(data)
    log.info("no split file: grouping %d images by near-duplicates", len(samples))
    return grouped_split(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
