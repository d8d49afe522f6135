"""bench/bench_peers.py's pure parts (percentiles, CPU accounting, summaries, ratios, the table) and the
peers' session options against the service's; no server is started."""

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]

import bench_peers


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert bench_peers.percentile(values, 50) == 3.0
    assert bench_peers.percentile(values, 0) == 1.0
    assert bench_peers.percentile(values, 100) == 5.0
    assert bench_peers.percentile(values, 80) == 4.0  # 4 of 5 values at or below
    assert bench_peers.percentile(values, 81) == 5.0
    hundred = list(range(1, 101))
    assert bench_peers.percentile(hundred, 99) == 99
    assert bench_peers.percentile(hundred + [1000], 99) == 100  # one outlier in 101 is past p99
    assert bench_peers.percentile([], 50) is None
    with pytest.raises(ValueError):
        bench_peers.percentile(values, 101)


def stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    # fields 3..52 of /proc/<pid>/stat; utime and stime are fields 14 and 15
    rest = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 37
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


def test_parse_proc_stat_reads_ppid_and_cpu_ticks_past_a_hostile_command_name() -> None:
    assert bench_peers.parse_proc_stat(stat_line(42, "python", 7, 120, 30)) == (7, 150)
    assert bench_peers.parse_proc_stat(stat_line(43, "we ird) S 1 2 (name", 9, 5, 6)) == (9, 11)


def test_parse_proc_stat_reads_this_process() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    ppid, ticks = bench_peers.parse_proc_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert ppid == os.getppid() and ticks >= 0


def test_tree_cpu_counts_descendants_only() -> None:
    stats = {1: (0, 1000), 10: (1, 5), 11: (10, 7), 12: (11, 11), 20: (1, 100), 30: (10, 13)}
    assert bench_peers.tree_cpu_ticks(stats, 10) == 5 + 7 + 11 + 13
    assert bench_peers.tree_cpu_ticks(stats, 12) == 11
    assert bench_peers.tree_cpu_ticks(stats, 99) == 0  # gone
    assert bench_peers.tree_cpu_ticks({5: (6, 1), 6: (5, 2)}, 5) == 3  # a cycle ends


def test_process_tree_cpu_grows_with_work() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    before = bench_peers.process_tree_cpu_s(os.getpid())
    sum(i * i for i in range(2_000_000))
    assert bench_peers.process_tree_cpu_s(os.getpid()) > before


def run(images_per_s: float, latencies: list[float], cpu: float | None, errors: int = 0) -> dict:
    return {"images_per_s": images_per_s, "latencies_ms": latencies, "cpu_ms_per_image": cpu, "errors": errors}


def rounds(scale: float) -> list[dict]:
    """Three rounds at 1, 4 and 16 clients, images/s and latencies scaled by ``scale``."""
    return [{"1": run(40 * scale * k, [10 / scale * k, 20 / scale], 20 / scale),
             "4": run(50 * scale * k, [30.0], 22 / scale),
             "16": run(60 * scale * k, [100 / scale, 200 / scale], 25 / scale * k, errors=1)}
            for k in (0.9, 1.0, 1.1)]


def test_summarise_takes_medians_over_rounds_and_pools_latencies() -> None:
    s = bench_peers.summarise(rounds(1.0))
    assert set(s) == {"1", "4", "16"}
    assert s["4"]["images_per_s"] == pytest.approx(50.0)
    assert s["4"]["images_per_s_rounds"] == [45.0, 50.0, 55.0]
    assert s["1"]["requests"] == 6
    assert s["1"]["p50_ms"] == pytest.approx(11.0)  # pooled: 9, 10, 11, 20, 20, 20
    assert s["1"]["p99_ms"] == pytest.approx(20.0)
    assert s["16"]["cpu_ms_per_image"] == pytest.approx(25.0)
    assert s["16"]["errors"] == 3


def test_ratios_goals_and_table() -> None:
    summaries = {"ort": bench_peers.summarise(rounds(1.0)), "ours": bench_peers.summarise(rounds(0.5)),
                 "fastapi": bench_peers.summarise(rounds(0.25))}
    r = bench_peers.ratios(summaries)
    assert r["ort"]["images_per_s_16"] == pytest.approx(1.0)
    assert r["ours"]["images_per_s_4"] == pytest.approx(25 / 60)  # to the baseline's best level (16: 60/s)
    assert r["ours"]["images_per_s_16"] == pytest.approx(0.5)
    assert r["ours"]["p50_1_minus_ms"] == pytest.approx(22.0 - 11.0)  # pooled p50s
    assert r["ours"]["cpu_ms_per_image_16"] == pytest.approx(2.0)
    assert r["fastapi"]["cpu_ms_per_image_16"] == pytest.approx(4.0)

    met = bench_peers.goals(summaries)
    assert met["images/s at 16 clients >= 0.90 of ONNX Runtime alone"] is False
    assert met["p50 at 1 client <= ONNX Runtime alone + 5 ms"] is False
    assert met["ahead of every peer at 16 clients in images/s"] is True
    assert met["ahead of every peer at 16 clients in p99"] is True
    assert bench_peers.goals({"ort": summaries["ort"]}) == {}

    table = bench_peers.markdown_table(summaries, {"ort": "ORT", "ours": "ours", "fastapi": "FastAPI"},
                                       {"kserve": "building the kserve virtualenv failed: no network"})
    lines = table.splitlines()
    assert lines[0].startswith("| server |") and len(lines) == 2 + 3 + 1
    assert lines[2].startswith("| ORT (3 errors) | 50.0 | 60.0 | 11.0 / 20.0 |")  # the baseline: no ratios
    assert "| 25.0 (0.42) | 30.0 (0.50) | 22.0 / 40.0 (+11.0) |" in lines[3]
    assert lines[3].endswith("| 50.0 (2.00) |")
    assert lines[5] == "| kserve | skipped: building the kserve virtualenv failed: no network | | | | |"


