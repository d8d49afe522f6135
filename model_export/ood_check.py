"""How well the out-of-distribution guard works: the share of non-brain images it flags (goal:
>= 95%) and the share of real test slices it flags (goal: <= 1% of the grouped test split), both
through the service's own engine (``Prediction.in_distribution``), so every rule counts: the
model's score over its threshold, no head found, an image too small to be a whole slice.

    python -m model_export.ood_check --model models/btd-resnet50.onnx [--json runs/ood-check.json]

The non-brain set is ``model_export.nonbrain`` (built from installed packages); the brain sets are
the grouped test split of brain-mri-4class, the figshare-cheng test rows and the lgg-tcga-flair
test split, when ``--data-dir`` holds them. Measured, never tuned on: the threshold comes from the
validation split (``btd fit-ood``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from model_export.data import shared_data_dir
from model_export.nonbrain import non_brain_set

log = logging.getLogger(__name__)

# (name, folder under the data dir, index file, path column, split column)
BRAIN_SETS = (
    ("grouped test (brain-mri-4class)", "brain-mri-4class", "splits.csv", "path", "split"),
    ("figshare-cheng test rows", "figshare-cheng", "index.csv", "image", "in_4class_splits"),
    ("lgg-tcga-flair test split", "lgg-tcga-flair", "index.csv", "path", "split"),
)


def _flag_summary(predictions: Sequence, names: Sequence[str]) -> dict:
    flagged = [p.in_distribution is False for p in predictions]
    reasons = Counter(r for p in predictions for r in p.ood_reasons)
    return {
        "images": len(predictions),
        "flagged": int(sum(flagged)),
        "flagged_share": float(sum(flagged) / max(len(predictions), 1)),
        "reasons": dict(sorted(reasons.items())),
        "not_flagged": [n for n, f in zip(names, flagged) if not f],
    }


def _brain_paths(data_dir: Path, folder: str, index: str, path_column: str, split_column: str) -> list[Path]:
    with (data_dir / folder / index).open(newline="") as fh:
        return [data_dir / folder / row[path_column] for row in csv.DictReader(fh) if row[split_column] == "test"]


def check(model_path: Path, data_dir: Path | None, brain_sets: Iterable[tuple[str, str, str, str, str]] = BRAIN_SETS) -> dict:
    from app.engine.engine import Engine, EngineOptions

    engine = Engine.load_single(model_path, EngineOptions(variant="fp32"))  # exactly this file
    identity = engine.model_identity
    images = non_brain_set()
    predictions = [engine.predict(i.data, i.media_type) for i in tqdm(images, desc="non-brain", leave=False)]
    summary = _flag_summary(predictions, [i.name for i in images])
    by_source = {}
    for source in sorted({i.source for i in images}):
        chosen = [(i, p) for i, p in zip(images, predictions) if i.source == source]
        by_source[source] = _flag_summary([p for _, p in chosen], [i.name for i, _ in chosen])
    result = {
        "model": {"name": identity.name, "version": identity.version, "sha256": identity.sha256},
        "has_ood_output": engine.model.has_ood,
        "non_brain": {**summary, "by_source": by_source},
        "brain": {},
    }
    for name, *where in brain_sets:
        if data_dir is None or not (data_dir / where[0] / where[1]).is_file():
            log.info("%s: not found under %s, skipped", name, data_dir)
            continue
        paths = _brain_paths(data_dir, *where)
        brain = [engine.predict(p.read_bytes()) for p in tqdm(paths, desc=name, leave=False)]
        summary = _flag_summary(brain, [p.name for p in paths])
        summary["flagged_names"] = [p.name for p, b in zip(paths, brain) if b.in_distribution is False]
        del summary["not_flagged"]
        result["brain"][name] = summary
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="exported ONNX model")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding the brain sets (default: $BTD_DATA_DIR or ../shared/data)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data_dir = args.data_dir or shared_data_dir()
    result = check(args.model, data_dir if data_dir.is_dir() else None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    nb = result["non_brain"]
    print(f"non-brain images flagged: {nb['flagged']}/{nb['images']} ({nb['flagged_share']:.3f}); by source: "
          + ", ".join(f"{s} {v['flagged']}/{v['images']}" for s, v in nb["by_source"].items()))
    for name, summary in result["brain"].items():
        print(f"{name}: flagged {summary['flagged']}/{summary['images']} ({summary['flagged_share']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
