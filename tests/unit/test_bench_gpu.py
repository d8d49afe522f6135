"""bench/bench_gpu.py's arithmetic: the ratios and goals it reports from its measurements."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_gpu


def service(rate: float, p50: float, p95: float, cpu: float) -> dict:
    return {"images_per_s": rate, "p50_ms": p50, "p95_ms": p95, "refused_503": 0, "server_cpu_ms_per_image": cpu}


def test_ratios_compare_the_service_with_onnx_runtime_alone_and_batch_1():
    levels = ("1", "16", "64", "128")
    report = {"configs": {
        "batch 1": {"ort_alone": {"1": {"images_per_s": 100.0, "p50_ms": 10.0, "cpu_ms_per_image": 20.0}},
                    "ort_alone_around_16": {"1": 100.0},
                    "service": {c: service(95.0, 13.0, 40.0, 21.0) for c in levels},
                    "cam": {"none": {"images_per_s": 95.0, "server_cpu_ms_per_image": 21.0},
                            "grid": {"images_per_s": 94.0, "server_cpu_ms_per_image": 21.2},
                            "png": {"images_per_s": 60.0, "server_cpu_ms_per_image": 35.0}}},
        "buckets": {"ort_alone": {"1": {"images_per_s": 100.0, "p50_ms": 10.0, "cpu_ms_per_image": 20.0},
                                  "8": {"images_per_s": 150.0, "p50_ms": 50.0, "cpu_ms_per_image": 13.0}},
                    "ort_alone_around_16": {"1": 100.0, "8": 150.0},
                    "service": {c: service(120.0, 12.0, 30.0, 14.0) for c in levels}},
        "broken": {"error": "CUDA graphs unsupported"},
    }}
    r = bench_gpu.ratios(report)
    assert set(r) == {"batch 1", "buckets"}  # a configuration that failed is left out
    assert r["batch 1"]["service_16_clients_vs_ort_alone"] == 0.95
    assert r["buckets"]["service_16_clients_vs_ort_alone"] == 0.8  # against the best batch of ORT alone
    assert r["batch 1"]["p50_1_client_minus_ort_alone_batch1_ms"] == 3.0
    assert r["buckets"]["vs_batch_1"]["16"] == 120.0 / 95.0
    assert abs(r["batch 1"]["cam_cost"]["grid"] - 1 / 95) < 1e-12
    met = bench_gpu.goals(r, on_gpu=False)
    assert met["batch 1"]["16 clients at 90% of ONNX Runtime alone"] is True
    assert met["buckets"]["16 clients at 90% of ONNX Runtime alone"] is False
    assert met["batch 1"]["CAM (grid) costs at most 3%"] is True
    gpu = bench_gpu.goals(r, on_gpu=True)
    assert gpu["buckets"]["no client level slower than batch 1"] is True
    assert gpu["batch 1"]["2000 slices/s at 64 clients"] is False
