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

from app.core.contract import scale_intensity
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


def agreement(model_path: Path, pairs: Sequence[Pair]) -> dict:
    """Label and tumour-decision agreement between originals and copies, and each side's accuracy,
    through the service's own engine (decode, preprocess, model, calibration, decision)."""
    from app.engine.engine import Engine, EngineOptions

    engine = Engine.load_single(model_path, EngineOptions(variant="fp32"))  # exactly this file

    def predict(paths: Sequence[Path]) -> list:
        return [engine.predict(p.read_bytes()) for p in tqdm(paths, desc="predicting", unit="image", leave=False)]

    originals, copies = predict([p.original for p in pairs]), predict([p.copy for p in pairs])
    same_label = np.array([a.label == b.label for a, b in zip(originals, copies)])
    same_decision = np.array([a.tumour_detected == b.tumour_detected for a, b in zip(originals, copies)])
    identity = engine.model_identity
    return {
        "model": {"name": identity.name, "version": identity.version, "sha256": identity.sha256},
        "pairs": len(pairs),
        "label_agreement": float(same_label.mean()),
        "tumour_decision_agreement": float(same_decision.mean()),
        "accuracy_original": float(np.mean([o.label == p.label for o, p in zip(originals, pairs)])),
        "accuracy_copy": float(np.mean([c.label == p.label for c, p in zip(copies, pairs)])),
        "mean_abs_tumour_probability_difference": float(np.mean(
            [abs(o.tumour_probability - c.tumour_probability) for o, c in zip(originals, copies)])),
        "disagreements": [
            {"original": p.original.name, "copy": p.copy.name, "label": p.label,
             "original_predicted": o.label, "copy_predicted": c.label}
            for p, o, c in zip(pairs, originals, copies) if o.label != c.label
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
