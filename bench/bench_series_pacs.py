"""Series mode of ``btd dicom-listen``, end to end: a modality C-STOREs one axial series (150 slices of
512x512 by default, from one lgg-tcga-flair patient's FLAIR slices upscaled and repeated; synthetic
head-like slices without the data set) to the series-mode listener, which classifies it with the INT8
model and C-STOREs its results (one SR, one KOS, the key slices' overlays) to a storage SCP standing in
for the PACS. Measured: wall time from the first C-STORE to the last result stored (the quiet period
``--idle`` included, and without it), and the listener's peak resident memory (its process and its
isolated reader worker, each one's peak, summed: an upper bound of the tree's peak).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_series_pacs.py --out bench-series-pacs.json

Goal (issue 24): under 10 s and under 1 GiB on the 2-core CPU. The listener runs in a child process;
the machine's load average is reported with the figures (a shared machine slows everything alike).
The finding uses ``app.core.series.aggregate`` when it is implemented, else the tests' stand-in (the
JSON says which): aggregation is a few microseconds either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "btd-resnet50-int8.onnx"


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of ``pid`` and of every descendant, summed, in MiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024.0


def child(args: argparse.Namespace) -> None:
    """The listener: series mode, the INT8 model in process, results to the storage SCP."""
    from app.core import series as core_series
    from app.transports.pacs.assembly import SeriesLimits
    from app.transports.pacs.listener import ListenerOptions, SeriesListener
    from app.transports.pacs.processing import CStoreSender, DicomNode, RetryPolicy, StudyTracker
    from app.transports.pacs.series_processing import SeriesClassifier, SeriesProcessor, core_aggregate

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")  # the series lines
    aggregate, which = core_aggregate, "app.core.series.aggregate"
    try:
        core_series.aggregate([])
    except NotImplementedError:
        from tests.pacs.series_data import stand_in_aggregate

        aggregate, which = stand_in_aggregate, "tests' stand-in (app.core.series.aggregate not implemented yet)"
    except Exception:  # noqa: BLE001, S110 - implemented (it may refuse an empty series): use it
        pass
    sender = CStoreSender(DicomNode("STORE", "127.0.0.1", args.store_port), "BTD")
    classifier = SeriesClassifier(Path(args.model), args.batch)
    processor = SeriesProcessor(classifier, sender, StudyTracker(sender.description), RetryPolicy(retries=1),
                                aggregate=aggregate)
    listener = SeriesListener(ListenerOptions(port=args.listen_port), processor, SeriesLimits(idle_s=args.idle))
    listener.start()
    print(json.dumps({"ready": True, "aggregate": which}), flush=True)
    sys.stdin.readline()  # the parent says when the results are stored
    print(json.dumps({"peak_rss_mib": peak_rss_mib(os.getpid())}), flush=True)
    listener.stop(30)
    classifier.close()


def storage_scp(port: int, received: list[tuple[float, str]]):
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def on_store(event) -> int:
        received.append((time.perf_counter(), str(event.request.AffectedSOPClassUID)))
        return 0x0000

    ae = AE(ae_title="STORE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def slices(count: int, size: int) -> tuple[list, str]:
    import pytest

    from tests.pacs.series_data import lgg_images, series, synthetic_images

    try:
        images, _ = lgg_images(size, count)
        source = "lgg-tcga-flair (one patient's FLAIR slices, upscaled, repeated)"
    except pytest.skip.Exception:
        images, source = synthetic_images(count, size), "synthetic head-like slices (data set absent)"
    return series(images, study_uid="2.25.4242", name="bench axial flair", shuffle=False), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="BTD_SERIES_BATCH_SIZE")
    parser.add_argument("--idle", type=float, default=2.0, help="BTD_SERIES_IDLE_S: the quiet period")
    parser.add_argument("--out", default="bench-series-pacs.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--listen-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from pynetdicom import AE

    from app.transports.pacs.results import encode
    from tests.api.helpers import free_port

    datasets, source = slices(args.slices, args.size)
    encoded = [encode(ds) for ds in datasets]
    received: list[tuple[float, str]] = []
    store_port, listen_port = free_port(), free_port()
    server = storage_scp(store_port, received)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch),
                             "--idle", str(args.idle), "--listen-port", str(listen_port), "--store-port",
                             str(store_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            stderr=open(Path(args.out).with_suffix(".log"), "w"))  # noqa: SIM115
    try:
        ready = json.loads(proc.stdout.readline())
        load_before = os.getloadavg()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])
        started = time.perf_counter()
        assoc = ae.associate("127.0.0.1", listen_port, ae_title="BTD")
        assert assoc.is_established, "no association with the listener"
        from pydicom import dcmread
        from pydicom.filebase import DicomBytesIO

        for data in encoded:
            status = assoc.send_c_store(dcmread(DicomBytesIO(data)))
            assert int(status.Status) == 0, f"C-STORE status {status}"
        assoc.release()
        sent = time.perf_counter()
        deadline = sent + 300
        kos = "1.2.840.10008.5.1.4.1.1.88.59"
        while not any(c == kos for _, c in received) and time.perf_counter() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the key overlays follow the KOS in the same association
        done = max(t for t, _ in received) if received else float("nan")
        proc.stdin.write("\n")
        proc.stdin.flush()
        peak = json.loads(proc.stdout.readline())["peak_rss_mib"]
    finally:
        proc.stdin.close()
        proc.wait(60)
        server.shutdown()
    wall = done - started
    log = Path(args.out).with_suffix(".log").read_text()
    stages = re.search(r"classify ([\d.]+) s, results ([\d.]+) s, send ([\d.]+) s", log)
    result = {
        "slices": args.slices, "size": f"{args.size}x{args.size}", "source": source, "model": args.model,
        "batch": args.batch, "aggregate": ready["aggregate"], "quiet_period_s": args.idle,
        "c_store_s": round(sent - started, 2),
        "wall_s": round(wall, 2), "wall_without_quiet_period_s": round(wall - args.idle, 2),
        "processing_s": round(done - sent - args.idle, 2),
        "stages_s": dict(zip(("classify", "results", "send"), map(float, stages.groups()))) if stages else None,
        "results_stored": {c: sum(1 for _, x in received if x == c) for c in sorted({c for _, c in received})},
        "peak_rss_mib": round(peak, 1), "cpus": os.cpu_count(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "goal": {"wall_s": 10, "peak_rss_mib": 1024},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
