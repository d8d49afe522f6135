"""The inference engine against ONNX Runtime alone, on this machine's GPU (or its CPU), in one run.

For each configuration (batch policy, model variant) it measures, with the same model file:
ONNX Runtime alone (numpy in and out, ``logits`` only: the ceiling) at batch 1 and at the largest
bucket, then the service (``python -m app`` on 127.0.0.1) with 1, 16, 64 and 128 closed-loop
clients posting a 512x512 JPEG slice, and the cost of ``cam=grid`` / ``cam=png`` at 16 clients.
It prints the ratios and writes everything as JSON. Needs only the project installed (``gpu``
extra on a GPU node); finishes in under 5 minutes.

    .venv/bin/python bench/bench_gpu.py                                 # shipped model, JSON to runs/
    .venv/bin/python bench/bench_gpu.py --model models/btd-resnet50.onnx --json runs/bench-gpu.json

Clients are plain asyncio HTTP/1.1 connections (keep-alive) spread over several processes, so the
load generator is not what limits a fast GPU. A refused request (503) is counted and its client
waits the Retry-After the server gave, as a well-behaved client does; throughput counts answered
predictions only. ONNX Runtime alone runs in this process while the server idles, in a window
before every service window (and once after the last), and the CAM modes take turns, so a machine
whose other load drifts (a shared CPU) weighs on both sides of each ratio alike. Beside images/s,
the CPU time per image is measured on both sides (the server and its host workers; this process
for ONNX Runtime alone): on a machine shared with other work it says what the service costs even
when wall-clock figures drift.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The load processes re-import this module (spawn): the service's modules are imported where used.

DEFAULT_MODEL = REPO / "models" / "btd-resnet50.onnx"
DATA_DIR = REPO.parent / "shared" / "data"
CLIENT_LEVELS = (1, 16, 64, 128)


@dataclass(frozen=True)
class Config:
    name: str
    env: dict[str, str]
    max_batch: int
    variant: str = "auto"


def configs(on_gpu: bool, quick: bool) -> list[Config]:
    if on_gpu:
        found = [Config("batch 1", {"BTD_MAX_BATCH_SIZE": "1", "BTD_MAX_WAIT_MS": "0"}, 1),
                 Config("buckets 1-32, wait 2 ms", {"BTD_MAX_BATCH_SIZE": "32", "BTD_MAX_WAIT_MS": "2"}, 32),
                 Config("buckets 1-32, wait 2 ms, CUDA graphs",
                        {"BTD_MAX_BATCH_SIZE": "32", "BTD_MAX_WAIT_MS": "2", "BTD_CUDA_GRAPH": "true"}, 32)]
    else:
        found = [Config("batch 1", {"BTD_MAX_BATCH_SIZE": "1", "BTD_MAX_WAIT_MS": "0"}, 1),
                 Config("buckets 1-8, wait 5 ms", {"BTD_MAX_BATCH_SIZE": "8", "BTD_MAX_WAIT_MS": "5"}, 8),
                 Config("batch 1, 1 host worker process",
                        {"BTD_MAX_BATCH_SIZE": "1", "BTD_MAX_WAIT_MS": "0", "BTD_HOST_WORKERS": "1"}, 1)]
    return found[:1] if quick else found


def sample_image() -> tuple[bytes, str]:
    real = sorted((DATA_DIR / "figshare-cheng" / "images" / "glioma").glob("*.jpg"))[:1]
    if real:
        return real[0].read_bytes(), f"{real[0].name} (512x512 JPEG, ../shared/data)"
    import cv2

    rng = np.random.default_rng(0)
    img = np.zeros((512, 512), np.uint8)
    cv2.ellipse(img, (256, 256), (170, 210), 0, 0, 360, 150, -1)
    img = cv2.add(img, rng.integers(0, 40, img.shape, dtype=np.uint8))
    return cv2.imencode(".jpg", img)[1].tobytes(), "synthetic 512x512 JPEG"


# ---------------------------------------------------------------- ONNX Runtime alone


def ort_alone(model_path: Path, providers: list[str] | None, batch: int, seconds: float) -> dict:
    """images/s and per-call latency of session.run at a constant batch (numpy in/out, logits only)."""
    from app.core.contract import INPUT_NAME, LOGITS_NAME
    from app.core.model import ModelFile
    from app.engine.runner import RuntimeOptions, open_session

    model = ModelFile.load(model_path)
    spec = model.metadata.preprocess
    session = open_session(model_path, RuntimeOptions(providers=providers), channels=spec.channels, size=spec.size,
                           bucket=batch)
    x = np.random.default_rng(0).normal(size=(batch, spec.channels, spec.size, spec.size)).astype(np.float32)
    for _ in range(3):
        session.run([LOGITS_NAME], {INPUT_NAME: x})
    latencies = []
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds or len(latencies) < 5:
        t = time.perf_counter()
        session.run([LOGITS_NAME], {INPUT_NAME: x})
        latencies.append((time.perf_counter() - t) * 1000)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"batch": batch, "images_per_s": batch * len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies), "calls": len(latencies),
            "cpu_ms_per_image": 1000 * cpu / (batch * len(latencies))}


def process_tree_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a process and its descendants, and by the process
    alone (Linux /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += stats.get(current, (0, 0.0))[1]
        stack.extend(child for child, (parent, _) in stats.items() if parent == current)
    return total, stats.get(pid, (0, 0.0))[1]


# ---------------------------------------------------------------- the load generator


async def _client(port: int, request: bytes, deadline: float, stats: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length, retry_after = 0, 1.0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"retry-after":
                    retry_after = float(value)
            await reader.readexactly(length)
            if status == 200:
                stats["latencies"].append((time.perf_counter() - started) * 1000)
            elif status == 503:
                stats["refused"] += 1
                await asyncio.sleep(max(0.0, min(retry_after, deadline - time.perf_counter())))
            else:
                stats["errors"] += 1
    finally:
        writer.close()


def _load_process(port: int, request: bytes, clients: int, seconds: float, queue) -> None:
    async def main() -> dict:
        stats = {"latencies": [], "refused": 0, "errors": 0}
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(_client(port, request, deadline, stats) for _ in range(clients)))
        return stats

    queue.put(asyncio.run(main()))


def load(port: int, image: bytes, cam: str, clients: int, seconds: float, processes: int,
         server_pid: int | None = None) -> dict:
    """``clients`` closed-loop clients for ``seconds``: answered predictions/s, latency percentiles,
    and the server's CPU time per answered image."""
    request = (f"POST /v1/predict?cam={cam} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
               f"Content-Length: {len(image)}\r\n\r\n").encode() + image
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_load_process, args=(port, request, n, seconds, queue)) for n in shares]
    cpu = process_tree_cpu_s(server_pid) if server_pid else None
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    if server_pid:
        after = process_tree_cpu_s(server_pid)
        cpu, main_cpu = after[0] - cpu[0], after[1] - cpu[1]
    for w in workers:
        w.join(30)
    latencies = sorted(x for r in results for x in r["latencies"])

    def pick(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"clients": clients, "images_per_s": len(latencies) / seconds, "p50_ms": pick(0.5), "p95_ms": pick(0.95),
            "refused_503": sum(r["refused"] for r in results), "errors": sum(r["errors"] for r in results),
            "server_cpu_ms_per_image": 1000 * cpu / len(latencies) if server_pid and latencies else None,
            # the server process without its host workers: what one event loop spends per image
            "server_main_cpu_ms_per_image": 1000 * main_cpu / len(latencies) if server_pid and latencies else None}


