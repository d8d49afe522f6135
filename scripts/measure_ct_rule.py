"""Measure the CT-look rule (``app.core.modality.looks_like_ct``) on the shared data, through
the service's own decoder:

    .venv/bin/python -m scripts.measure_ct_rule [--data ../shared/data]

For brain-mri-4class it prints how many slices the rule flags per grouped split (``splits.csv``), how
many of those are MR (not in ``scripts/ct_looking.txt``: the CT slices of that dataset, found by eye
among the 160 with the brightest rims, as paths relative to the dataset) and how many of the listed
CT slices it catches; for the other MR sets, how many it flags (all are MR: each flag is wrong).
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

from app.core.decode import decode, media_type_for_path
from app.core.modality import looks_like_ct

REPO = Path(__file__).resolve().parents[1]
CT_LIST = Path(__file__).resolve().parent / "ct_looking.txt"
# dataset folder -> (index file, its path column)
MR_SETS = {"figshare-cheng": ("index.csv", "image"), "lgg-tcga-flair": ("index.csv", "path"),
           "lgg-tcga-t1": ("index.csv", "path")}


def flagged(path: Path) -> bool:
    return looks_like_ct(decode(path.read_bytes(), media_type_for_path(path)).pixels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args(argv)
    ct = set(CT_LIST.read_text().split())
    root = args.data / "brain-mri-4class"
    rows = list(csv.DictReader((root / "splits.csv").open()))
    total, mr_flagged, ct_flagged = Counter(), Counter(), Counter()
    caught = 0
    for row in rows:
        hit = flagged(root / row["path"])
        total[row["split"]] += 1
        if hit and row["path"] in ct:
            ct_flagged[row["split"]] += 1
        elif hit:
            mr_flagged[row["split"]] += 1
        caught += hit and row["path"] in ct
    for split in ("train", "val", "test"):
        print(f"brain-mri-4class {split}: {total[split]} slices, flagged {ct_flagged[split]} CT and "
              f"{mr_flagged[split]} MR ({100 * mr_flagged[split] / total[split]:.2f}% of the split wrongly)")
    print(f"brain-mri-4class CT slices listed: {len(ct)}, caught {caught}")
    for name, (index, column) in MR_SETS.items():
        folder = args.data / name
        if not (folder / index).is_file():
            continue
        paths = [folder / r[column] for r in csv.DictReader((folder / index).open())]
        wrong = sum(flagged(p) for p in paths if p.is_file())
        print(f"{name}: {len(paths)} MR slices, flagged {wrong} ({100 * wrong / len(paths):.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
