"""Do a slice's original and its re-encoded 224x224 copy get the same answer?

figshare-cheng holds 512x512 originals; brain-mri-4class holds third-party 224x224 copies of many of
them (squashed, contrast-altered), in the same ``group``. For each figshare row this finds its copy
(the member of its group whose pixels correlate best with the original squashed to 224x224, if
the correlation is at least ``MIN_MATCH``), predicts both with the same model, and reports how
often the labels and the tumour decisions agree. A model that learned the look of the copy
disagrees; a model that learned the anatomy does not.

    python -m model_export.agreement --model models/btd-resnet50.onnx [--split test] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from app.contract import preprocess, scale_intensity
from model_export.data import read_gray, shared_data_dir

log = logging.getLogger(__name__)

MIN_MATCH = 0.97  # true copies correlate >= 0.99 with the squashed original; adjacent slices of a group <= 0.93
COPY_SIZE = 224


@dataclass(frozen=True)
class Pair:
    original: Path
    copy: Path
    label: str
    match: float  # correlation of the original (squashed to the copy's size) with the copy


def _thumb(gray: np.ndarray) -> np.ndarray:
    unit = cv2.resize(scale_intensity(gray), (COPY_SIZE, COPY_SIZE), interpolation=cv2.INTER_AREA)
    return (unit - unit.mean()) / (unit.std() + 1e-6)


def find_pairs(data_dir: Path, split: str = "test") -> tuple[list[Pair], int]:
    """(figshare rows of ``split`` paired with their 224 copy, number of rows without a copy)."""
    data_dir = Path(data_dir)
    with (data_dir / "brain-mri-4class" / "splits.csv").open(newline="") as fh:
        copies: dict[str, list[Path]] = {}
        for row in csv.DictReader(fh):
            copies.setdefault(row["group"], []).append(data_dir / "brain-mri-4class" / row["path"])
    with (data_dir / "figshare-cheng" / "index.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if not split or r["in_4class_splits"] == split]
    pairs, unmatched = [], 0
    thumbs: dict[Path, np.ndarray] = {}
    for row in tqdm(rows, desc="matching copies", unit="image", leave=False):
        original = data_dir / "figshare-cheng" / row["image"]
        target = _thumb(read_gray(original))
        best, best_path = -1.0, None
        for candidate in copies.get(row["group"], []):
            if candidate not in thumbs:
                thumbs[candidate] = _thumb(read_gray(candidate))
            score = float((target * thumbs[candidate]).mean())
            if score > best:
                best, best_path = score, candidate
        if best_path is None or best < MIN_MATCH:
            unmatched += 1
            continue
        pairs.append(Pair(original, best_path, row["label"], best))
    return pairs, unmatched


def agreement(model_path: Path, pairs: Sequence[Pair], batch_size: int = 16) -> dict:
    """Label and tumour-decision agreement between originals and copies, and each side's accuracy."""
    from app.inference.runner import Runner
    from app.inference.postprocess import softmax, tumour_probability

    runner = Runner.load(model_path)
    meta = runner.metadata
    labels, threshold = meta.labels, meta.tumour_threshold

    def predict(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        classes, tumour = [], []
        for start in tqdm(range(0, len(paths), batch_size), desc="predicting", unit="batch", leave=False):
            batch = np.stack([preprocess(read_gray(p), meta.preprocess) for p in paths[start : start + batch_size]])
            probs = softmax(runner.run(batch)[0], meta.temperature)
            classes += list(probs.argmax(axis=1))
            tumour += [tumour_probability(p, labels) for p in probs]
        return np.array(classes), np.array(tumour, dtype=float)

    originals, p_original = predict([p.original for p in pairs])
    copies, p_copy = predict([p.copy for p in pairs])
    truth = np.array([labels.index(p.label) for p in pairs])
    return {
        "model": {"name": meta.model_name, "version": meta.model_version, "sha256": runner.sha256},
        "pairs": len(pairs),
        "label_agreement": float((originals == copies).mean()),
        "tumour_decision_agreement": float(((p_original >= threshold) == (p_copy >= threshold)).mean()),
        "accuracy_original": float((originals == truth).mean()),
        "accuracy_copy": float((copies == truth).mean()),
        "mean_abs_tumour_probability_difference": float(np.abs(p_original - p_copy).mean()),
        "disagreements": [
            {"original": str(p.original.name), "copy": str(p.copy.name), "label": p.label,
             "original_predicted": labels[int(a)], "copy_predicted": labels[int(b)]}
            for p, a, b in zip(pairs, originals, copies) if a != b
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="exported ONNX model")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding brain-mri-4class/ and "
                        "figshare-cheng/ (default: $BTD_DATA_DIR or ../shared/data)")
    parser.add_argument("--split", default="test", help="figshare rows whose group lies in this split "
                        "('' for all rows)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pairs, unmatched = find_pairs(args.data_dir or shared_data_dir(), args.split)
    result = {"split": args.split or "all", "unmatched": unmatched, **agreement(args.model, pairs)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(f"{result['pairs']} original/copy pairs ({unmatched} originals without a copy): label agreement "
          f"{result['label_agreement']:.4f}, tumour-decision agreement {result['tumour_decision_agreement']:.4f}, "
          f"accuracy original {result['accuracy_original']:.4f} / copy {result['accuracy_copy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
