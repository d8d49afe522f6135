"""Issue 25's acceptance test for drift, on the shipped model (INT8, what the CPU serves) and real slices:
after grouped-test traffic (brain-mri-4class's grouped test split: the population the model was
validated on) the LGG T1 post-contrast test slices (a sequence the 1.2.0 model never saw) raise the
drift alert within 200 requests, and the grouped-test traffic alone raises none.

Every image goes through POST /v1/predict; its record is written by the service's writer; drift is
read back from GET /v1/monitoring (refreshed after each chunk rather than every BTD_DRIFT_INTERVAL_S)."""

from __future__ import annotations

import contextlib
import csv
import random
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import SQLAlchemyError

from app.engine.records.store import RecordStore
from model_export.data import shared_data_dir
from tests.api.helpers import running_app

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "btd-resnet50.onnx"
GROUPED_REQUESTS = 200  # one full drift window of the validated population
MAX_LGG_REQUESTS = 200  # the alert must come within this many
CHUNK = 25  # requests between two drift readings


def grouped_test(data: Path) -> list[Path]:
    with (data / "brain-mri-4class" / "splits.csv").open(newline="") as fh:
        return [data / "brain-mri-4class" / r["path"] for r in csv.DictReader(fh) if r["split"] == "test"]


def lgg_t1post_test(data: Path) -> list[Path]:
    with (data / "lgg-tcga-t1" / "index.csv").open(newline="") as fh:
        return [data / "lgg-tcga-t1" / r["path"] for r in csv.DictReader(fh)
                if r["split"] == "test" and r["sequence"] == "t1post"]


def shuffled(paths: list[Path], count: int) -> list[Path]:
    """``count`` of ``paths`` in a fixed random order (traffic mixes classes and patients)."""
    chosen = list(paths)
    random.Random(25).shuffle(chosen)
    return chosen[:count]


@pytest.fixture(scope="module")
def data() -> Path:
    data = shared_data_dir()
    if not (data / "brain-mri-4class" / "splits.csv").is_file() or not (data / "lgg-tcga-t1" / "index.csv").is_file():
        pytest.skip(f"the shared data set ({data}: brain-mri-4class, lgg-tcga-t1) is absent")
    if not SHIPPED.with_name("btd-resnet50-int8.onnx").is_file():
        pytest.skip("no shipped INT8 model in models/")
    return data


class Replay:
    """Posts images to the running app and reads drift back once their records are written."""

    def __init__(self, client, records_url: str) -> None:
        self.client, self.store, self.sent = client, RecordStore(records_url), 0

    def post(self, paths: list[Path]) -> None:
        for path in paths:
            response = self.client.post("/v1/predict", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200, response.text
        self.sent += len(paths)

    def drift(self) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the writer batches rows off the request path
            with contextlib.suppress(SQLAlchemyError):
                if self.store.count() >= self.sent:
                    break
            time.sleep(0.05)
        assert self.store.count() == self.sent
        self.client.app.state.monitor.refresh()
        response = self.client.get("/v1/monitoring")
        assert response.status_code == 200
        return response.json()["drift"]


def test_lgg_t1_post_contrast_slices_raise_the_drift_alert_after_grouped_test_traffic(data, tmp_path):
    grouped, lgg = shuffled(grouped_test(data), GROUPED_REQUESTS), shuffled(lgg_t1post_test(data), MAX_LGG_REQUESTS)
    assert len(grouped) == GROUPED_REQUESTS and len(lgg) == MAX_LGG_REQUESTS
    with running_app(SHIPPED, model_variant="int8", records_dir=tmp_path, drift_interval_s=3600,
                     audit_log="off") as client:
        replay = Replay(client, f"sqlite:///{tmp_path / 'btd.db'}")
        calm = []
        for start in range(0, GROUPED_REQUESTS, CHUNK * 2):
            replay.post(grouped[start : start + CHUNK * 2])
            calm.append(replay.drift())
        assert calm[-1]["status"] == "ok" and calm[-1]["window_records"] == GROUPED_REQUESTS
        assert [d["alert"] for d in calm] == [False] * len(calm), [
            {name: s["psi"] for name, s in d["signals"].items()} for d in calm]

        alerted_after = None
        for start in range(0, MAX_LGG_REQUESTS, CHUNK):
            replay.post(lgg[start : start + CHUNK])
            drift = replay.drift()
            if drift["alert"]:
                alerted_after = start + CHUNK
                break
        replay.store.close()
    assert alerted_after is not None, {name: s["psi"] for name, s in drift["signals"].items()}
    assert drift["status"] == "alert"
    over = [name for name, s in drift["signals"].items() if s["over_threshold"]]
    assert over and all(drift["signals"][name]["psi"] > drift["rule"]["psi_threshold"] for name in over)
    full = [d for d in calm if d["window_records"] >= d["rule"]["min_records"]]  # where the rule applies
    calm_psi = {name: max(d["signals"][name]["psi"] for d in full) for name in calm[-1]["signals"]}
    print(f"grouped test alone, highest PSI per signal with {full[0]['window_records']}+ answers: {calm_psi}; drift alert after {alerted_after} LGG T1 "
          f"post-contrast requests, over the threshold: { {n: drift['signals'][n]['psi'] for n in over} }")
