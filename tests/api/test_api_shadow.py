"""Shadow mode (app/engine/shadow.py): a candidate answers a sampled share of the live images off the
response path; its answers are never returned, only compared (metrics, shadow comparison records),
and a busy shadow skips images (counted) instead of delaying anything."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from app.engine.engine import EngineOptions
from app.engine.records.schema import SHADOW_COMPARISONS
from app.engine.records.store import RecordStore
from app.engine.shadow import Shadow, ShadowOptions
from tests.api.helpers import png_bytes, running_app
from tests.model_factory import build_model

IMAGES = 6


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def compared() -> float:
    return sample("btd_shadow_comparisons_total", check="label", result="agree") + \
        sample("btd_shadow_comparisons_total", check="label", result="disagree")


@pytest.fixture(scope="module")
def candidate(tmp_path_factory) -> Path:
    # another size: the candidate prepares the images itself (not the live model's tensors)
    return build_model(tmp_path_factory.mktemp("shadow") / "candidate.onnx", version="9.0.0-shadow", seed=7, size=48)


def answers(client) -> list[dict]:
    out = []
    for i in range(IMAGES):
        response = client.post("/v1/predict", content=png_bytes((100, 120), seed=i),
                               headers={"Content-Type": "image/png", "X-Request-ID": f"s-{i}"})
        assert response.status_code == 200
        out.append(response.json())
    return out


def test_the_shadow_is_compared_and_recorded_but_never_answers(model_path: Path, candidate: Path, tmp_path: Path):
    with running_app(model_path, records=False) as client:
        plain = answers(client)
    before = compared()
    with running_app(model_path, records_dir=tmp_path, shadow_model=candidate, shadow_share=1.0) as client:
        shadowed = answers(client)
        shadow = client.app.state.runtime.service.shadow
        deadline = time.monotonic() + 20
        while shadow.compared < IMAGES and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics_text = client.get("/metrics").text
    strip = [{k: v for k, v in a.items() if k not in ("timings_ms", "request_id")} for a in plain]
    assert strip == [{k: v for k, v in a.items() if k not in ("timings_ms", "request_id")} for a in shadowed]
    assert compared() - before == IMAGES
    assert 'btd_shadow_model_info{name="btd-test",sha256=' in metrics_text and '9.0.0-shadow' in metrics_text
    with RecordStore(f"sqlite:///{tmp_path / 'btd.db'}") as store:
        rows = store.rows(SHADOW_COMPARISONS)
        live = {r["request_id"]: r for r in store.rows()}
    assert sorted(r["request_id"] for r in rows) == [f"s-{i}" for i in range(IMAGES)]
    for row in rows:
        record = live[row["request_id"]]
        assert row["shadow_model_version"] == "9.0.0-shadow" and row["live_model_version"] == record["model_version"]
        assert row["label_agrees"] == (row["shadow_label"] == record["label"])
        assert row["tumour_agrees"] == (row["shadow_tumour_detected"] == record["tumour_detected"])


def test_a_busy_shadow_skips_images_and_counts_them(model_path: Path):
    shadow = Shadow.load(ShadowOptions(model_path, share=1.0, queue_size=1), EngineOptions())
    prepared = shadow.engine.prepare(png_bytes((100, 120)), "image/png")
    live = shadow.engine.predict(png_bytes((100, 120)), "image/png")
    release = threading.Event()
    infer = shadow.engine.infer
    shadow.engine.infer = lambda *args: (release.wait(10), infer(*args))[1]  # type: ignore[method-assign]
    busy = sample("btd_shadow_skipped_total", reason="busy")
    shadow.start()
    try:
        shadow.offer(prepared, b"", "image/png", None, live, "b-0")
        deadline = time.monotonic() + 5
        while shadow.queue.qsize() and time.monotonic() < deadline:  # the thread took it and waits in infer
            time.sleep(0.01)
        for i in range(1, 5):  # one more fits the queue, three are skipped
            shadow.offer(prepared, b"", "image/png", None, live, f"b-{i}")
        assert sample("btd_shadow_skipped_total", reason="busy") - busy == 3
        release.set()
        deadline = time.monotonic() + 10
        while shadow.compared < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert shadow.compared == 2
    finally:
        release.set()
        shadow.close()


def test_share_zero_sends_nothing_to_the_shadow(model_path: Path):
    shadow = Shadow(Shadow.load(ShadowOptions(model_path), EngineOptions()).engine, ShadowOptions(model_path, share=0.0))
    shadow.start()
    try:
        live = shadow.engine.predict(png_bytes((100, 120)), "image/png")
        prepared = shadow.engine.prepare(png_bytes((100, 120)), "image/png")
        for _ in range(20):
            shadow.offer(prepared, b"", "image/png", None, live)
        assert shadow.queue.qsize() == 0 and shadow.compared == 0
    finally:
        shadow.close()


def test_a_shadow_with_other_preprocessing_skips_dicom(model_path: Path, candidate: Path):
    from app.core.decode import DICOM

    shadow = Shadow.load(ShadowOptions(candidate, share=1.0), EngineOptions())
    live_engine = Shadow.load(ShadowOptions(model_path), EngineOptions()).engine
    prepared = live_engine.prepare(png_bytes((100, 120)), "image/png")
    live = live_engine.predict(png_bytes((100, 120)), "image/png")
    skipped = sample("btd_shadow_skipped_total", reason="dicom")
    shadow.start()
    try:
        shadow.offer(prepared, b"DICM bytes", "application/dicom", DICOM, live)
        assert sample("btd_shadow_skipped_total", reason="dicom") - skipped == 1 and shadow.queue.qsize() == 0
    finally:
        shadow.close()
