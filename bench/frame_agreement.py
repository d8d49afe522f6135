"""Agreement of the contract's ``preprocess`` with the implementation the shipped model was trained
with (``tests/frame_reference.py``, the code up to b19439c), on real slices and through the model.

Slices: the grouped validation split of brain-mri-4class (``splits.csv``), figshare-cheng and
lgg-tcga-flair (an even spread of each, ``--per-source``). Reported per source and overall: max and
mean absolute difference of the input tensors, label agreement of the shipped INT8 model on both
inputs (ONNX Runtime), the largest change of any class probability (with the model's temperature),
and the median time of the old and new ``frame``. Writes JSON (``--out``).

    PYTHONPATH=$PWD .venv/bin/python bench/frame_agreement.py --out runs/frame-agreement.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.core import contract
from app.core.contract import ModelMetadata
from app.core.decode import decode_path
from tests import frame_reference

DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
DEFAULT_MODEL = REPO / "models" / "btd-resnet50-int8.onnx"


def spread(paths: list[Path], n: int) -> list[Path]:
    if len(paths) <= n:
        return paths
    return [paths[int(i * len(paths) / n)] for i in range(n)]


def slices(per_source: int) -> dict[str, list[Path]]:
    root = DATA / "brain-mri-4class"
    with (root / "splits.csv").open() as f:
        val = sorted(root / row["path"] for row in csv.DictReader(f) if row["split"] == "val")
    return {
        "brain-mri-4class val": spread(val, per_source),
        "figshare-cheng": spread(sorted((DATA / "figshare-cheng" / "images").glob("*/*.jpg")), per_source),
        "lgg-tcga-flair": spread(sorted((DATA / "lgg-tcga-flair" / "images").glob("*/*.png")), per_source),
    }


def timed(fn, *args) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1000.0


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--per-source", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import onnxruntime as ort

    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    spec = meta.preprocess
    report: dict[str, dict] = {}
    all_rows = []
    for source, paths in slices(args.per_source).items():
        rows = []
        for path in paths:
            gray = decode_path(path).pixels
            (old_unit, old_framing), old_ms = timed(frame_reference.frame, gray, spec)
            (new_unit, new_framing), new_ms = timed(contract.frame, gray, spec)
            old, new = contract.normalise(old_unit, spec), contract.normalise(new_unit, spec)
            logits = session.run([contract.LOGITS_NAME], {contract.INPUT_NAME: np.stack([old, new])})[0]
            probs = softmax(logits, meta.temperature)
            rows.append({"path": str(path.relative_to(DATA)), "max_abs": float(np.abs(old - new).max()),
                         "mean_abs": float(np.abs(old - new).mean()),
                         "same_label": bool(probs[0].argmax() == probs[1].argmax()),
                         "max_prob_change": float(np.abs(probs[0] - probs[1]).max()),
                         "box_shift_px": float(max(abs(old_framing.x - new_framing.x), abs(old_framing.y - new_framing.y),
                                                   abs(old_framing.side - new_framing.side))),
                         "head_found_same": old_framing.head_found == new_framing.head_found,
                         "old_ms": old_ms, "new_ms": new_ms})
        report[source] = summary(rows)
        all_rows += rows
        print(f"{source:<22} " + " ".join(f"{k}={v:.4g}" for k, v in report[source].items()), flush=True)
    report["all"] = summary(all_rows)
    print(f"{'all':<22} " + " ".join(f"{k}={v:.4g}" for k, v in report["all"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        worst = sorted(all_rows, key=lambda r: -r["max_prob_change"])[:10]
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "model": str(args.model), "summary": report,
                                        "worst": worst}, indent=1) + "\n")
    return 0 if report["all"]["label_agreement"] >= 0.995 else 1


def summary(rows: list[dict]) -> dict[str, float]:
    return {"slices": len(rows),
            "label_agreement": sum(r["same_label"] for r in rows) / len(rows),
            "max_prob_change": max(r["max_prob_change"] for r in rows),
            "mean_prob_change": statistics.fmean(r["max_prob_change"] for r in rows),
            "tensor_max_abs": max(r["max_abs"] for r in rows),
            "tensor_mean_abs": statistics.fmean(r["mean_abs"] for r in rows),
            "box_shift_max_px": max(r["box_shift_px"] for r in rows),
            "head_found_same": sum(r["head_found_same"] for r in rows) / len(rows),
            "old_frame_ms_median": statistics.median(r["old_ms"] for r in rows),
            "new_frame_ms_median": statistics.median(r["new_ms"] for r in rows)}


if __name__ == "__main__":
    sys.exit(main())
