"""Attacks on the real ``btd dicom-listen`` (a subprocess on 127.0.0.1, classifying in process with
``--model``), as a hostile sender would make them (issue 21): DICOM bombs C-STOREd in the transfer
syntax that suits them (a 1 GiB deflated dataset in Deflated Explicit VR Little Endian). Each is
refused (C-STORE 0xC000) before it is queued, the listener's process tree (its isolated reader
included) grows less than 300 MiB, and a real slice is still accepted afterwards. Figures go to
test-artifacts/hostile/listener.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from tests.api.helpers import free_port
from tests.hostile_inputs import deflated_dicom_bomb, dicom_element_bomb, dicom_multivalue_bomb
from tests.model_factory import build_model
from tests.pacs.dicom_checks import SENTINEL_NAME, log_text, mr_slice
from tests.process_watch import Memory

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Memory.supported(), reason="needs Linux /proc (VmHWM, clear_refs)")]

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "test-artifacts" / "hostile" / "listener.json"
MR = "1.2.840.10008.5.1.4.1.1.4"
STATUS_SUCCESS, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xC000
PROCESS_GROWTH_MB = 300
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def listener(tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("listen")
    model = build_model(folder / "model.onnx")
    port, log_path = free_port(), folder / "listen.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.transports.cli.btd", "dicom-listen", "--port", str(port), "--model", str(model),
             "--dest", f"NOWHERE@127.0.0.1:{free_port()}", "--retries", "0", "--study-idle", "1"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "dicom-listen: AE BTD" not in log_text(log_path) and proc.poll() is None:
                assert time.monotonic() < deadline, log_text(log_path)
                time.sleep(0.2)
            assert proc.poll() is None, log_text(log_path)
            yield {"port": port, "proc": proc, "log": log_path}
        finally:
            proc.terminate()
            proc.wait(60)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(RESULTS, indent=1) + "\n")
    print("\n" + "\n".join(f"{r['attack']:<44} 0x{r['status']:04X} {r['seconds']:6.2f} s  tree +{r['tree_growth_mb']:.0f} "
                           f"MiB, listener +{r['listener_growth_mb']:.0f} MiB" for r in RESULTS))


def store(port: int, data: bytes, syntax: str, folder: Path) -> int:
    """C-STORE the Part 10 bytes as they are (pynetdicom streams the file without decoding it)."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    path = folder / "object.dcm"
    path.write_bytes(data)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(MR, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="BTD")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


BOMBS = {
    "deflated DICOM 1 GiB": (deflated_dicom_bomb, DeflatedExplicitVRLittleEndian),
    "DICOM 3.9 million empty elements": (dicom_element_bomb, ExplicitVRLittleEndian),
    "DICOM Window Center of 4 million values": (dicom_multivalue_bomb, ExplicitVRLittleEndian),
}


@pytest.mark.parametrize("name", BOMBS)
def test_listener_refuses_a_bomb_before_queuing_it(listener, tmp_path, name):
    make, syntax = BOMBS[name]
    data = make()
    tree, own = Memory(listener["proc"].pid), Memory(listener["proc"].pid, children=False)
    time.sleep(0.3)
    before_tree, before_own = tree.rss_mb(), own.rss_mb()
    tree.reset_peak()
    started = time.perf_counter()
    status = store(listener["port"], data, syntax, tmp_path)
    seconds = time.perf_counter() - started
    result = {"attack": name, "status": status, "seconds": round(seconds, 2),
              "tree_growth_mb": round(tree.peak_mb() - before_tree), "listener_growth_mb": round(own.peak_mb() - before_own)}
    RESULTS.append(result)
    assert status == STATUS_CANNOT_UNDERSTAND, result
    assert result["tree_growth_mb"] < PROCESS_GROWTH_MB and result["listener_growth_mb"] < PROCESS_GROWTH_MB, result
    # still serving: a real slice is accepted
    assert store(listener["port"], mr_slice(), ExplicitVRLittleEndian, tmp_path) == STATUS_SUCCESS
    log = log_text(listener["log"])
    assert "refused" in log and SENTINEL_NAME not in log and "Traceback" not in log
