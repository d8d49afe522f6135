"""Can the pixels tell the MR sequence? A linear probe on the classifier's own pooled features.

Issue 23 asks for a pixel-based sequence recogniser where validation shows it is reliable, "unknown"
where not. This measures the best case: a logistic regression on the pooled (projected, whitened)
layer4 features that ``btd fit-localiser`` cached, trained on the LGG training patients' slices in
their three sequences (FLAIR, T1, T1 post-contrast) and tested on the LGG test patients and on the
figshare-cheng test rows, which are all T1 post-contrast from other scanners. A recogniser that is
right on LGG's test patients but not on figshare reads the source, not the sequence; and it cannot
name a sequence it has never seen (T2), which it would call one of the three.

    python scripts/measure_sequence_probe.py --cache runs/localiser-features --json runs/sequence-probe.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from model_export.data import shared_data_dir
from model_export.localiser import localisation_rows

SEQUENCES = ("flair", "t1pre", "t1post")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="btd fit-localiser's --cache folder")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = localisation_rows(args.data_dir or shared_data_dir())
    p4 = np.load(args.cache / "p4.npy", mmap_mode="r")
    if len(p4) != len(rows):
        raise SystemExit(f"{args.cache} holds {len(p4)} images, the data {len(rows)}: not this cache")
    pooled = np.stack([np.asarray(p4[i], np.float32).mean(axis=(1, 2)) for i in range(len(rows))])
    split = np.array([r.split for r in rows])
    source = np.array([r.source for r in rows])
    train = (split == "train") & np.isin(source, SEQUENCES)
    scaler = StandardScaler().fit(pooled[train])
    probe = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(pooled[train]), source[train])
    result: dict = {"train_images": int(train.sum()), "lgg_test": {}, "figshare_test": {}}
    for seq in SEQUENCES:
        idx = (split == "test") & (source == seq)
        called = probe.predict(scaler.transform(pooled[idx]))
        result["lgg_test"][seq] = {"images": int(idx.sum()), "correct": float(np.mean(called == seq)),
                                   "called": dict(Counter(called.tolist()))}
    idx = (split == "test") & (source == "figshare")
    called = probe.predict(scaler.transform(pooled[idx]))
    result["figshare_test"] = {"images": int(idx.sum()), "true_sequence": "t1post",
                               "correct": float(np.mean(called == "t1post")), "called": dict(Counter(called.tolist()))}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
