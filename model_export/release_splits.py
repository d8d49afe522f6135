"""The release's split file: which images train, validate and test a release (``models/release.py``),
and so which are the locked validation manifest of ``btd promote`` (``model_export.promote``)."""

from __future__ import annotations

import csv
from pathlib import Path

LGG_T1_SEQUENCES = ("t1pre", "t1post")  # lgg-tcga-t1's ``sequence`` column


def write_release_splits(data: Path, out: Path, *, t1: bool = True, leave_out: str | None = None) -> dict[str, int]:
    """The grouped 4-class split, the figshare-cheng train/val rows and all of lgg-tcga-flair (split by
    patient, the patient id as the group), paths relative to ``data``; ``t1``: with lgg-tcga-t1 (from
    1.3.0; release 1.2.0's split, on which its drift baseline was measured, has no T1 rows).
    ``leave_out``: an lgg-tcga-t1 sequence (``t1pre``, ``t1post``) kept out of train and val, for the
    leave-one-sequence-out experiment (the model neither learns nor is selected on it)."""
    if leave_out is not None and leave_out not in LGG_T1_SEQUENCES:
        raise ValueError(f"leave_out must be one of {LGG_T1_SEQUENCES}, got {leave_out!r}")
    rows = []
    with (data / "brain-mri-4class" / "splits.csv").open(newline="") as fh:
        rows += [("brain-mri-4class/" + r["path"], r["label"], r["split"], r["group"]) for r in csv.DictReader(fh)]
    with (data / "figshare-cheng" / "index.csv").open(newline="") as fh:
        rows += [("figshare-cheng/" + r["image"], r["label"], r["in_4class_splits"], r["group"])
                 for r in csv.DictReader(fh) if r["in_4class_splits"] in ("train", "val")]
    with (data / "lgg-tcga-flair" / "index.csv").open(newline="") as fh:
        rows += [("lgg-tcga-flair/" + r["path"], r["label"], r["split"], "lgg-" + r["patient"])
                 for r in csv.DictReader(fh)]
    # The same patients' T1 and T1 post-contrast slices, in the same patient split and group: one
    # tumour in three sequences, so the sequence stops telling the class.
    if t1 and (data / "lgg-tcga-t1" / "index.csv").is_file():
        with (data / "lgg-tcga-t1" / "index.csv").open(newline="") as fh:
            rows += [("lgg-tcga-t1/" + r["path"], r["label"], r["split"], "lgg-" + r["patient"])
                     for r in csv.DictReader(fh) if not (r["sequence"] == leave_out and r["split"] != "test")]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "split", "group"))
        writer.writerows(rows)
    return {split: sum(r[2] == split for r in rows) for split in ("train", "val", "test")}