def metric_mean(url: str, name: str) -> float | None:
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith((f"{name}_sum", f"{name}_count")):
            key, value = line.split()
            values[key] = float(value)
    count = values.get(f"{name}_count", 0)
    return values.get(f"{name}_sum", 0) / count if count else None


# ---------------------------------------------------------------- one configuration


def measure(config: Config, model: Path, served_file: Path, providers: list[str] | None, image: bytes,
            seconds: float, processes: int, cam: bool) -> dict:
    env = {"BTD_LOG_LEVEL": "warning", "BTD_MODEL_VARIANT": config.variant, "BTD_QUEUE_SIZE": "256", **config.env}
    if providers:
        env["BTD_PROVIDERS"] = ",".join(providers)
    from tests.api.helpers import ServerProcess

    result: dict = {"settings": env, "service": {}}
    with ServerProcess(model, ready_timeout_s=900, **env) as server:
        import httpx

        served = httpx.get(server.url + "/v1/model", timeout=10).json()
        result["served"] = {k: served.get(k) for k in ("variant", "provider", "batch_buckets", "host_work",
                                                        "host_workers", "version", "sha256")}
        port = int(server.url.rsplit(":", 1)[1])
        load(port, image, "none", 4, 2.0, 1)  # warm-up, not counted
        batches = sorted({1, config.max_batch})
        windows = []  # ONNX Runtime alone, while the server idles, between the service windows
        ort_seconds = min(seconds, 6) / 2
        for clients in CLIENT_LEVELS:
            windows.append({str(b): ort_alone(served_file, providers, b, ort_seconds) for b in batches})
            result["service"][str(clients)] = load(port, image, "none", clients, seconds, processes, server.proc.pid)
            print(f"  {config.name}: {clients:>3} clients {result['service'][str(clients)]}", flush=True)
        windows.append({str(b): ort_alone(served_file, providers, b, ort_seconds) for b in batches})
        result["ort_alone"] = {b: {"batch": int(b),
                                   "images_per_s": statistics.mean(w[b]["images_per_s"] for w in windows),
                                   "p50_ms": statistics.mean(w[b]["p50_ms"] for w in windows),
                                   "cpu_ms_per_image": statistics.mean(w[b]["cpu_ms_per_image"] for w in windows),
                                   "windows": [round(w[b]["images_per_s"], 2) for w in windows]} for b in windows[0]}
        # around the 16-client window: the figure the goal compares with
        result["ort_alone_around_16"] = {b: statistics.mean(w[b]["images_per_s"] for w in windows[1:3])
                                         for b in windows[0]}
        print(f"  {config.name}: ONNX Runtime alone {result['ort_alone']}", flush=True)
        if cam:  # the CAM modes take turns at 16 clients
            rounds = {mode: [] for mode in ("none", "grid", "png")}
            for _ in range(3):
                for mode in rounds:
                    rounds[mode].append(load(port, image, mode, 16, seconds / 2, processes, server.proc.pid))
            result["cam"] = {mode: {"images_per_s": statistics.mean(r["images_per_s"] for r in runs),
                                    "p50_ms": statistics.mean(r["p50_ms"] or 0 for r in runs),
                                    "server_cpu_ms_per_image": statistics.mean(
                                        r["server_cpu_ms_per_image"] or 0 for r in runs),
                                    "rounds": [r["images_per_s"] for r in runs]} for mode, runs in rounds.items()}
            print(f"  {config.name}: CAM at 16 clients {result['cam']}", flush=True)
        result["mean_batch"] = metric_mean(server.url, "btd_batch_size")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model file (its variants beside it)")
    parser.add_argument("--variant", default="auto", choices=("auto", "fp32", "fp16", "int8"),
                        help="which file of the model to serve (as BTD_MODEL_VARIANT)")
    parser.add_argument("--providers", default=None,
                        help="comma list (default: CUDA then CPU where CUDA is installed, else the CPU)")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement (default 5 on GPU, 6 on CPU)")
    parser.add_argument("--load-processes", type=int, default=None,
                        help="client processes (default: a quarter of the CPUs, at least 1)")
    parser.add_argument("--quick", action="store_true", help="the first configuration only")
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "bench-gpu.json")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from app.engine.engine import choose_model_file
    from app.engine.runner import GPU_PROVIDERS, available_cpus, choose_providers

    available = ort.get_available_providers()
    if args.providers:
        providers = args.providers.split(",")
    elif "CUDAExecutionProvider" in available:  # the CUDA provider, as the issue measured (no TensorRT engine builds)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = None
    on_gpu = choose_providers(providers, available)[0] in GPU_PROVIDERS
    seconds = args.seconds or (5.0 if on_gpu else 6.0)
    processes = args.load_processes or max(1, available_cpus() // 4)
    image, image_note = sample_image()
    served_file, variant = choose_model_file(args.model, args.variant, on_gpu)
    started = time.perf_counter()
    report: dict = {"machine": {"cpus": available_cpus(), "platform": platform.platform(), "gpu": on_gpu,
                                "onnxruntime": ort.__version__, "providers": ort.get_available_providers()},
                    "model": str(args.model), "served_file": str(served_file), "variant": variant,
                    "image": image_note, "seconds_per_measurement": seconds, "configs": {}}
    print(f"model {served_file} ({variant}), image {image_note}, {'GPU' if on_gpu else 'CPU'}, "
          f"{seconds:g} s per measurement, {processes} load process(es)", flush=True)
    for i, config in enumerate(configs(on_gpu, args.quick)):
        config = Config(config.name, config.env, config.max_batch, args.variant)
        try:
            entry = measure(config, args.model, served_file, providers, image, seconds, processes, cam=i == 0)
        except Exception as exc:  # a configuration that cannot run here (e.g. CUDA graphs) is reported, not fatal
            print(f"  {config.name}: FAILED: {exc}", flush=True)
            report["configs"][config.name] = {"error": str(exc)[-2000:]}
            continue
        report["configs"][config.name] = entry
    report["ratios"] = ratios(report)
    report["goals"] = goals(report["ratios"], on_gpu)
    report["elapsed_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))
    print("goals:", json.dumps(report["goals"], indent=2))
    print(f"written {args.json} in {report['elapsed_s']:.0f} s")
    return 0


def goals(ratios: dict, on_gpu: bool) -> dict:
    """Issue 11's goals, met or not, per configuration."""
    out = {}
    for name, r in ratios.items():
        if on_gpu:
            out[name] = {"2000 slices/s at 64 clients": r["images_per_s"]["64"] >= 2000,
                         "p95 under 250 ms at 128 clients": (r["p95_ms"]["128"] or float("inf")) < 250,
                         "no client level slower than batch 1": min(r["vs_batch_1"].values()) >= 1.0,
                         "p50 at 1 client within 4 ms": r["p50_1_client_ms"] <= 4.0}
        else:
            out[name] = {"16 clients at 90% of ONNX Runtime alone": r["service_16_clients_vs_ort_alone"] >= 0.9,
                         "16 clients at 90% of ONNX Runtime alone, in CPU time per image":
                             r["cpu_per_image_ort_alone_vs_service_16"] >= 0.9,
                         "p50 at 1 client within 5 ms of ONNX Runtime alone":
                             r["p50_1_client_minus_ort_alone_batch1_ms"] <= 5.0}
        if "cam_cost" in r:
            out[name]["CAM (grid) costs at most 3%"] = r["cam_cost"]["grid"] <= 0.03
            out[name]["CAM (grid) costs at most 3% in CPU time"] = r["cam_cpu_cost"]["grid"] <= 0.03
    return out


def ratios(report: dict) -> dict:
    """The figures the issue's goals are stated in."""
    out: dict = {}
    measured = {name: entry for name, entry in report["configs"].items() if "error" not in entry}
    if not measured:
        return out
    batch1 = next(iter(measured.values()))
    for name, entry in measured.items():
        ceiling = max(entry["ort_alone_around_16"].values())
        service = entry["service"]
        best = max(entry["ort_alone"].values(), key=lambda a: a["images_per_s"])
        out[name] = {
            "service_16_clients_vs_ort_alone": service["16"]["images_per_s"] / ceiling,
            "cpu_per_image_ort_alone_vs_service_16": best["cpu_ms_per_image"] / service["16"]["server_cpu_ms_per_image"],
            "p50_1_client_ms": service["1"]["p50_ms"],
            "p50_1_client_minus_ort_alone_batch1_ms": service["1"]["p50_ms"] - entry["ort_alone"]["1"]["p50_ms"],
            "images_per_s": {c: s["images_per_s"] for c, s in service.items()},
            "p95_ms": {c: s["p95_ms"] for c, s in service.items()},
            "refused_503": {c: s["refused_503"] for c, s in service.items()},
            "vs_batch_1": {c: s["images_per_s"] / max(batch1["service"][c]["images_per_s"], 1e-9)
                           for c, s in service.items()},
        }
        if "cam" in entry:
            none = entry["cam"]["none"]["images_per_s"]
            out[name]["cam_cost"] = {m: 1 - entry["cam"][m]["images_per_s"] / none for m in ("grid", "png")}
            none_cpu = entry["cam"]["none"]["server_cpu_ms_per_image"]
            out[name]["cam_cpu_cost"] = {m: entry["cam"][m]["server_cpu_ms_per_image"] / none_cpu - 1
                                         for m in ("grid", "png")}
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory():
        sys.exit(main())
