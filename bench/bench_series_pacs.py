"""Series mode of ``btd dicom-listen``, end to end: a modality C-STOREs one axial series (150 slices of
512x512 by default, from one lgg-tcga-flair patient's FLAIR slices upscaled and repeated; synthetic
head-like slices without the data set) to the series-mode listener, which classifies it with the INT8
model and C-STOREs its results (one SR, one KOS, the key slices' overlays) to a storage SCP standing in
for the PACS. Measured: wall time from the first C-STORE to the last result stored (the quiet period
``--idle`` included, and without it), the listener's peak resident memory (its process and its
isolated reader worker, each one's peak, summed: an upper bound of the tree's peak), each instance's
C-STORE time and the gaps between instances as the listener received them (what the quiet period
must outlast). ``--via-orthanc``: the modality stores into Orthanc instead, whose routing rule
forwards each instance to the listener, and the results go back into Orthanc (the issue's path);
``--no-ahead``: the series is classified only once complete (the behaviour before ``ClassifyAhead``).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_series_pacs.py --out bench-series-pacs.json

Goal (issue 24): under 10 s and under 1 GiB on the 2-core CPU. The listener runs in a child process;
the machine's load average is reported with the figures (a shared machine slows everything alike).
The finding uses ``app.core.series.aggregate`` when it is implemented, else the tests' stand-in (the
JSON says which): aggregation is a few microseconds either way.
"""

from __future__ import annotations

