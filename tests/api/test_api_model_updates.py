"""Model updates while serving (app/engine/reload.py): a new version in a model directory is loaded
beside the live model and swapped in under load without a failed request; every answer and record
names the model that made it; a bad candidate is refused and the live model stays."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from app.core.model import resolve_model_path
from app.engine.records.store import RecordStore
from tests.api.helpers import png_bytes, running_app
from tests.model_factory import build_model

CLIENTS = 16
SWAPS = 4


def point_current(models: Path, target: str) -> None:
    """Repoint ``models/current`` atomically (a new link renamed over the old), as a deployment would."""
    link = models / ".current.new"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    os.replace(link, models / "current")


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    build_model(folder / "btd-1.onnx", version="1.0.0-test", seed=1)
    build_model(folder / "btd-2.onnx", version="2.0.0-test", seed=2)
    point_current(folder, "btd-1.onnx")
    return folder


def reload(client) -> str:
    return client.portal.call(client.app.state.runtime.reloader.reload)


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("btd_model_reloads_total", {"result": result}) or 0.0


def model_info_versions() -> set[str]:
    return {s.labels["version"] for m in REGISTRY.collect() if m.name == "btd_model_info" for s in m.samples
            if s.value == 1}


def test_resolve_model_path_takes_current_then_the_newest_file(tmp_path: Path):
    folder = tmp_path / "m"
    old = build_model(folder / "a.onnx")
    new = build_model(folder / "b.onnx")
    build_model(folder / "b-int8.onnx")  # a variant is never chosen itself
    os.utime(old, (1, 1))
    os.utime(folder / "b-int8.onnx", (2**31, 2**31))
    assert resolve_model_path(folder) == new.resolve()
    point_current(folder, "a.onnx")
    assert resolve_model_path(folder) == old.resolve()


def test_swaps_under_16_clients_fail_no_request_and_records_name_the_answering_model(models: Path,
                                                                                      tmp_path: Path):
    image = png_bytes((120, 140), seed=3)
    answers: list[tuple[int, str | None, str]] = []  # (status, model version, request id)
    stop = threading.Event()
    swapped_before = reloads("swapped")
    with running_app(models, records_dir=tmp_path / "records") as client:
        def hammer(worker: int) -> None:
            n = 0
            while not stop.is_set():
                request_id = f"w{worker}-{n}"
                response = client.post("/v1/predict", content=image,
                                       headers={"Content-Type": "image/png", "X-Request-ID": request_id})
                version = response.json()["model"]["version"] if response.status_code == 200 else None
                answers.append((response.status_code, version, request_id))
                n += 1

        with ThreadPoolExecutor(CLIENTS) as pool:
            for worker in range(CLIENTS):
                pool.submit(hammer, worker)
            results = []
            for swap in range(SWAPS):
                time.sleep(0.3)
                point_current(models, "btd-2.onnx" if swap % 2 == 0 else "btd-1.onnx")
                results.append(reload(client))
            time.sleep(0.3)
            stop.set()
        live = client.get("/v1/model").json()["version"]
        metrics_text = client.get("/metrics").text
    assert results == ["swapped"] * SWAPS
    assert reloads("swapped") - swapped_before == SWAPS
    statuses = [status for status, _, _ in answers]
    assert len(answers) > CLIENTS * 2 and statuses.count(200) == len(statuses), set(statuses)
    assert {version for _, version, _ in answers} == {"1.0.0-test", "2.0.0-test"}
    info = [line for line in metrics_text.splitlines() if line.startswith("btd_model_info{")]
    assert live == "1.0.0-test" and len(info) == 1 and 'version="1.0.0-test"' in info[0]
    with RecordStore(f"sqlite:///{tmp_path / 'records' / 'btd.db'}") as store:
        recorded = {row["request_id"]: row["model_version"] for row in store.rows()}
    answered = {request_id: version for _, version, request_id in answers}
    assert recorded == answered  # each record names the model that answered, swap or not


def test_a_corrupt_or_incompatible_candidate_is_refused_and_the_live_model_stays(models: Path):
    (models / "btd-3.onnx").write_bytes(b"\x08\x07 not an onnx model")
    build_model(models / "btd-4.onnx", labels=("a", "b"), version="4.0.0-test")
    image = png_bytes((120, 140), seed=4)
    with running_app(models) as client:
        refused_before = reloads("refused")
        point_current(models, "btd-3.onnx")
        corrupt = reload(client)
        point_current(models, "btd-4.onnx")
        other_labels = reload(client)
        point_current(models, "btd-1.onnx")
        unchanged = reload(client)
        answer = client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
        ready = client.get("/readyz").status_code
    assert (corrupt, other_labels, unchanged) == ("refused", "refused", "unchanged")
    assert reloads("refused") - refused_before == 2
    assert ready == 200 and answer.status_code == 200 and answer.json()["model"]["version"] == "1.0.0-test"
    assert model_info_versions() == {"1.0.0-test"}


def test_the_watch_swaps_in_a_model_file_replaced_in_place(tmp_path: Path):
    path = build_model(tmp_path / "live" / "btd.onnx", version="1.0.0-test", seed=1)
    staged = build_model(tmp_path / "staged.onnx", version="2.0.0-test", seed=2)
    with running_app(path, model_watch=True) as client:
        time.sleep(0.5)  # the watch is started after the model is ready
        os.replace(staged, path)  # an atomic replacement, as README asks for
        deadline = time.monotonic() + 20
        while client.get("/v1/model").json()["version"] != "2.0.0-test" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/v1/model").json()["version"] == "2.0.0-test"
