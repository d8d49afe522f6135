"""The released model: follows the contract, loads in the service's engine, and its card describes it."""

import re
from pathlib import Path

import numpy as np
import pytest

from app.core.contract import NO_TUMOUR_LABEL, preprocess
from app.core.model import file_sha256
from app.engine.engine import Engine, EngineOptions
from app.engine.runner import RuntimeOptions

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = MODELS / "btd-resnet50.onnx"
CARD = MODELS / "MODEL_CARD.md"

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped model in models/")


class Shipped:
    """The shipped file as the engine loads it (warm-up runs the contract checks at batch 1 and 2)."""

    def __init__(self, buckets: tuple[int, ...] = (1, 2)) -> None:
        self.engine = Engine.load(SHIPPED, EngineOptions(runtime=RuntimeOptions(buckets=buckets), variant="fp32"))
        self.metadata = self.engine.metadata
        self.cam_weights = self.engine.model.cam_weights

    def run(self, batch):
        out = self.engine.runner.run(list(batch), features=True)
        return out.logits, out.features


@pytest.fixture(scope="module")
def runner() -> Shipped:
    return Shipped()


def test_shipped_model_loads_and_passes_the_contract_warm_up(runner):
    meta = runner.metadata
    assert meta.model_name == "btd-resnet50"
    assert NO_TUMOUR_LABEL in meta.labels and len(meta.labels) == 4
    assert meta.preprocess.version in (1, 2)
    assert 0.0 < meta.tumour_threshold <= 0.5  # chosen on validation, never stricter than argmax
    assert meta.temperature > 0
    assert runner.cam_weights.shape == (4, 2048) and runner.cam_weights.dtype == np.float32


def test_shipped_model_metadata_carries_test_metrics_and_training_data(runner):
    metrics = runner.metadata.metrics
    assert metrics["images"] == 1129
    assert {"accuracy", "macro_f1", "macro_roc_auc", "tumour_sensitivity", "ece_calibrated"} <= set(metrics)
    # the release split file's test rows: the grouped test split + lgg-tcga-flair's test patients
    assert runner.metadata.training_data["per_split"]["test"] == {
        "glioma": 228 + 197, "meningioma": 261, "notumor": 367 + 197, "pituitary": 273}


def test_model_card_names_the_shipped_file_and_its_figures(runner):
    card = CARD.read_text()
    assert file_sha256(SHIPPED) in card  # the card describes this exact file
    metrics = runner.metadata.metrics
    assert f"{metrics['accuracy']:.4f}" in card and f"{metrics['macro_f1']:.4f}" in card
    assert re.search(rf"\b{runner.metadata.tumour_threshold:.3f}\b", card)


