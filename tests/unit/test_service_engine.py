"""The inference core: only bucket shapes reach a session (under random concurrent load), padding
never reaches a result, batched results equal unbatched ones, features are fetched only for a CAM,
the model's out-of-distribution output, a localising model's tumour map and region, and which model
file (variant) is served."""

import asyncio
import random
import shutil

import cv2
import numpy as np
import onnx
import pytest

from app.core.contract import (
    META_LOCALISATION,
    TUMOUR_MAP_NAME,
    LocalisationSpec,
    ModelMetadata,
    PreprocessSpec,
)
from app.core.model import ModelFile, variant_path
from app.engine.batcher import MicroBatcher
from app.engine.engine import Engine, EngineOptions, choose_model_file
from app.engine.runner import Runner, RuntimeOptions
from tests.model_factory import LABELS, build_model, tumour_slice_png

SIZE, CHANNELS, FEAT = 8, 5, 2


class RecordingSession:
    """A fake ORT session that records every input shape, its padding rows and the outputs asked for.
    logits[i, c] = (c + 1) * the mean of image i, so every result can be traced to its input."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.output_names: list[tuple[str, ...]] = []
        self.batches: list[np.ndarray] = []

    def run(self, output_names, input_feed):
        x = input_feed["image"]
        self.shapes.append(x.shape)
        self.output_names.append(tuple(output_names))
        self.batches.append(x.copy())
        mean = x.reshape(len(x), -1).mean(axis=1)
        values = {
            "logits": np.stack([mean * (c + 1) for c in range(len(LABELS))], axis=1).astype(np.float32),
            "features": np.repeat(mean[:, None, None, None], CHANNELS, 1).repeat(FEAT, 2).repeat(FEAT, 3),
        }
        return [values[name] for name in output_names]

    def get_providers(self):
        return ["CPUExecutionProvider"]


def fake_engine(buckets=(1, 2, 4, 8)) -> tuple[Engine, RecordingSession]:
    meta = ModelMetadata(labels=LABELS, preprocess=PreprocessSpec(size=SIZE), cam_weight="w", cam_bias="b")
    model = ModelFile(path=None, metadata=meta, cam_weights=np.ones((len(LABELS), CHANNELS), np.float32),
                      outputs=("logits", "features"), sha256="0" * 64)
    session = RecordingSession()
    runner = Runner(model, {b: session for b in buckets}, tuple(buckets))
    return Engine(model, runner, EngineOptions()), session


def tensor(value: float) -> np.ndarray:
    return np.full((3, SIZE, SIZE), value, np.float32)


def test_only_bucket_shapes_reach_the_session_under_random_concurrent_load():
    engine, session = fake_engine()
    rng = random.Random(0)
    real_sizes: list[int] = []

    def infer(tensors, features):
        real_sizes.append(len(tensors))
        return engine.infer(tensors, features)

    async def client(batcher: MicroBatcher, i: int, delay: float):
        await asyncio.sleep(delay)
        return i, await batcher.submit(tensor(i + 1), features=rng.random() < 0.5)

    async def main():
        batcher = MicroBatcher(infer, max_batch_size=8, max_wait_s=0.002)
        batcher.start()
        # Concurrent clients in random bursts of 1-12 (a burst above 8 spills into the next batch),
        # the bursts apart by more than the batcher's wait, so batches of every size form.
        jobs, start, i = [], 0.0, 0
        while i < 300:
            burst = rng.randint(1, 12)
            jobs += [client(batcher, i + k, start + rng.uniform(0, 0.001)) for k in range(burst)]
            i, start = i + burst, start + 0.03
        results = await asyncio.gather(*jobs)
        await batcher.close(2)
        return results

    results = asyncio.run(main())
    assert {shape[0] for shape in session.shapes} <= {1, 2, 4, 8}  # nothing but bucket shapes
    assert all(shape[1:] == (3, SIZE, SIZE) for shape in session.shapes)
    assert set(real_sizes) - {1, 2, 4, 8}, real_sizes  # the load did make batches that needed padding
    assert sum(real_sizes) == len(results) >= 300
    for i, output in results:  # each result is its own image's, never a padding row's
        np.testing.assert_allclose(output.logits, [(c + 1) * (i + 1) for c in range(len(LABELS))], rtol=1e-6)


def test_padding_rows_are_zeros_and_are_dropped():
    engine, session = fake_engine()
    engine.infer([tensor(7), tensor(7), tensor(7), tensor(7), tensor(7)], [False] * 5)  # bucket 8, 3 padding rows
    outputs = engine.infer([tensor(2), tensor(3), tensor(4)], [False] * 3)  # bucket 4: one padding row
    assert [s[0] for s in session.shapes] == [8, 4]
    assert len(outputs) == 3 and [float(o.logits[0]) for o in outputs] == [2.0, 3.0, 4.0]
    assert not session.batches[0][5:].any() and not session.batches[1][3:].any()  # no earlier pixels in padding


def test_batched_results_equal_unbatched_results_with_a_real_model(tmp_path):
    engine = Engine.load(build_model(tmp_path / "m.onnx", seed=3), EngineOptions(runtime=RuntimeOptions(buckets=(1, 2, 4, 8))))
    rng = np.random.default_rng(0)
    images = list(rng.normal(size=(13, 3, 32, 32)).astype(np.float32))
    start = 0
    for n in (5, 1, 7):
        batch = images[start:start + n]
        together = engine.infer(batch, [True] * n)
        for image, out in zip(batch, together):
            (alone,) = engine.infer([image], [True])
            np.testing.assert_allclose(out.logits, alone.logits, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out.features, alone.features, rtol=1e-5, atol=1e-6)
        start += n


def test_features_are_not_fetched_when_no_request_wants_a_cam():
    engine, session = fake_engine()
    outputs = engine.infer([tensor(1), tensor(2)], [False, False])
    assert session.output_names[-1] == ("logits",) and all(o.features is None for o in outputs)
    outputs = engine.infer([tensor(1), tensor(2)], [False, True])  # one CAM in the batch: fetched, given to it only
    assert session.output_names[-1] == ("logits", "features")
    assert outputs[0].features is None and outputs[1].features.shape == (CHANNELS, FEAT, FEAT)


def head_png(shape=(140, 120)) -> bytes:
    img = np.zeros(shape, np.uint8)
    cv2.ellipse(img, (shape[1] // 2, shape[0] // 2), (shape[1] // 3, shape[0] // 3), 0, 0, 360, 200, -1)
    return cv2.imencode(".png", img)[1].tobytes()


def test_predict_for_cam_none_fetches_no_features(tmp_path):
    engine = Engine.load(build_model(tmp_path / "m.onnx"))
    fetched: list[bool] = []
    run = engine.runner.run
    engine.runner.run = lambda tensors, features: fetched.append(features) or run(tensors, features=features)
    engine.predict(head_png(), cam="none")
    engine.predict(head_png(), cam="grid")
    assert fetched == [False, True]


@pytest.mark.parametrize("threshold,in_distribution", [(1e9, True), (-1.0, False)])
def test_the_model_ood_output_is_read_and_decides(tmp_path, threshold, in_distribution):
    engine = Engine.load(build_model(tmp_path / "m.onnx", ood_threshold=threshold))
    result = engine.predict(head_png(), cam="grid")
    assert isinstance(result.ood_score, float) and result.in_distribution is in_distribution
    if in_distribution:
        assert result.tumour_detected is not None and result.warnings == []
    else:
        assert result.tumour_detected is None and result.ood_reasons == ["model"]
        assert any("does not look like a brain MR slice" in w for w in result.warnings)
    assert engine.describe()["ood"]["threshold"] == threshold


def test_ood_scores_of_a_batch_belong_to_their_images(tmp_path):
    engine = Engine.load(build_model(tmp_path / "m.onnx", ood_threshold=0.0),
                         EngineOptions(runtime=RuntimeOptions(buckets=(1, 4))))
    images = [np.full((3, 32, 32), v, np.float32) for v in (-3.0, 0.5, 2.0)]
    together = engine.infer(images, [False] * 3)
    alone = [engine.infer([image], [False])[0] for image in images]
    assert [o.ood_score for o in together] == pytest.approx([o.ood_score for o in alone], rel=1e-5)
    assert len({round(o.ood_score, 4) for o in together}) == 3


def test_auto_variant_serves_the_int8_file_beside_the_model_on_the_cpu(tmp_path):
    fp32 = build_model(tmp_path / "m.onnx", version="1.0.0")
    assert choose_model_file(fp32, "auto", on_gpu=False) == (fp32, "fp32")
    int8 = build_model(variant_path(fp32, "int8"), version="1.0.0-int8", seed=9)  # stands in for btd quantize's file
    assert int8.name == "m-int8.onnx"
    engine = Engine.load(fp32)
    assert engine.variant == "int8" and engine.metadata.model_version == "1.0.0-int8"
    assert engine.describe()["variant"] == "int8"
    assert Engine.load(fp32, EngineOptions(variant="fp32")).metadata.model_version == "1.0.0"
    assert choose_model_file(fp32, "auto", on_gpu=True) == (fp32, "fp32")  # a GPU takes fp16, not int8
    shutil.copy(fp32, variant_path(fp32, "fp16"))
    assert choose_model_file(fp32, "auto", on_gpu=True) == (variant_path(fp32, "fp16"), "fp16")


def test_an_explicit_variant_must_exist(tmp_path):
    fp32 = build_model(tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="m-int8.onnx"):
        Engine.load(fp32, EngineOptions(variant="int8"))


def test_the_batch_wait_is_zero_on_the_cpu_unless_set(tmp_path):
    from app.engine.service import GPU_MAX_WAIT_S, InferenceService, ServiceOptions, auto_max_wait_s

    engine = Engine.load(build_model(tmp_path / "m.onnx"), EngineOptions(runtime=RuntimeOptions(intra_op_threads=1)))
    for options, wait_ms in ((ServiceOptions(host_workers=0), 0.0), (ServiceOptions(host_workers=0, max_wait_s=0.003), 3.0)):
        service = InferenceService(engine, options)
        try:
            assert service.batcher.max_wait_s * 1000 == pytest.approx(wait_ms)
            assert service.describe()["max_wait_ms"] == pytest.approx(wait_ms)
        finally:
            service.host.close()
    assert auto_max_wait_s(on_gpu=True) == GPU_MAX_WAIT_S == 0.005


LOCALISATION = LocalisationSpec(threshold=0.5, min_area=0.002)


def test_a_localising_model_gives_the_region_of_its_map_from_the_same_pass(tmp_path):
    engine = Engine.load(build_model(tmp_path / "m.onnx", size=64, localisation=LOCALISATION),
                         EngineOptions(tumour_threshold=0.0))  # every assessed image is a called tumour
    runs: list[bool] = []
    run = engine.runner.run
    engine.runner.run = lambda tensors, features: runs.append(features) or run(tensors, features=features)
    for (x, y) in ((200, 100), (130, 160)):
        result = engine.predict(tumour_slice_png(blob=(x, y)), cam="none")
        box = result.region.box
        assert box.x <= x - 15 and x + 15 <= box.x + box.width and box.y <= y - 15 and y + 15 <= box.y + box.height
        assert box.width < 80 and box.height < 80  # the disc, not the head
        assert abs(result.region.peak.x - x) < 12 and abs(result.region.peak.y - y) < 12
    assert runs == [False, False]  # one run an image, no features fetched for it
    assert engine.describe()["localisation"] == {"threshold": 0.5, "min_area": 0.002}


def test_a_tumour_map_without_its_metadata_is_not_fetched_and_gives_no_region(tmp_path, caplog):
    path = build_model(tmp_path / "m.onnx", size=64, localisation=LOCALISATION)
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != META_LOCALISATION]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(path))
    with caplog.at_level("WARNING", logger="app.engine.engine"):
        engine = Engine.load(path, EngineOptions(tumour_threshold=0.0))
    assert "has tumour_map output but not btd.localisation metadata" in caplog.text
    assert not engine.model.localises and TUMOUR_MAP_NAME not in engine.runner._names(True)
    result = engine.predict(tumour_slice_png())
    assert result.tumour_detected is True and result.region is None and engine.describe()["localisation"] is None


def test_tumour_maps_of_a_batch_belong_to_their_images(tmp_path):
    engine = Engine.load(build_model(tmp_path / "m.onnx", localisation=LOCALISATION),
                         EngineOptions(runtime=RuntimeOptions(buckets=(1, 4))))
    images = [np.full((3, 32, 32), v, np.float32) for v in (-2.0, 0.0, 2.0)]
    together = engine.infer(images, [False] * 3)
    alone = [engine.infer([image], [False])[0] for image in images]
    for a, b in zip(together, alone):
        assert a.tumour_map.shape == (8, 8)
        np.testing.assert_allclose(a.tumour_map, b.tumour_map, rtol=1e-5)
    assert together[0].tumour_map.max() < 0.5 < together[2].tumour_map.min()