import argparse
import itertools
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
    sender = CStoreSender(DicomNode(args.store_aet, "127.0.0.1", args.store_port), "BTD")
    classifier = SeriesClassifier(Path(args.model), args.batch)
    processor = SeriesProcessor(classifier, sender, StudyTracker(sender.description), RetryPolicy(retries=1),
                                aggregate=aggregate)
    listener = SeriesListener(ListenerOptions(port=args.listen_port), processor, SeriesLimits(idle_s=args.idle))
    if args.no_ahead:  # the series classified only once complete, as before ClassifyAhead
        listener.assembler.on_held = None
    arrivals: list[float] = []  # when each instance reached the assembler: the gaps the quiet period must outlast
    add = listener.assembler.add
    listener.assembler.add = lambda header, data: arrivals.append(time.monotonic()) or add(header, data)
    listener.start()
    print(json.dumps({"ready": True, "aggregate": which}), flush=True)
    sys.stdin.readline()  # the parent says when the results are stored
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    spread = {"median": round(gaps[len(gaps) // 2], 4), "max": round(gaps[-1], 4)} if gaps else None
    print(json.dumps({"peak_rss_mib": peak_rss_mib(os.getpid()), "instances_received": len(arrivals),
                      "arrival_gaps_s": spread}), flush=True)
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
    from app.transports.pacs.assembly import SeriesLimits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="BTD_SERIES_BATCH_SIZE")
    parser.add_argument("--idle", type=float, default=SeriesLimits.idle_s,
                        help="BTD_SERIES_IDLE_S: the quiet period (default: its default)")
    parser.add_argument("--no-ahead", action="store_true", help="classify the series only once complete (the "
                        "behaviour before slices were classified while the series arrives)")
    parser.add_argument("--via-orthanc", action="store_true", help="the modality stores into Orthanc, whose "
                        "routing rule (docs/pacs/route-mr-to-btd.lua) forwards each instance to the listener; "
                        "the results go back into Orthanc")
    parser.add_argument("--out", default="bench-series-pacs.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--listen-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store-aet", default="STORE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import contextlib
    import tempfile

    from app.transports.pacs.results import encode
    from tests.api.helpers import free_port

    datasets, source = slices(args.slices, args.size)
    encoded = [encode(ds) for ds in datasets]
    received: list[tuple[float, str]] = []  # (when, SOP class) of each result stored
    listen_port = free_port()
    with contextlib.ExitStack() as stack:
        if args.via_orthanc:
            from tests.pacs import orthanc

            if reason := orthanc.available():
                sys.exit(f"--via-orthanc: {reason}")
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="btd-bench-orthanc-")))
            pacs = stack.enter_context(orthanc.Orthanc(folder, btd_port=listen_port))
            store_port, store_aet = pacs.dicom_port, pacs.ae_title
        else:
            pacs, store_port, store_aet = None, free_port(), "STORE"
            stack.callback(storage_scp(store_port, received).shutdown)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, __file__, "--child", "--model", args.model, "--batch",
                                 str(args.batch), "--idle", str(args.idle), "--listen-port", str(listen_port),
                                 "--store-port", str(store_port), "--store-aet", store_aet,
                                 *(["--no-ahead"] if args.no_ahead else [])], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env,
                                stderr=open(Path(args.out).with_suffix(".log"), "w"))  # noqa: SIM115
        try:
            ready = json.loads(proc.stdout.readline())
            load_before = os.getloadavg()
            started = time.perf_counter()
            c_store = send_series(encoded, store_port if pacs else listen_port, store_aet if pacs else "BTD")
            sent = time.perf_counter()
            if pacs:
                done = wait_in_orthanc(pacs, str(datasets[0].StudyInstanceUID), len(encoded), sent + 300)
            else:
                done = wait_for_results(received, sent + 300)
            proc.stdin.write("\n")
            proc.stdin.flush()
            listener = json.loads(proc.stdout.readline())
        finally:
            proc.stdin.close()
            proc.wait(60)
        results = pacs_results(pacs, str(datasets[0].StudyInstanceUID)) if pacs else \
            {c: sum(1 for _, x in received if x == c) for c in sorted({c for _, c in received})}
    wall = done - started
    log = Path(args.out).with_suffix(".log").read_text()
    stages = re.search(r"classify ([\d.]+) s, results ([\d.]+) s, send ([\d.]+) s", log)
    result = {
        "slices": args.slices, "size": f"{args.size}x{args.size}", "source": source, "model": args.model,
        "batch": args.batch, "aggregate": ready["aggregate"], "quiet_period_s": args.idle,
        "classify_ahead": not args.no_ahead, "route": "modality -> Orthanc (Lua routing rule) -> listener -> Orthanc"
        if pacs else "modality -> listener -> storage SCP",
        "c_store_s": round(sent - started, 2), "c_store_per_instance_s": c_store,
        "listener_arrival_gaps_s": listener["arrival_gaps_s"], "instances_received": listener["instances_received"],
        "wall_s": round(wall, 2), "wall_without_quiet_period_s": round(wall - args.idle, 2),
        "stages_s": dict(zip(("classify", "results", "send"), map(float, stages.groups()))) if stages else None,
        "results_stored": results,
        "peak_rss_mib": round(listener["peak_rss_mib"], 1), "cpus": os.cpu_count(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "goal": {"wall_s": 10, "peak_rss_mib": 1024},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def send_series(encoded: list[bytes], port: int, ae_title: str) -> dict:
    """C-STORE the series over one association (as a modality does); each instance's time, in seconds."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established, f"no association with {ae_title}"
    times = []
    for data in encoded:
        began = time.perf_counter()
        status = assoc.send_c_store(dcmread(DicomBytesIO(data)))
        times.append(time.perf_counter() - began)
        assert int(status.Status) == 0, f"C-STORE status {status}"
    assoc.release()
    times.sort()
    return {"median": round(times[len(times) // 2], 4), "max": round(times[-1], 4)}


def wait_for_results(received: list[tuple[float, str]], deadline: float) -> float:
    """When the last result reached the storage SCP: results come in one association (the SR first),
    so the last is the one after which none comes for 1 s."""
    while time.perf_counter() < deadline and not (received and time.perf_counter() - received[-1][0] > 1.0):
        time.sleep(0.05)
    return received[-1][0] if received else float("nan")


def wait_in_orthanc(pacs, study_uid: str, sources: int, deadline: float) -> float:
    """When Orthanc held the series' last result: the study's instance count, polled every 0.1 s, past
    the sources and unchanged for 1.5 s (the time of the first poll that saw the final count)."""
    changed, last = time.perf_counter(), sources
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
    while time.perf_counter() < deadline:
        now, count = time.perf_counter(), len(pacs.rest.post("/tools/find", json=query).json())
        if count != last:
            changed, last = now, count
        elif count > sources and now - changed > 1.5:
            return changed
        time.sleep(0.1)
    return float("nan")


def pacs_results(pacs, study_uid: str) -> dict[str, int]:
    found = pacs.rest.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                                "Expand": True}).json()
    classes = [pacs.rest.get(f"/instances/{i['ID']}/metadata/SopClassUid").text for i in found]
    return {c: classes.count(c) for c in sorted(set(classes)) if c != "1.2.840.10008.5.1.4.1.1.4"}


if __name__ == "__main__":
    main()