def test_shipped_model_has_an_ood_score_and_an_int8_variant_that_agrees(runner):
    meta = runner.metadata
    assert meta.preprocess.version == 2 and meta.ood is not None and meta.ood.threshold > 0
    card = CARD.read_text()
    int8_path = SHIPPED.with_name(SHIPPED.stem + "-int8.onnx")
    assert file_sha256(int8_path) in card  # the card describes the INT8 file too
    int8 = Engine.load(SHIPPED, EngineOptions(runtime=RuntimeOptions(buckets=(1, 2)), variant="int8"))
    assert int8.model.path == int8_path
    assert (int8.metadata.labels, int8.metadata.ood) == (meta.labels, meta.ood)
    assert int8.metadata.tumour_threshold == meta.tumour_threshold
    # a head-like slice: both variants give the same label and nearly the same OOD score
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    head = ((((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.33) ** 2) < 1).astype(np.float32) * 0.5
    batch = preprocess(head, meta.preprocess)[None]
    fp32_out = runner.engine.runner.run(list(batch), features=False)
    int8_out = int8.runner.run(list(batch), features=False)
    assert fp32_out.logits.argmax(1).tolist() == int8_out.logits.argmax(1).tolist()
    assert abs(float(fp32_out.ood_score[0]) - float(int8_out.ood_score[0])) < 0.1 * float(fp32_out.ood_score[0])


def test_both_shipped_files_compute_a_tumour_map_described_by_the_card(runner):
    """Release 1.2.1 = 1.2.0 + the tumour map grafted by ``btd fit-localiser`` (same decoder in both files)."""
    import onnx

    from app.core.contract import TUMOUR_MAP_NAME

    int8 = Engine.load(SHIPPED, EngineOptions(runtime=RuntimeOptions(buckets=(1,)), variant="int8"))
    card = CARD.read_text()
    for engine in (runner.engine, int8):
        meta = engine.metadata
        assert engine.model.localises and meta.localisation is not None
        assert meta.model_version == "1.2.1" and f"btd-resnet50 {meta.model_version}" in card
        assert f"threshold {meta.localisation.threshold:g}" in card
        outputs = [o.name for o in onnx.load(str(engine.model.path), load_external_data=False).graph.output]
        assert outputs == ["logits", "features", "ood_score", TUMOUR_MAP_NAME]
    assert int8.metadata.localisation == runner.metadata.localisation


def test_shipped_model_outputs_are_finite_and_depend_on_the_input(runner):
    """Not a constant model: two different slices give different logits."""
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    blob = np.exp(-((yy - 0.4) ** 2 + (xx - 0.6) ** 2) / 0.01).astype(np.float32)
    ring = (np.abs(np.hypot(yy - 0.5, xx - 0.5) - 0.35) < 0.03).astype(np.float32)
    batch = np.stack([preprocess(blob, runner.metadata.preprocess), preprocess(ring, runner.metadata.preprocess)])
    logits, features = runner.run(batch)
    assert np.isfinite(logits).all() and np.isfinite(features).all()
    assert not np.allclose(logits[0], logits[1], atol=1e-3)


@pytest.mark.data
def test_shipped_model_classifies_held_out_figshare_slices():
    from model_export.data import read_gray, shared_data_dir
    from model_export.localisation import figshare_test_rows

    if not (shared_data_dir() / "figshare-cheng" / "index.csv").is_file():
        pytest.skip("../shared/data is absent")
    rows = figshare_test_rows(shared_data_dir())[::37]  # 8 held-out slices across the three classes
    runner = Shipped(buckets=(1, 8))
    batch = np.stack([preprocess(read_gray(s.path), runner.metadata.preprocess) for s, _ in rows])
    logits, _ = runner.run(batch)
    predicted = [runner.metadata.labels[i] for i in logits.argmax(1)]
    assert sum(p == s.label for p, (s, _) in zip(predicted, rows)) >= len(rows) - 1
    assert NO_TUMOUR_LABEL not in predicted  # every figshare slice holds a tumour


@pytest.mark.data
@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_shipped_tumour_map_points_at_held_out_figshare_tumours(variant):
    """The map's peak falls inside the tumour box on most held-out figshare slices (0.25 for the CAM)."""
    from app.core.contract import TUMOUR_MAP_NAME
    from model_export.data import read_gray, shared_data_dir
    from model_export.localisation import figshare_test_rows
    from model_export.localiser import box_in_input, pointing

    if not (shared_data_dir() / "figshare-cheng" / "index.csv").is_file():
        pytest.skip("../shared/data is absent")
    import onnxruntime as ort

    from app.core.contract import frame, normalise

    engine = Engine.load(SHIPPED, EngineOptions(runtime=RuntimeOptions(buckets=(1,)), variant=variant))
    spec = engine.metadata.preprocess
    session = ort.InferenceSession(str(engine.model.path), providers=["CPUExecutionProvider"])
    rows = figshare_test_rows(shared_data_dir())[::10]  # 30 held-out slices
    hits = 0
    for sample, box in rows:
        gray = read_gray(sample.path)
        unit, framing = frame(gray, spec)
        (tumour_map,) = session.run([TUMOUR_MAP_NAME], {"image": normalise(unit, spec)[None]})
        b = box_in_input(box, framing, gray.shape[1], gray.shape[0])
        hits += pointing(tumour_map[0, 0], np.array([b.x0, b.y0, b.x1, b.y1]))
    assert hits >= 0.8 * len(rows)
