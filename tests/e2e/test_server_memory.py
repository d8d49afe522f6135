"""Legal but heavy requests against the real server (``python -m app``, CPU defaults): memory stays
bounded by the decode budget and returns after bursts, a decoder that holds the GIL runs in a worker
process so /livez keeps answering, and a worker's time and memory limits turn a runaway decode into
a 422 or 413 without hurting the server. Each test asserts status, time, peak resident memory of the
server's process tree (Linux VmHWM) and the worst /livez latency; figures go to
test-artifacts/hostile/memory.json.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import ServerProcess, dicom_testfile
from tests.e2e.test_hostile_server import LIVEZ_WORST_S
from tests.hostile_inputs import large_colour_png, large_jpeg2000_dicom
from tests.model_factory import build_model
from tests.process_watch import LivezWatch, Memory

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Memory.supported(), reason="needs Linux /proc (VmHWM, clear_refs)")]

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "test-artifacts" / "hostile" / "memory.json"
SINGLE_REQUEST_LIMIT_MB = 1024  # issue 12: no single request takes the server above 1 GiB
# The CPU pod's limit is 2 GiB; the shipped model weighs ~250 MiB more than the test model.
CONCURRENT_LIMIT_MB = 2048 - 256
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "btd-test.onnx")


@pytest.fixture(scope="module")
def server(model) -> Iterator[ServerProcess]:
    with ServerProcess(model, BTD_INTRA_OP_THREADS="1", BTD_AUDIT_LOG="off") as srv:
        yield srv
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(RESULTS, indent=1) + "\n")
    print("\n" + "\n".join(f"{r['case']:<52} {r['statuses']:<14} {r['seconds']:6.1f} s  peak {r['peak_mb']:6.0f} MiB "
                           f"(from {r['before_mb']:.0f})  livez worst {r['livez_worst_s']:.3f} s" for r in RESULTS))


def measure(case: str, server: ServerProcess, run, *, limit_mb: float) -> dict:
    memory = Memory(server.proc.pid)
    with LivezWatch(server.url) as watch:
        time.sleep(0.3)
        before = memory.rss_mb()
        memory.reset_peak()
        watch.reset()
        started = time.perf_counter()
        statuses = run()
        seconds = time.perf_counter() - started
        time.sleep(0.1)
        peak, worst = memory.peak_mb(), watch.current_worst_s()
    result = {"case": case, "statuses": ",".join(f"{s}x{statuses.count(s)}" for s in sorted(set(statuses))),
              "seconds": round(seconds, 2), "before_mb": round(before), "peak_mb": round(peak),
              "livez_worst_s": round(worst, 3), "livez_failures": watch.failures}
    RESULTS.append(result)
    assert peak < limit_mb, result
    assert worst < LIVEZ_WORST_S and watch.failures == 0, result
    return result


def test_a_batch_of_16_large_colour_pngs_stays_under_1_gib(server):
    png = large_colour_png()
    files = [("files", (f"{i}.png", png, "image/png")) for i in range(16)]

    def run() -> list[int]:
        response = httpx.post(server.url + "/v1/predict/batch", files=files, timeout=300)
        assert response.status_code == 200, response.text[:500]
        return [200 if item["ok"] else item["problem"]["status"] for item in response.json()["results"]]

    result = measure("batch of 16 RGB PNGs 4096x4096 (22 MB)", server, run, limit_mb=SINGLE_REQUEST_LIMIT_MB)
    assert result["statuses"] == "200x16"  # the batch's files wait for the budget; none is refused


def test_concurrent_large_requests_stay_within_the_cpu_pods_memory(server):
    png, statuses, lock = large_colour_png(), [], threading.Lock()

    def client() -> None:
        response = httpx.post(server.url + "/v1/predict", content=png, headers={"Content-Type": "image/png"},
                              timeout=300)
        assert response.status_code in (200, 503), response.text[:300]
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
        with lock:
            statuses.append(response.status_code)

    def run() -> list[int]:
        threads = [threading.Thread(target=client) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        return statuses

    result = measure("24 concurrent RGB PNGs 4096x4096", server, run, limit_mb=CONCURRENT_LIMIT_MB)
    assert statuses.count(200) >= 1 and len(statuses) == 24, result


def test_a_large_jpeg2000_dicom_decodes_in_a_worker_without_stalling_livez(server):
    """OpenJPEG holds the GIL ~1.5 s on this file: in a thread of the server /livez would wait as long."""
    data = large_jpeg2000_dicom()

    def run() -> list[int]:
        codes = []
        for _ in range(3):
            response = httpx.post(server.url + "/v1/predict", content=data,
                                  headers={"Content-Type": "application/dicom"}, timeout=120)
            assert response.status_code == 200, response.text[:300]
            codes.append(response.status_code)
        return codes

    assert httpx.get(server.url + "/v1/model").json()["isolated_decoders"] == "dicom"
    measure("3 JPEG 2000 DICOMs 3072x3072 (7 MB), one by one", server, run, limit_mb=SINGLE_REQUEST_LIMIT_MB)


def test_memory_is_flat_and_returns_after_bursts(server):
    """Soak: rounds of bursts (12 concurrent large PNGs, a batch of 8, DICOMs), the server's resident
    memory read after each round once idle: back near where it started, and not growing."""
    memory = Memory(server.proc.pid)
    png, dicom = large_colour_png(2048), large_jpeg2000_dicom()
    time.sleep(0.5)
    baseline = memory.rss_mb()
    after_rounds, statuses = [], []

    def burst() -> None:
        def one(i: int) -> None:
            if i % 4 == 3:
                response = httpx.post(server.url + "/v1/predict", content=dicom,
                                      headers={"Content-Type": "application/dicom"}, timeout=120)
            else:
                response = httpx.post(server.url + "/v1/predict?cam=png", content=png,
                                      headers={"Content-Type": "image/png"}, timeout=120)
            statuses.append(response.status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        batch = httpx.post(server.url + "/v1/predict/batch", timeout=300,
                           files=[("files", (f"{i}.png", png, "image/png")) for i in range(8)])
        statuses.append(batch.status_code)
        for thread in threads:
            thread.join(300)

    def run() -> list[int]:
        for _ in range(4):
            burst()
            time.sleep(2.0)  # idle: what the server keeps between bursts
            after_rounds.append(memory.rss_mb())
        return statuses

    result = measure("soak: 4 rounds of 12 requests + a batch of 8", server, run, limit_mb=SINGLE_REQUEST_LIMIT_MB)
    result.update(baseline_mb=round(baseline), after_rounds_mb=[round(m) for m in after_rounds])
    # Above capacity the admission answers 503 + Retry-After (fast), never anything else.
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 4, result
    assert max(after_rounds) - baseline < 150, result  # returned after each burst
    assert max(after_rounds) - min(after_rounds) < 60, result  # and flat from round to round


def test_worker_limits_turn_a_runaway_decode_into_a_422_or_413_and_the_server_goes_on(model):
    data = large_jpeg2000_dicom()
    small = dicom_testfile("MR_small.dcm")
    cases = {"time": ({"BTD_HOST_TASK_TIMEOUT_S": "0.3"}, 422, "decode-too-costly"),
             "memory": ({"BTD_HOST_MEMORY_LIMIT_BYTES": str(640 * 2**20)}, 413, "payload-too-large")}
    for name, (settings, status, slug) in cases.items():
        with ServerProcess(model, BTD_INTRA_OP_THREADS="1", BTD_AUDIT_LOG="off", **settings) as server:
            def run(status=status, slug=slug) -> list[int]:
                response = httpx.post(server.url + "/v1/predict", content=data,
                                      headers={"Content-Type": "application/dicom"}, timeout=120)
                assert response.status_code == status and response.json()["type"] == f"/problems/{slug}", \
                    response.text[:300]
                # The worker was replaced: a small DICOM is served. With a 0.3 s limit a CPU-starved
                # machine can push even its 10 ms decode past the limit, so it gets a few tries.
                for _ in range(5):
                    after = httpx.post(server.url + "/v1/predict", content=small,
                                       headers={"Content-Type": "application/dicom"}, timeout=60)
                    if after.status_code == 200:
                        break
                assert after.status_code == 200, after.text[:300]
                return [response.status_code, after.status_code]

            measure(f"worker {name} limit on a JPEG 2000 DICOM 3072x3072", server, run,
                    limit_mb=SINGLE_REQUEST_LIMIT_MB)
            assert "Traceback" not in server.log()
