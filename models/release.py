"""Rebuild the shipped model from ../shared/data and measure it: one command, every step printed.

    .venv/bin/python models/release.py [--data ../shared/data] [--work runs/release]

Steps (each skipped when its output exists, so an interrupted run continues where it stopped):
1. the split file: brain-mri-4class/splits.csv plus the figshare-cheng rows whose group lies in
   train or val (original 512x512 slices; their test rows stay out for evaluation);
2. ``btd train`` (layer3, layer4 and head on freshly augmented images, bf16 autocast on CPU);
3. a candidate export, evaluated on the validation split; the tumour threshold is chosen there
   (never on test): the highest threshold keeping validation tumour sensitivity >= 99.8%,
   capped at 0.5;
4. export with that threshold, evaluate on the grouped test split, export again with the test
   report in the metadata: ``models/btd-resnet50.onnx`` (float16-stored weights);
5. ``btd evaluate`` of the exact shipped file on the test split (1,129) and the figshare-cheng
   test rows (293); INT8 quantization and its evaluation; CAM localisation.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "btd-resnet50.onnx"
VERSION = "1.2.0"
MIN_VAL_SENSITIVITY = 0.998
MAX_THRESHOLD = 0.5
# layer3, layer4 and head trained on freshly augmented images every epoch (no feature cache), in
# bfloat16 autocast with channels_last: on our CPU that is ~17 img/s, about 7 minutes an epoch.
TRAIN_ARGS = ["--freeze", "layer3", "--feature-cache", "off", "--amp", "on", "--channels-last", "on",
              "--epochs", "12", "--patience", "4", "--lr", "5e-4", "--threads", "2", "--workers", "1", "--seed", "0"]
FIGSHARE_COLUMNS = ["--path-column", "image", "--split-column", "in_4class_splits"]


def write_release_splits(data: Path, out: Path) -> dict[str, int]:
    """The grouped 4-class split, the figshare-cheng train/val rows and all of lgg-tcga-flair (split by
    patient, the patient id as the group), paths relative to ``data``."""
    rows = []
    with (data / "brain-mri-4class" / "splits.csv").open(newline="") as fh:
        rows += [("brain-mri-4class/" + r["path"], r["label"], r["split"], r["group"]) for r in csv.DictReader(fh)]
    with (data / "figshare-cheng" / "index.csv").open(newline="") as fh:
        rows += [("figshare-cheng/" + r["image"], r["label"], r["in_4class_splits"], r["group"])
                 for r in csv.DictReader(fh) if r["in_4class_splits"] in ("train", "val")]
    with (data / "lgg-tcga-flair" / "index.csv").open(newline="") as fh:
        rows += [("lgg-tcga-flair/" + r["path"], r["label"], r["split"], "lgg-" + r["patient"])
                 for r in csv.DictReader(fh)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "split", "group"))
        writer.writerows(rows)
    return {split: sum(r[2] == split for r in rows) for split in ("train", "val", "test")}


def threshold_for_sensitivity(tumour_probability: np.ndarray, is_tumour: np.ndarray,
                              min_sensitivity: float = MIN_VAL_SENSITIVITY,
                              cap: float = MAX_THRESHOLD) -> float:
    """The highest threshold t (tumour called when p >= t) whose sensitivity is >= ``min_sensitivity``,
    capped at ``cap`` so the threshold never calls tumours less readily than the class decision."""
    positives = np.sort(np.asarray(tumour_probability, dtype=np.float64)[np.asarray(is_tumour, dtype=bool)])
    if positives.size == 0:
        raise ValueError("no tumour images to choose a threshold on")
    allowed_misses = int(np.floor((1.0 - min_sensitivity) * positives.size + 1e-9))
    return float(min(positives[allowed_misses], cap))


def threshold_from_predictions(predictions_csv: Path) -> float:
    """Threshold from ``btd evaluate``'s predictions.csv (calibrated probabilities)."""
    with predictions_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    p_tumour = np.array([1.0 - float(r["p_notumor"]) for r in rows])
    is_tumour = np.array([r["label"] != "notumor" for r in rows])
    return threshold_for_sensitivity(p_tumour, is_tumour)


def btd(*args: str) -> None:
    command = [sys.executable, "-m", "model_export", *args]
    print("+", shlex.join(["btd", *args]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "release")
    parser.add_argument("--out", type=Path, default=SHIPPED, help="where the released model goes")
    args = parser.parse_args(argv)
    data, work = args.data.resolve(), args.work.resolve()
    splits = work / "release-splits.csv"
    if not splits.exists():
        print("split file:", write_release_splits(data, splits))
    split_args = ["--data", str(data), "--split-file", str(splits)]
    figshare = ["--data", str(data / "figshare-cheng"), "--split-file", str(data / "figshare-cheng" / "index.csv"),
                *FIGSHARE_COLUMNS, "--split", "test", "--calibration-split", ""]

    best = work / "train" / "best.pt"
    if not best.exists():
        btd("train", *split_args, "--out", str(work / "train"), "--cache-dir", str(work / "cache"), *TRAIN_ARGS)
    candidate = work / "candidate.onnx"
    export = ["export", str(best), "--fp16-weights", "--version", VERSION]
    if not (work / "eval-val" / "predictions.csv").exists():
        btd(*export, "--out", str(candidate))
        btd("evaluate", str(candidate), *split_args, "--split", "val", "--out", str(work / "eval-val"))
    threshold = threshold_from_predictions(work / "eval-val" / "predictions.csv")
    print(f"tumour threshold chosen on validation: {threshold:.6f}", flush=True)
    export += ["--threshold", repr(threshold)]
    if not (work / "eval-candidate-test" / "report.json").exists():
        btd(*export, "--out", str(candidate))
        btd("evaluate", str(candidate), *split_args, "--out", str(work / "eval-candidate-test"))
    btd(*export, "--report", str(work / "eval-candidate-test" / "report.json"), "--out", str(args.out))

    # The numbers that describe what ships: evaluate the exact released file.
    btd("evaluate", str(args.out), *split_args, "--out", str(work / "eval-test"))
    btd("evaluate", str(args.out), *figshare, "--out", str(work / "eval-figshare-test"))
    int8 = work / "btd-resnet50-int8.onnx"
    btd("quantize", str(args.out), *split_args, "--out", str(int8))
    btd("evaluate", str(int8), *split_args, "--baseline", str(args.out), "--out", str(work / "eval-int8-test"))
    btd("evaluate", str(int8), *figshare, "--baseline", str(args.out), "--out", str(work / "eval-int8-figshare-test"))
    localisation = [sys.executable, "-m", "model_export.localisation", "--model", str(args.out), "--data-dir",
                    str(data), "--json", str(work / "localisation.json")]
    print("+", shlex.join(localisation), flush=True)
    subprocess.run(localisation, check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
