"""How much drift sampling noise alone makes: the shipped model's answers to slices of a population
it is validated on (brain-mri-4class's grouped test split), drawn at random in windows of each
size, compared with the model's baseline (``btd.baseline``) by the service's own drift code. Prints
JSON: per window size, the median and 95th percentile of the largest PSI of the signals, and the
share of draws that would break the drift rule's PSI threshold. The figures behind the defaults of
BTD_DRIFT_WINDOW and BTD_DRIFT_MIN_RECORDS (README, "Monitoring").

    .venv/bin/python bench/drift_noise.py --model models/btd-resnet50-int8.onnx --images 400
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import numpy as np

from app.core.model import ModelFile
from app.engine.monitoring.drift import DEFAULT_PSI_THRESHOLD, DriftRule, signal_drift
from model_export.baseline import measure
from model_export.data import Sample, shared_data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/btd-resnet50-int8.onnx"))
    parser.add_argument("--data", type=Path, default=shared_data_dir())
    parser.add_argument("--images", type=int, default=400, help="grouped-test slices to answer (at random)")
    parser.add_argument("--windows", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = ModelFile.load(args.model)
    if model.baseline is None:
        raise SystemExit(f"{args.model} has no drift baseline (btd baseline)")
    with (args.data / "brain-mri-4class" / "splits.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    random.Random(0).shuffle(rows)
    samples = [Sample(args.data / "brain-mri-4class" / r["path"], r["label"], "test") for r in rows[: args.images]]
    answers, _ = measure(model, samples, threads=args.threads)
    rng = np.random.default_rng(0)
    out = {"model": args.model.name, "images": len(answers), "draws": args.draws, "threshold": DEFAULT_PSI_THRESHOLD,
           "windows": {}}
    for size in args.windows:
        rule = DriftRule(window=size, min_records=size)
        largest = []
        for _ in range(args.draws):
            window = [answers[i] for i in rng.choice(len(answers), size, replace=False)]
            largest.append(max(signal_drift(name, signal, [a[name] for a in window], rule, size).psi or 0.0
                               for name, signal in model.baseline.signals.items()))
        out["windows"][str(size)] = {"median_largest_psi": round(float(np.median(largest)), 3),
                                     "p95_largest_psi": round(float(np.quantile(largest, 0.95)), 3),
                                     "share_over_threshold": round(float(np.mean(np.asarray(largest) >
                                                                                  DEFAULT_PSI_THRESHOLD)), 4)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
