"""End to end on a small subset: train one short epoch (+ resume to a second), evaluate the
checkpoint, export, evaluate the ONNX file, and run it in ONNX Runtime. Real images from
../shared/data when present, synthetic ones otherwise. Also DDP with two gloo processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from app.core.contract import INPUT_NAME, LOGITS_NAME, ModelMetadata, preprocess
from model_export import cli, pretrained
from model_export.data import read_gray, shared_data_dir
from tests.export.synthetic_mri import write_image_folder, write_split_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def dataset_args(tmp_path: Path) -> list[str]:
    """Real brain-mri-4class with its split file if present, else a synthetic ImageFolder tree
    (split by near-duplicate grouping)."""
    real = shared_data_dir() / "brain-mri-4class"
    if (real / "splits.csv").exists():
        return ["--data", str(real), "--split-file", str(real / "splits.csv"), "--limit-per-class", "4"]
    write_image_folder(tmp_path / "synthetic", per_class=12, size=96)
    return ["--data", str(tmp_path / "synthetic")]


def pretrained_args() -> list[str]:
    try:
        pretrained.fetch_tarball()
        return []
    except pretrained.PretrainedUnavailable:
        return ["--no-pretrained"]


def read_probabilities(path: Path) -> np.ndarray:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return np.array([[float(v) for k, v in row.items() if k.startswith("p_")] for row in rows])


def test_train_evaluate_export_run_end_to_end(tmp_path: Path) -> None:
    data = dataset_args(tmp_path)
    run = tmp_path / "run"
    common = ["--image-size", "64", "--batch-size", "8", "--views", "1", "--threads", "2",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(run)]
    assert cli.main(["train", *data, *pretrained_args(), *common, "--epochs", "1"]) == 0
    assert cli.main(["train", *data, *pretrained_args(), *common, "--epochs", "2",
                     "--resume", str(run / "last.pt")]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    assert cli.main(["evaluate", str(run / "best.pt"), *data, "--out", str(tmp_path / "eval-ckpt")]) == 0
    onnx_path = tmp_path / "model.onnx"
    assert cli.main(["export", str(run / "best.pt"), "--out", str(onnx_path), "--fp16-weights",
                     "--report", str(tmp_path / "eval-ckpt" / "report.json"), "--version", "0.1.0"]) == 0
    assert cli.main(["evaluate", str(onnx_path), *data, "--out", str(tmp_path / "eval-onnx")]) == 0

    ckpt_report = json.loads((tmp_path / "eval-ckpt" / "report.json").read_text())
    onnx_report = json.loads((tmp_path / "eval-onnx" / "report.json").read_text())
    for report in (ckpt_report, onnx_report):
        for key in ("accuracy", "macro_f1", "weighted_f1", "macro_roc_auc", "ece", "ece_calibrated",
                    "confusion_matrix", "per_class", "temperature"):
            assert key in report
        assert report["images"] > 0
    for name in ("report.md", "confusion_matrix.png", "roc_curves.png"):
        assert (tmp_path / "eval-onnx" / name).stat().st_size > 0
    # The shipped file scores what the checkpoint scores (float16 weights move probabilities a little).
    np.testing.assert_allclose(read_probabilities(tmp_path / "eval-onnx" / "predictions.csv"),
                               read_probabilities(tmp_path / "eval-ckpt" / "predictions.csv"), atol=0.02)

    proto = onnx.load(str(onnx_path))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.metrics["accuracy"] == pytest.approx(ckpt_report["accuracy"])
    assert meta.training_data["images"] > 0 and meta.model_version == "0.1.0"
    first_image = next(csv.DictReader((tmp_path / "eval-onnx" / "predictions.csv").open()))["path"]
    x = preprocess(read_gray(Path(first_image)), meta.preprocess)[None]
    logits = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        [LOGITS_NAME], {INPUT_NAME: x})[0]
    assert logits.shape == (1, len(meta.labels)) and np.isfinite(logits).all()


def test_ddp_training_with_two_gloo_processes(tmp_path: Path) -> None:
    paths = write_image_folder(tmp_path / "imgs", per_class=6, size=64)
    split_file = write_split_file(tmp_path / "imgs", paths, tmp_path / "splits.csv")
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "model_export.cli", "train", "--data", str(tmp_path / "imgs"), "--split-file", str(split_file),
           "--no-pretrained", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
           "--feature-cache", "on", "--views", "2", "--threads", "1", "--cache-dir", str(cache),
           "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "best.pt").exists()
    assert "x2" in done.stderr  # the run saw two processes
    # Each rank filled its share of the shared train cache: no row left as zeros.
    arrays = [np.load(p, mmap_mode="r") for p in cache.glob("*/layer3.f16")]
    train = max(arrays, key=len)
    assert len(train) == 12 * 2
    assert all(np.abs(np.asarray(row, dtype=np.float32)).sum() > 0 for row in train)


def test_training_on_images_without_the_cache_updates_layer3(tmp_path: Path) -> None:
    """The image path (GPU-style, no feature cache) with SGD + one-cycle and a trainable layer3."""
    paths = write_image_folder(tmp_path / "imgs", per_class=4, size=48)
    split_file = write_split_file(tmp_path / "imgs", paths, tmp_path / "splits.csv")
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "imgs"), "--split-file", str(split_file), "--no-pretrained",
            "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--freeze", "layer3", "--feature-cache",
            "off", "--optimizer", "sgd", "--schedule", "onecycle", "--lr", "0.05", "--deterministic",
            "--threads", "2", "--out", str(run)]
    assert cli.main(args) == 0
    ckpt = torch.load(run / "last.pt", weights_only=False)
    torch.manual_seed(0)
    from model_export.resnet import ResNet50

    initial = ResNet50(4, dropout=0.2).state_dict()
    changed = {k.split(".")[0] for k, v in ckpt["model"].items() if v.dtype.is_floating_point
               and "running" not in k and not torch.equal(v, initial[k])}
    assert changed == {"layer3", "layer4", "fc"}
    assert ckpt["args"]["optimizer"] == "sgd" and ckpt["args"]["freeze"] == "layer3"
