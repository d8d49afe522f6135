"""What live performance costs (README, "Live performance"), measured in one run; JSON on stdout.

1. ``report``: the seconds ``performance_report`` takes (median of ``--repeats``) on a SQLite records
   database holding N predictions each with one reader's finding, for each N of ``--readings``: what the
   exporter's thread spends every ``BTD_PERFORMANCE_INTERVAL_S``.
2. ``predict`` (``--predict``): ``/v1/predict`` throughput of two servers on copies of the largest of those
   databases, one with the gauges off (``BTD_PERFORMANCE_INTERVAL_S=0``) and one refreshing them every
   ``--interval`` seconds (far more often than the 60 s default, to make any cost visible), in
   alternating rounds of a closed loop; their ratio.

    .venv/bin/python bench/bench_performance.py --readings 1000 10000 100000
    .venv/bin/python bench/bench_performance.py --readings 100000 --predict --concurrency 8 --rounds 5

Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_service import closed_loop, sample_image  # bench/ is on the path

from app.core.decision import decide
from app.core.result import ModelIdentity
from app.engine.monitoring.performance import performance_report
from app.engine.records.rows import prediction_row
from app.engine.records.schema import FEEDBACK, RECORDS
from app.engine.records.store import RecordStore
from tests.api.helpers import ServerProcess
from tests.model_factory import build_model

LABELS = ("glioma", "meningioma", "notumor", "pituitary")
CHUNK = 5_000


def fill(path: Path, readings: int, seed: int = 0) -> None:
    """``readings`` predictions of two model versions, each read once (a reader agreeing 80% of the time)."""
    rng = np.random.default_rng(seed)
    store = RecordStore(f"sqlite:///{path}")
    store.migrate()
    now = datetime.now(timezone.utc)
    try:
        for start in range(0, readings, CHUNK):
            count = min(CHUNK, readings - start)
            logits = rng.normal(size=(count, len(LABELS))) * 2
            rows = []
            for i in range(count):
                decision = decide(logits[i], LABELS, temperature=1.0, threshold=0.5)
                model = ModelIdentity("btd", f"1.{(start + i) % 2}.0", "a" * 64)
                rows.append(prediction_row(request_id=f"r{start + i}", transport="http-v1", model=model,
                                           answer=decision, now=now))
            with store.engine.begin() as connection:
                connection.execute(RECORDS.insert(), rows)
                first_id = connection.execute(RECORDS.select().with_only_columns(RECORDS.c.id)
                                              .where(RECORDS.c.request_id == f"r{start}")).scalar_one()
                findings = [row["label"] if rng.random() < 0.8 else str(rng.choice(LABELS)) for row in rows]
                connection.execute(FEEDBACK.insert(), [
                    {"prediction_id": first_id + i, "reader_id": "", "label": label,
                     "tumour_present": label != "notumor", "created_at": now, "updated_at": now}
                    for i, label in enumerate(findings)])
    finally:
        store.close()


def time_report(path: Path, repeats: int) -> dict:
    store = RecordStore(f"sqlite:///{path}")
    try:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            report = performance_report(store)
            seconds.append(time.perf_counter() - start)
    finally:
        store.close()
    return {"median_s": statistics.median(seconds), "min_s": min(seconds),
            "confirmed": sum(m["confirmed"] for m in report["models"].values())}


def compare_predict(database: Path, args: argparse.Namespace, work: Path) -> dict:
    model = build_model(work / "standin.onnx", size=224, channels=2048, stride=32, name="standin")
    data, media_type, image_note = sample_image()
    configs = {"gauges off": "0", f"gauges every {args.interval:g} s": str(args.interval)}
    servers = {}
    for index, (name, interval) in enumerate(configs.items()):
        records_dir = work / f"records-{index}"
        records_dir.mkdir()
        shutil.copy(database, records_dir / "btd.db")
        servers[name] = ServerProcess(model, BTD_RECORDS_DIR=str(records_dir), BTD_PERFORMANCE_INTERVAL_S=interval,
                                      BTD_QUEUE_SIZE=str(4 * args.concurrency), BTD_LOG_LEVEL="warning")
    throughput: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.__enter__()
        for server in servers.values():  # warm-up, not counted
            asyncio.run(closed_loop(server.url, data, media_type, args.concurrency, args.concurrency))
        for _ in range(args.rounds):
            for name, server in servers.items():
                rate, _ = asyncio.run(closed_loop(server.url, data, media_type, args.requests, args.concurrency))
                throughput[name].append(rate)
        refreshed = httpx.get(servers[list(servers)[1]].url + "/metrics").text
        refreshed_ok = "btd_live_confirmed_cases{" in refreshed
    finally:
        for server in servers.values():
            if server.proc is not None:
                server.__exit__(None, None, None)
    medians = {name: statistics.median(rates) for name, rates in throughput.items()}
    off, on = medians.values()
    return {"image": image_note, "model": "stand-in (1 conv, 2048 channels, 224x224)",
            "concurrency": args.concurrency, "requests_per_round": args.requests, "rounds": args.rounds,
            "images_per_s_median": medians, "images_per_s_rounds": throughput, "ratio_on_over_off": on / off,
            "gauges_exported": refreshed_ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predict", action="store_true", help="also compare /v1/predict with the gauges off / on")
    parser.add_argument("--interval", type=float, default=1.0, help="refresh interval of the 'on' server (s)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    out: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                             "load_average": list(os.getloadavg())},
                 "report": {}}
    with tempfile.TemporaryDirectory(prefix="btd-bench-perf-") as tmp:
        work = Path(tmp)
        largest = None
        for n in sorted(args.readings):
            path = work / f"records-{n}.db"
            fill(path, n)
            out["report"][str(n)] = time_report(path, args.repeats)
            largest = path
        if args.predict and largest is not None:
            out["predict"] = compare_predict(largest, args, work)
    out["machine"]["load_average_after"] = list(os.getloadavg())
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
