"""Throughput of the HTTP service with dynamic micro-batching vs batch size 1, measured in one run.

Two ``python -m app`` servers on 127.0.0.1 serve the same model, one with ``BTD_MAX_BATCH_SIZE=1``,
one with dynamic batching; a closed loop of concurrent clients posts the same image to each in
alternating rounds (so machine noise hits both alike). Reported: images/s of each (median over
rounds), their ratio, and median/p95 latency. Not a test: figures depend on the machine.

    .venv/bin/python bench/bench_service.py                       # shipped model, or a stand-in
    .venv/bin/python bench/bench_service.py --model models/btd-resnet50.onnx --concurrency 16
    .venv/bin/python bench/bench_service.py --compare records --concurrency 16   # prediction records off vs on
    .venv/bin/python bench/bench_service.py --compare shadow --concurrency 16    # a shadow model off vs on

``--compare records`` runs two servers with the same batching, one with ``BTD_RECORDS=false`` and one
recording every answer in SQLite (README, "Prediction records"), and reports their throughput ratio,
the records written and those lost. ``--compare shadow`` runs one server without and one with a shadow
model (README, "Model updates"; by default the served model itself, on ``--shadow-share`` of the
images) and reports their throughput ratio and the images the shadow compared and skipped.

Without a model file, a contract-conforming stand-in is built (tests/model_factory.py; one
32x32-stride conv to 2048 channels on 224x224, roughly a tenth of ResNet-50's compute).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.api.helpers import ServerProcess
from tests.model_factory import build_model

DEFAULT_MODEL = REPO / "models" / "btd-resnet50.onnx"
DATA_DIR = REPO.parent / "shared" / "data"


def sample_image() -> tuple[bytes, str, str]:
    real = sorted((DATA_DIR / "figshare-cheng" / "images" / "glioma").glob("*.jpg"))[:1]
    if real:
        return real[0].read_bytes(), "image/jpeg", f"{real[0].name} (512x512 JPEG, ../shared/data)"
    import cv2
    import numpy as np

    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8), (15, 15), 5)
    return cv2.imencode(".png", img)[1].tobytes(), "image/png", "synthetic 512x512 PNG"


async def closed_loop(url: str, data: bytes, media_type: str, total: int, concurrency: int) -> tuple[float, list[float]]:
    """``total`` requests from ``concurrency`` clients; returns (images/s, latencies in ms)."""
    latencies: list[float] = []
    remaining = total

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            response = await http.post("/v1/predict", content=data, headers={"Content-Type": media_type})
            response.raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return total / elapsed, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help=f"ONNX model (default: {DEFAULT_MODEL} if present)")
    parser.add_argument("--requests", type=int, default=48, help="requests per round and server")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--compare", choices=("batching", "records", "shadow"), default="batching",
                        help="batching: batch 1 vs dynamic; records: prediction records off vs on (same batching); "
                             "shadow: a shadow model off vs on (same batching)")
    parser.add_argument("--shadow-model", type=Path, default=None, help="--compare shadow: the shadow (default: --model)")
    parser.add_argument("--shadow-share", type=float, default=0.1, help="--compare shadow: BTD_SHADOW_SHARE")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="btd-bench-")
    model = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
    if model is None:
        model = build_model(Path(tmp.name) / "standin.onnx", size=224, channels=2048, stride=32, name="standin")
        model_note = "stand-in (1 conv, 2048 channels, 224x224)"
    else:
        model_note = str(model)
    data, media_type, image_note = sample_image()
    common = {"BTD_MAX_WAIT_MS": str(args.max_wait_ms), "BTD_QUEUE_SIZE": str(4 * args.concurrency),
              "BTD_LOG_LEVEL": "warning"}
    if args.compare == "records":
        common["BTD_MAX_BATCH_SIZE"] = str(args.max_batch_size)
        configs = {"records off": {"BTD_RECORDS": "false", **common},
                   "records on": {"BTD_RECORDS": "true", "BTD_RECORDS_DIR": str(Path(tmp.name) / "data"), **common}}
    elif args.compare == "shadow":
        # Both alike: no records, and admission that waits rather than refuses on a loaded machine.
        common.update(BTD_MAX_BATCH_SIZE=str(args.max_batch_size), BTD_RECORDS="false", BTD_MAX_QUEUE_WAIT_MS="20000")
        configs = {"shadow off": common,
                   "shadow on": {"BTD_SHADOW_MODEL": str(args.shadow_model or model),
                                 "BTD_SHADOW_SHARE": str(args.shadow_share), **common}}
    else:
        configs = {"batch 1": {"BTD_MAX_BATCH_SIZE": "1", **common},
                   f"dynamic (max {args.max_batch_size})": {"BTD_MAX_BATCH_SIZE": str(args.max_batch_size), **common}}
    servers = {name: ServerProcess(model, **env) for name, env in configs.items()}
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.__enter__()
        for name, server in servers.items():  # warm-up round, not counted
            asyncio.run(closed_loop(server.url, data, media_type, args.concurrency, args.concurrency))
        for _ in range(args.rounds):
            for name, server in servers.items():
                results[name].append(asyncio.run(closed_loop(server.url, data, media_type, args.requests,
                                                             args.concurrency)))
        batch_counts = {name: _mean_batch(server.url) for name, server in servers.items()}
        lost = {name: _metric_sum(server.url, "btd_records_lost_total") for name, server in servers.items()}
        shadowed = {name: (_metric_sum(server.url, "btd_shadow_comparisons_total") / 2,  # two checks per image
                           _metric_sum(server.url, "btd_shadow_skipped_total")) for name, server in servers.items()}
    finally:
        for server in servers.values():
            if server.proc is not None:
                server.__exit__(None, None, None)  # SIGTERM: the record writer flushes
        recorded = _records(Path(tmp.name) / "data" / "btd.db") if args.compare == "records" else None
        tmp.cleanup()

    print(f"model: {model_note}\nimage: {image_note}\nconcurrency {args.concurrency}, {args.requests} requests x "
          f"{args.rounds} rounds per server, max wait {args.max_wait_ms} ms")
    throughput = {}
    for name, rounds in results.items():
        throughput[name] = statistics.median(r[0] for r in rounds)
        lat = sorted(x for r in rounds for x in r[1])
        p95 = lat[int(0.95 * (len(lat) - 1))]
        print(f"{name:>18}: {throughput[name]:7.1f} img/s  latency median {statistics.median(lat):7.1f} ms, "
              f"p95 {p95:7.1f} ms, mean batch {batch_counts[name]:.2f}")
    base, other = throughput.values()
    if args.compare == "records":
        sent = args.concurrency + args.requests * args.rounds
        print(f"throughput ratio records on / off: {other / base:.3f}; records written {recorded} of {sent} "
              f"answers, lost (btd_records_lost_total) {lost['records on']:.0f}")
    elif args.compare == "shadow":
        compared, skipped = shadowed["shadow on"]
        sent = args.concurrency + args.requests * args.rounds
        print(f"throughput ratio shadow on / off: {other / base:.3f}; the shadow compared {compared:.0f} and skipped "
              f"{skipped:.0f} of {sent} answers (share {args.shadow_share})")
    else:
        print(f"throughput ratio dynamic / batch 1: {other / base:.2f}")
    return 0


def _metric_sum(url: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
               if line.startswith((name + "{", name + " ")))


def _records(path: Path) -> int | None:
    import sqlite3

    if not path.is_file():
        return None
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT count(*) FROM prediction_records").fetchone()[0]


def _mean_batch(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith(("btd_batch_size_sum", "btd_batch_size_count")):
            key, value = line.split()
            values[key] = float(value)
    return values.get("btd_batch_size_sum", 0) / max(values.get("btd_batch_size_count", 0), 1)


if __name__ == "__main__":
    sys.exit(main())
