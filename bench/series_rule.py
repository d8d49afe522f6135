"""The series aggregation rule (``app.core.series.aggregate``) measured on real series, in one run.

Series with a tumour: each LGG test patient's slices (``lgg-tcga-flair`` and ``lgg-tcga-t1``
``index.csv``, ``split == test``), one series per patient and sequence, ordered by slice number.
Every LGG patient has a glioma, so the series sensitivity is the share called tumour.

Tumour-free series, three estimates, each with its bias:

(a) ``lgg-runs``: each maximal run (2 slices or more) of consecutive tumour-free slices of those
    series, as a series. Biased: the same patients, slices next to a glioma (oedema, mass effect).
(b) ``mni152``: the MNI152 T1 template (nilearn's packaged file, ICBM 2009a, 1 mm, skull-stripped)
    read by the NIfTI path (``app.core.nifti``): one healthy brain averaged from 152; must come out
    tumour-free. One series: a pass/fail, not a rate.
(c) ``4class-groups``: the ``brain-mri-4class`` notumor test rows grouped by ``group`` (adjacent
    slices or copies of one patient's scan, found by image correlation), in path order, as pseudo-series.
    Most groups hold one image: reported for all groups and for groups of 2 or more.

Each slice is predicted once with the shipped INT8 model (batch 1, CPU); the rule is then evaluated for
``min_run`` 1 to 4 (the shipped value is ``SERIES_MIN_RUN``) from the same predictions. Writes JSON.

    nice .venv/bin/python bench/series_rule.py --json runs/series-rule.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.result import Prediction
from app.core.series import SERIES_MIN_RUN, aggregate
from model_export.data import shared_data_dir

DATA = shared_data_dir()  # $BTD_DATA_DIR, else ../shared/data
MIN_RUNS = (1, 2, 3, 4)


def lgg_series(data: Path) -> dict[str, list[tuple[str, str]]]:
    """{"<sequence>/<patient>": [(image path, label)] in slice order} for the LGG test patients."""
    series: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for folder, sequence_of in (("lgg-tcga-flair", lambda r: "flair"), ("lgg-tcga-t1", lambda r: r["sequence"])):
        with open(data / folder / "index.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["split"] == "test":
                    series[f"{sequence_of(row)}/{row['patient']}"].append(
                        (int(row["slice"]), str(data / folder / row["path"]), row["label"]))
    return {k: [(p, label) for _, p, label in sorted(v)] for k, v in sorted(series.items())}


def tumour_free_runs(series: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """(a): maximal runs of 2+ consecutive notumor slices of each series."""
    runs: dict[str, list[str]] = {}
    for name, slices in series.items():
        current: list[str] = []
        for path, label in [*slices, ("", "end")]:
            if label == "notumor":
                current.append(path)
                continue
            if len(current) >= 2:
                runs[f"{name}#{len(runs)}"] = current
            current = []
    return runs


def four_class_groups(data: Path) -> dict[str, list[str]]:
    """(c): notumor test rows of brain-mri-4class by group, in path order."""
    groups: dict[str, list[str]] = defaultdict(list)
    with open(data / "brain-mri-4class" / "splits.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "test" and row["label"] == "notumor":
                groups[row["group"]].append(str(data / "brain-mri-4class" / row["path"]))
    return {g: sorted(paths) for g, paths in sorted(groups.items())}


def predict_paths(engine, paths: list[str], cache: dict[str, Any]) -> None:
    todo = [p for p in paths if p not in cache]
    for n, path in enumerate(todo, 1):
        cache[path] = engine.predict(Path(path).read_bytes()).to_dict()
        if n % 100 == 0:
            print(f"  {n}/{len(todo)} slices", file=sys.stderr)


def evaluate(named: dict[str, list[Prediction]], min_run: int, want_tumour: bool) -> dict[str, Any]:
    findings = {name: aggregate(preds, min_run=min_run) for name, preds in named.items()}
    assessed = {n: f for n, f in findings.items() if f.assessed}
    hits = [n for n, f in assessed.items() if bool(f.tumour_detected) == want_tumour]
    out = {"series": len(findings), "assessed": len(assessed), "correct": len(hits),
           ("sensitivity" if want_tumour else "false_positive_rate"):
               (len(hits) if want_tumour else len(assessed) - len(hits)) / len(assessed) if assessed else None}
    out["wrong"] = sorted(n for n in assessed if n not in hits)[:40]
    return out


def slice_rates(preds: list[Prediction], want_tumour: bool) -> dict[str, Any]:
    assessed = [p for p in preds if p.assessed]
    hits = sum(bool(p.tumour_detected) == want_tumour for p in assessed)
    return {"slices": len(preds), "assessed": len(assessed), "correct": hits,
            "rate": hits / len(assessed) if assessed else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "btd-resnet50.onnx"))
    parser.add_argument("--json", default=str(ROOT / "runs" / "series-rule.json"))
    parser.add_argument("--cache", default=None, help="slice predictions cache (JSON), reused when present")
    args = parser.parse_args()
    if not (DATA / "lgg-tcga-flair" / "index.csv").is_file():
        print(f"series_rule: no data at {DATA} (set BTD_DATA_DIR)", file=sys.stderr)
        return 2
    from nilearn.datasets import MNI152_FILE_PATH

    from app.engine.engine import Engine, EngineOptions
    from app.engine.series import SeriesLimits, predict_volume_sync

    started = time.time()
    engine = Engine.load_single(args.model, EngineOptions(variant="int8"))
    cache: dict[str, Any] = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).is_file() else {}
    lgg = lgg_series(DATA)
    runs = tumour_free_runs(lgg)
    groups = four_class_groups(DATA)
    paths = sorted({p for s in lgg.values() for p, _ in s} | {p for g in groups.values() for p in g})
    print(f"series_rule: {len(paths)} slices to predict ({len(cache)} cached)", file=sys.stderr)
    predict_paths(engine, paths, cache)
    if "mni152" not in cache:
        volume = predict_volume_sync(engine, Path(MNI152_FILE_PATH).read_bytes(), SeriesLimits())
        cache["mni152"] = [s.result.to_dict() for s in volume.slices]
    if args.cache:
        Path(args.cache).write_text(json.dumps(cache))

    def preds(paths: list[str]) -> list[Prediction]:
        return [Prediction.from_dict(cache[p]) for p in paths]

    tumour = {n: preds([p for p, _ in s]) for n, s in lgg.items()}
    by_sequence = {seq: {n: v for n, v in tumour.items() if n.startswith(seq + "/")} for seq in ("flair", "t1post", "t1pre")}
    free = {"lgg-runs": {n: preds(p) for n, p in runs.items()},
            "mni152": {"mni152": [Prediction.from_dict(d) for d in cache["mni152"]]},
            "4class-groups": {g: preds(p) for g, p in groups.items()},
            "4class-groups-2plus": {g: preds(p) for g, p in groups.items() if len(p) >= 2}}
    report: dict[str, Any] = {
        "model": engine.model_identity.__dict__, "variant": engine.variant, "threshold": engine.threshold,
        "shipped_min_run": SERIES_MIN_RUN,
        "slice_level": {"lgg_tumour_slices_sensitivity": slice_rates(
            [Prediction.from_dict(cache[p]) for s in lgg.values() for p, label in s if label == "glioma"], True),
            "lgg_tumour_free_slices_specificity": slice_rates(
            [Prediction.from_dict(cache[p]) for s in lgg.values() for p, label in s if label == "notumor"], False),
            "4class_notumor_specificity": slice_rates([p for g in free["4class-groups"].values() for p in g], False),
            "mni152_specificity": slice_rates(free["mni152"]["mni152"], False)},
        "rules": {},
    }
    for k in MIN_RUNS:
        report["rules"][f"min_run={k}"] = {
            "sensitivity": {seq: evaluate(v, k, True) for seq, v in by_sequence.items()},
            "tumour_free": {name: evaluate(v, k, False) for name, v in free.items()},
        }
    mni = aggregate(free["mni152"]["mni152"])
    report["mni152_finding"] = {"tumour_detected": mni.tumour_detected, "tumour_probability": mni.tumour_probability,
                                "slices_assessed": mni.slices_assessed, "slices_not_assessed": mni.slices_not_assessed,
                                "not_assessed_reasons": mni.not_assessed_reasons, "key_slices": mni.key_slices}
    report["seconds"] = round(time.time() - started, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    for k, rule in report["rules"].items():
        sens = {s: v["sensitivity"] for s, v in rule["sensitivity"].items()}
        fpr = {s: v["false_positive_rate"] for s, v in rule["tumour_free"].items()}
        print(f"{k}: sensitivity {json.dumps(sens)}; false-positive rate {json.dumps(fpr)}")
    print(f"series_rule: wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
