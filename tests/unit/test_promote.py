"""The change gate (model_export/promote.py, ``btd promote``): a model against itself is accepted, a
degraded one is refused (exit status 1), and the validation set is locked by its hashes."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.core.contract import NO_TUMOUR_LABEL
from app.core.model import ModelFile, file_sha256
from app.transports.cli.btd import main as btd
from model_export.data import shared_data_dir
from model_export.promote import (
    ACCEPTED,
    MANIFEST_COLUMNS,
    PROTOCOL,
    REFUSED,
    ManifestRow,
    Protocol,
    gate,
    promote,
    read_manifest,
)
from tests.model_factory import LABELS

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "btd-resnet50.onnx"
MANIFEST = ROOT / "models" / "validation-manifest.csv"
DATA = shared_data_dir()
PROTOCOL_FAST = Protocol(margins={"sensitivity": 0.01, "specificity": 0.03, "auc": 0.01, "ece": 0.02},
                         group_margins={"sensitivity": 0.03, "specificity": 0.05}, group_min_cases=20,
                         confidence=0.95, bootstrap=200, seed=0, manifest=None, manifest_sha256=None)


def synthetic(n_groups: int = 60, per_group: int = 4, seed: int = 0):
    """Manifest rows over two sequences and the logits of a good, calibrated model: each image's true
    label is drawn from the model's own probabilities."""
    rng = np.random.default_rng(seed)
    rows, logits = [], []
    for g in range(n_groups):
        for i in range(per_group):
            z = rng.normal(0, 1, len(LABELS))
            z[(g + i) % len(LABELS)] += 5.0
            p = np.exp(z - z.max())
            label = LABELS[rng.choice(len(LABELS), p=p / p.sum())]
            rows.append(ManifestRow(f"x/{g}-{i}.png", label, f"g{g}", "src", "flair" if g % 2 else "t1post", "0"))
            logits.append(z)
    return rows, np.array(logits, np.float32)


MODEL = SimpleNamespace(labels=LABELS, temperature=1.0, threshold=0.5)


def test_a_model_against_itself_holds_every_margin_with_zero_difference():
    rows, logits = synthetic()
    verdict = gate(logits, logits, rows, MODEL, MODEL, PROTOCOL_FAST)
    assert verdict["decision"] == ACCEPTED and verdict["broken"] == []
    for figure in verdict["figures"].values():
        assert figure["difference"] == 0.0 and figure["difference_ci"] == [0.0, 0.0] and figure["holds"] is True
    assert set(verdict["per_sequence"]) == {"src/flair", "src/t1post"}


def test_a_candidate_missing_tumours_in_one_sequence_is_refused_there():
    rows, logits = synthetic()
    worse = logits.copy()
    notumor = LABELS.index(NO_TUMOUR_LABEL)
    for i, row in enumerate(rows):  # a third of the FLAIR tumour slices now called tumour-free
        if row.sequence == "flair" and row.label != NO_TUMOUR_LABEL and i % 3 == 0:
            worse[i, notumor] += 10.0
    verdict = gate(logits, worse, rows, MODEL, MODEL, PROTOCOL_FAST)
    assert verdict["decision"] == REFUSED
    assert "sensitivity" in verdict["broken"] and "src/flair sensitivity" in verdict["broken"]
    assert "src/t1post sensitivity" not in verdict["broken"]
    assert verdict["figures"]["sensitivity"]["difference"] < -0.1


def test_a_candidate_that_finds_the_missed_tumours_is_accepted():
    rows, better = synthetic(seed=1)
    logits = better.copy()
    notumor = LABELS.index(NO_TUMOUR_LABEL)
    for i, row in enumerate(rows):  # the current model misses some tumours
        if row.label != NO_TUMOUR_LABEL and i % 3 == 0:
            logits[i, notumor] += 10.0
    verdict = gate(logits, better, rows, MODEL, MODEL, PROTOCOL_FAST)
    assert verdict["decision"] == ACCEPTED, verdict["broken"]
    assert verdict["figures"]["sensitivity"]["difference"] > 0.1


def write_images(tmp_path: Path, n: int = 8) -> tuple[Path, Path]:
    data = tmp_path / "data"
    rows = []
    for i in range(n):
        path = data / "src" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.random.default_rng(i).integers(0, 255, (64, 64), dtype=np.uint8))
        rows.append((f"src/{i}.png", LABELS[i % 4], f"g{i}", "src", "flair", file_sha256(path)))
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows([MANIFEST_COLUMNS, *rows])
    return data, manifest