def test_throughput_ratios_are_to_the_baselines_best_level() -> None:
    """Sixteen threads in one session contend: the ceiling is ONNX Runtime alone's best level."""
    contended = [{c: {**m, "images_per_s": 80.0 if c == "1" else 40.0} for c, m in r.items()} for r in rounds(1.0)]
    server = [{c: {**m, "images_per_s": 60.0} for c, m in r.items()} for r in rounds(1.0)]
    r = bench_peers.ratios({"ort": bench_peers.summarise(contended), "x": bench_peers.summarise(server)})
    assert r["x"]["images_per_s_16"] == pytest.approx(0.75)
    assert r["ort"]["images_per_s_16"] == pytest.approx(0.5)


def test_missing_cpu_figures_leave_dashes() -> None:
    base = bench_peers.summarise(rounds(1.0))
    other = bench_peers.summarise([{c: {**m, "cpu_ms_per_image": None} for c, m in r.items()} for r in rounds(1.0)])
    assert bench_peers.ratios({"ort": base, "x": other})["x"]["cpu_ms_per_image_16"] is None
    assert bench_peers.markdown_table({"ort": base, "x": other}, {}).splitlines()[-1].endswith("| - |")


def test_multipart_body_carries_the_file_unchanged() -> None:
    from email.parser import BytesParser
    from email.policy import HTTP

    data = bytes(range(256)) * 4
    body, content_type = bench_peers.multipart("image", "slice.jpg", "image/jpeg", data)
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    (part,) = message.iter_parts()
    assert part.get_param("name", header="content-disposition") == "image"
    assert part.get_filename() == "slice.jpg" and part.get_content_type() == "image/jpeg"
    assert part.get_payload(decode=True) == data
    request = bench_peers.http_request("/predict", body, content_type)
    head, _, sent = request.partition(b"\r\n\r\n")
    assert sent == body and f"Content-Length: {len(body)}".encode() in head


def test_every_peer_has_a_pinned_requirements_file_and_an_app() -> None:
    for name, target in bench_peers.TARGETS.items():
        if target.kind != "peer":
            continue
        requirements = (BENCH / "peers" / f"requirements-{name}.txt").read_text()
        pins = [line for line in requirements.splitlines() if line and not line.startswith(("#", "-r"))]
        assert pins and all("==" in line for line in pins), f"{name}: pin exact versions"
        argv = target.argv(Path("python"), 1234)
        script = next((a for a in argv if a.endswith(".py")), None)
        assert script is None or Path(script).is_file()


def test_peers_open_the_session_the_service_opens(monkeypatch) -> None:
    """bench/peers/peer_model.py restates the service's CPU session options: they must not drift."""
    ort = pytest.importorskip("onnxruntime")
    import peer_model

    from app.engine.runner import RuntimeOptions, open_session

    made = []
    monkeypatch.setattr(ort, "InferenceSession", lambda source, sess_options, providers: made.append(
        (sess_options, [p[0] if isinstance(p, tuple) else p for p in providers])))
    open_session(Path("model.onnx"), RuntimeOptions(intra_op_threads=3, providers=["CPUExecutionProvider"]))
    peer_model.open_session("model.onnx", 3)
    (ours, our_providers), (peer, peer_providers) = made
    assert our_providers == peer_providers == ["CPUExecutionProvider"]
    for attribute in ("graph_optimization_level", "execution_mode", "intra_op_num_threads", "inter_op_num_threads"):
        assert getattr(peer, attribute) == getattr(ours, attribute), attribute
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert peer.get_session_config_entry(key) == ours.get_session_config_entry(key), key


def test_a_peer_whose_virtualenv_cannot_be_built_is_reported_with_pips_last_lines(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BTD_CACHE_DIR", str(tmp_path))
    calls = []

    def failing_run(step, stdout, **kwargs):
        calls.append(step)
        if "pip" in step:
            stdout.write(b"Collecting kserve==0.21.0\nERROR: No matching distribution found for kserve==0.21.0\n")
            stdout.flush()
            return bench_peers.subprocess.CompletedProcess(step, 1)
        return bench_peers.subprocess.CompletedProcess(step, 0)

    monkeypatch.setattr(bench_peers.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="No matching distribution found for kserve"):
        bench_peers.ensure_venv("kserve")
    assert [step[1:3] for step in calls] == [["-m", "venv"], ["-m", "pip"]]
    assert "-c" in calls[1] and calls[1][calls[1].index("-c") + 1].endswith("requirements-kserve.lock")
    assert not (tmp_path / "bench-peers" / "kserve" / ".btd-stamp").exists()  # rebuilt next time


def test_a_built_virtualenv_is_reused_until_its_requirements_change(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BTD_CACHE_DIR", str(tmp_path))
    root = tmp_path / "bench-peers" / "fastapi"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    (root / ".btd-stamp").write_text(bench_peers.venv_stamp("fastapi"))
    monkeypatch.setattr(bench_peers.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt an up-to-date venv"))
    assert bench_peers.ensure_venv("fastapi") == root / "bin" / "python"
    assert bench_peers.venv_stamp("fastapi") != bench_peers.venv_stamp("litserve")