def test_a_changed_manifest_file_is_refused(tmp_path: Path):
    data, manifest = write_images(tmp_path)
    assert len(read_manifest(manifest, data)) == 8
    cv2.imwrite(str(data / "src" / "3.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="missing or changed"):
        read_manifest(manifest, data)


def test_a_manifest_other_than_the_locked_one_is_refused(tmp_path: Path):
    data, _ = write_images(tmp_path)
    protocol = tmp_path / "protocol.toml"
    protocol.write_text(PROTOCOL.read_text().replace('path = "validation-manifest.csv"', 'path = "manifest.csv"'))
    with pytest.raises(ValueError, match="not the one the protocol locks"):
        promote(SHIPPED, SHIPPED, protocol_path=protocol, data=data)


def test_the_shipped_protocol_locks_the_committed_manifest():
    protocol = Protocol.read(PROTOCOL)
    assert protocol.manifest == MANIFEST and protocol.manifest_sha256 == file_sha256(MANIFEST)


# -- the shipped model on a small subset of the locked manifest ---------------------------------------------

needs_data = pytest.mark.skipif(not SHIPPED.is_file() or not (DATA / "lgg-tcga-t1").is_dir(),
                                reason="needs models/btd-resnet50.onnx and ../shared/data")


def subset(tmp_path: Path, per_stratum: int = 8) -> Path:
    """A few rows of each source/sequence of the locked manifest (their hashes checked as ever)."""
    with MANIFEST.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen, seen = [], {}
    for row in rows[::7]:
        key = (row["source"], row["sequence"], row["label"] == NO_TUMOUR_LABEL)
        if seen.get(key, 0) < per_stratum // 2:
            seen[key] = seen.get(key, 0) + 1
            chosen.append(row)
    out = tmp_path / "subset.csv"
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(chosen)
    return out


def degraded(path: Path, out: Path) -> Path:
    """The shipped model with its classifier rows of glioma and notumor swapped (weights and bias)."""
    meta = ModelFile.load(path).metadata
    proto = onnx.load(str(path))
    a, b = meta.labels.index("glioma"), meta.labels.index(NO_TUMOUR_LABEL)
    for init in proto.graph.initializer:
        if init.name in (meta.cam_weight, meta.cam_bias):
            values = numpy_helper.to_array(init).copy()
            axis = 0 if values.shape[0] == len(meta.labels) else -1
            values = np.swapaxes(values, 0, axis)
            values[[a, b]] = values[[b, a]]
            init.CopyFrom(numpy_helper.from_array(np.swapaxes(values, 0, axis), init.name))
    onnx.save(proto, str(out))
    return out


@needs_data
@pytest.mark.slow
@pytest.mark.data
def test_btd_promote_accepts_the_shipped_model_against_itself_and_refuses_a_degraded_one(tmp_path: Path):
    manifest = subset(tmp_path)
    common = ["--manifest", str(manifest), "--data", str(DATA), "--threads", "2"]
    same = btd(["promote", str(SHIPPED), "--against", str(SHIPPED), *common, "--out", str(tmp_path / "same")])
    worse_model = degraded(SHIPPED, tmp_path / "degraded.onnx")
    worse = btd(["promote", str(worse_model), "--against", str(SHIPPED), *common, "--out", str(tmp_path / "worse")])
    assert (same, worse) == (0, 1)
    record = json.loads((tmp_path / "worse" / "change-record.json").read_text())
    assert record["decision"] == REFUSED and "sensitivity" in record["broken"]
    assert record["candidate"]["sha256"] == file_sha256(worse_model) != record["current"]["sha256"]
    assert record["manifest"]["sha256"] == file_sha256(manifest) and record["manifest"]["images"] >= 30
    assert record["confirmed_cases"]["status"].startswith("not asked")
    accepted = json.loads((tmp_path / "same" / "change-record.json").read_text())
    assert accepted["decision"] == ACCEPTED and all(f["difference"] == 0 for f in accepted["figures"].values())
    assert "**Decision: refused**" in (tmp_path / "worse" / "change-record.md").read_text()


def test_readers_confirmed_cases_score_the_current_records_and_the_candidates_shadow(tmp_path: Path):
    import sqlalchemy as sa

    from app.engine.records.schema import FEEDBACK, RECORDS, SHADOW_COMPARISONS
    from app.engine.records.store import RecordStore
    from model_export.promote import confirmed_cases

    url = f"sqlite:///{tmp_path / 'btd.db'}"
    current, candidate = "a" * 64, "b" * 64
    bare = f"sqlite:///{tmp_path / 'no-feedback.db'}"  # a database without the records' tables
    assert confirmed_cases(bare, current, candidate, 0.95)["status"].startswith("unavailable")
    with RecordStore(url) as store:
        store.migrate()
        assert confirmed_cases(url, current, candidate, 0.95)["status"].startswith("0 confirmed cases")
        now = datetime.now(timezone.utc)
        calls, found = [True, False, True, False, True], [True, True, False, False, None]
        store.insert([{"recorded_at": now, "request_id": f"r{i}", "item": None, "transport": "http-v1",
                       "model_name": "m", "model_version": "1", "model_sha256": current, "label": "glioma",
                       "probabilities": {}, "threshold": 0.5, "assessed": True, "tumour_detected": call}
                      for i, call in enumerate(calls)])
        store.insert([{"recorded_at": now, "request_id": f"r{i}", "item": None, "live_model_version": "1",
                       "live_model_sha256": current, "shadow_model_name": "m", "shadow_model_version": "2",
                       "shadow_model_sha256": candidate, "shadow_label": "glioma", "shadow_tumour_detected": present,
                       "shadow_assessed": True, "label_agrees": True, "tumour_agrees": True}
                      for i, present in enumerate(found[:4])], SHADOW_COMPARISONS)
        ids = [r["id"] for r in store.rows(RECORDS)]
        readings = [{"prediction_id": ids[i], "reader_id": "x", "tumour_present": f} for i, f in enumerate(found[:4])]
        readings += [{"prediction_id": ids[4], "reader_id": "x", "tumour_present": True},
                     {"prediction_id": ids[4], "reader_id": "y", "tumour_present": False}]  # disagree: left out
        store.insert([{**r, "created_at": now, "updated_at": now} for r in readings], FEEDBACK)
    result = confirmed_cases(url, current, candidate, 0.95)
    assert result["status"].startswith("4 confirmed cases (1 left out")
    assert (result["current"]["cases"], result["current"]["sensitivity"], result["current"]["specificity"]) == \
        (4, 0.5, 0.5)
    assert (result["candidate"]["sensitivity"], result["candidate"]["specificity"]) == (1.0, 1.0)
    low, high = result["current"]["sensitivity_ci"]
    assert 0 < low < 0.5 < high < 1
