"""The service beside the servers a user would pick instead, and ONNX Runtime alone, in one run.

Every target serves the same INT8 file with the same preprocessing (``app.core.contract.preprocess`` with
the model's spec) and the same ONNX Runtime thread policy, on 127.0.0.1, one at a time:

    ort        ONNX Runtime alone: ``session.run`` on the preprocessed tensor, in this process (the ceiling)
    inproc     decode + preprocess + ``session.run`` in this process (what any server must add to)
    ours       the service, ``python -m app`` with its defaults
    ours-b1    the service with BTD_MAX_BATCH_SIZE=1, BTD_MAX_WAIT_MS=0
    fastapi    a naive FastAPI app (bench/peers/fastapi_app.py)
    kserve     KServe's Python model server (bench/peers/kserve_app.py)
    litserve   LitServe with batches of up to 8, 5 ms wait (bench/peers/litserve_app.py)
    bentoml    BentoML (bench/peers/bentoml_app.py)
    ray        Ray Serve (bench/peers/ray_app.py; not in the default set: heavy, ask with --peers)

Each peer runs in its own virtualenv, built on first use under ``~/.cache/btd/bench-peers/<peer>``
(``BTD_CACHE_DIR`` moves it) from the pinned ``bench/peers/requirements-<peer>.txt`` with the
``requirements-<peer>.lock`` beside it as constraints; a peer whose virtualenv cannot be built or
whose server does not come up is skipped with the reason. Each target is measured in every round
(``--rounds``, at least 3; the order rotates each round, so a machine whose other load drifts
weighs on all alike): a server is started, checked (its answer for the image must match ONNX
Runtime alone's), warmed up, measured with closed-loop clients at 1, 4 and 16 (``--requests``
answered requests each), and stopped. Latency percentiles pool every round's requests; images/s
and CPU time per image are medians over rounds. CPU time is the server's whole process tree
(user + system, from /proc, or psutil where installed); for the in-process rows, this process.

    .venv/bin/python bench/bench_peers.py --out bench-peers.json
    .venv/bin/python bench/bench_peers.py --peers ort,ours,fastapi --rounds 3 --requests 60

Every speed claim in the README is a ratio from one such run: the JSON holds every figure, the
ratios to ONNX Runtime alone and the issue's goals for the service; the Markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench_gpu import sample_image  # the same slice as the GPU benchmark (bench/ is on the path)

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / "bench" / "peers"
DEFAULT_MODEL = REPO / "models" / "btd-resnet50.onnx"
LEVELS = (1, 4, 16)
ALL_TARGETS = ("ort", "inproc", "ours", "ours-b1", "fastapi", "kserve", "litserve", "bentoml", "ray")
DEFAULT_TARGETS = tuple(t for t in ALL_TARGETS if t != "ray")


# ---------------------------------------------------------------- pure parts (unit-tested)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]): the smallest value with at least q% of the values
    at or below it; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must lie in [0, 100]")
    rank = max(1, -(-q * len(ordered) // 100))  # ceil(q/100 * n), at least the first
    return ordered[int(rank) - 1]


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(parent pid, user + system clock ticks) from the text of /proc/<pid>/stat. The command name
    (field 2) is in parentheses and may itself hold spaces and parentheses, so fields are counted
    from the last ')'."""
    rest = text.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree_cpu_ticks(stats: Mapping[int, tuple[int, int]], root: int) -> int:
    """Ticks of ``root`` and all its descendants, given {pid: (ppid, ticks)}."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats.get(pid, (0, 0))[1]
        stack.extend(children.get(pid, ()))
    return total


def process_tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its live descendants."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(root)
            total = 0.0
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            return total
        except psutil.NoSuchProcess:
            return 0.0
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    return tree_cpu_ticks(stats, root) / os.sysconf("SC_CLK_TCK")


def summarise(rounds: Sequence[Mapping[str, Mapping]]) -> dict:
    """Per client level over the rounds: median images/s and CPU ms an image, pooled latency
    percentiles, summed errors. ``rounds``: [{level: {"images_per_s", "latencies_ms",
    "cpu_ms_per_image", "errors"}}]."""
    out = {}
    levels = sorted({int(level) for r in rounds for level in r}, key=int)
    for level in levels:
        runs = [r[str(level)] for r in rounds if str(level) in r]
        pooled = [x for run in runs for x in run["latencies_ms"]]
        cpu = [run["cpu_ms_per_image"] for run in runs if run.get("cpu_ms_per_image") is not None]
        out[str(level)] = {
            "images_per_s": statistics.median(run["images_per_s"] for run in runs),
            "images_per_s_rounds": [round(run["images_per_s"], 2) for run in runs],
            "p50_ms": percentile(pooled, 50), "p99_ms": percentile(pooled, 99), "requests": len(pooled),
            "cpu_ms_per_image": statistics.median(cpu) if cpu else None,
            "errors": sum(run.get("errors", 0) for run in runs),
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def ratios(summaries: Mapping[str, Mapping], baseline: str = "ort") -> dict:
    """Each target against ``baseline`` (ONNX Runtime alone): images/s at 4 and 16 clients as a
    fraction of the baseline's best images/s at any client level (the ceiling: a server may run its
    requests through the model however it likes, and many threads in one session contend, so the
    baseline's own 16-thread figure can lie below its 1-thread one), p50 / p99 at 1 client minus the
    baseline's, CPU time an image at 16 clients as a multiple of the baseline's."""
    base = summaries.get(baseline)
    if not base:
        return {}
    ceiling = max(level["images_per_s"] for level in base.values())
    out = {}
    for name, s in summaries.items():
        out[name] = {
            "images_per_s_4": _ratio(s["4"]["images_per_s"], ceiling),
            "images_per_s_16": _ratio(s["16"]["images_per_s"], ceiling),
            "p50_1_minus_ms": _minus(s["1"]["p50_ms"], base["1"]["p50_ms"]),
            "p99_1_minus_ms": _minus(s["1"]["p99_ms"], base["1"]["p99_ms"]),
            "cpu_ms_per_image_16": _ratio(s["16"]["cpu_ms_per_image"], base["16"]["cpu_ms_per_image"]),
        }
    return out


def goals(summaries: Mapping[str, Mapping], service: str = "ours", baseline: str = "ort",
          peers: Sequence[str] = ("fastapi", "kserve", "litserve", "bentoml", "ray")) -> dict:
    """Issue 22's goals for the service in this run (None: not measured)."""
    s, base = summaries.get(service), summaries.get(baseline)
    if not s or not base:
        return {}
    r = ratios({service: s, baseline: base}, baseline)[service]
    measured = [summaries[p] for p in peers if p in summaries]
    at16 = s["16"]
    return {
        "images/s at 4 clients >= 0.90 of ONNX Runtime alone": r["images_per_s_4"] >= 0.9,
        "images/s at 16 clients >= 0.90 of ONNX Runtime alone": r["images_per_s_16"] >= 0.9,
        "p50 at 1 client <= ONNX Runtime alone + 5 ms": r["p50_1_minus_ms"] <= 5.0,
        "ahead of every peer at 16 clients in images/s":
            all(at16["images_per_s"] > p["16"]["images_per_s"] for p in measured) if measured else None,
        "ahead of every peer at 16 clients in p99":
            all(at16["p99_ms"] < p["16"]["p99_ms"] for p in measured) if measured else None,
    }


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_NOTE = ("In parentheses: images/s as a fraction of ONNX Runtime alone's best images/s at any client "
              "level; p50 minus its p50 (ms); CPU time as a multiple of its CPU time at 16 threads.")


def markdown_table(summaries: Mapping[str, Mapping], labels: Mapping[str, str],
                   skipped: Mapping[str, str] | None = None, baseline: str = "ort") -> str:
    """One row per target; ratios to ``baseline`` in parentheses (see :func:`ratios`)."""
    r = ratios(summaries, baseline)
    lines = [("| server | img/s @4 clients | img/s @16 clients | p50 / p99 @1 client, ms | p99 @16 clients, ms "
              "| CPU ms/img @16 |"),
             "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        x = r.get(name, {})
        base = name == baseline
        tput4 = _f(s["4"]["images_per_s"]) + ("" if base or not x else f" ({_f(x['images_per_s_4'], 2)})")
        tput16 = _f(s["16"]["images_per_s"]) + ("" if base or not x else f" ({_f(x['images_per_s_16'], 2)})")
        lat = f"{_f(s['1']['p50_ms'])} / {_f(s['1']['p99_ms'])}"
        if not base and x and x["p50_1_minus_ms"] is not None:
            lat += f" ({x['p50_1_minus_ms']:+.1f})"
        cpu = _f(s["16"]["cpu_ms_per_image"]) + ("" if base or not x or x["cpu_ms_per_image_16"] is None
                                                 else f" ({_f(x['cpu_ms_per_image_16'], 2)})")
        errors = sum(level["errors"] for level in s.values())
        label = labels.get(name, name) + (f" ({errors} errors)" if errors else "")
        lines.append(f"| {label} | {tput4} | {tput16} | {lat} | {_f(s['16']['p99_ms'])} | {cpu} |")
    for name, reason in (skipped or {}).items():
        lines.append(f"| {labels.get(name, name)} | skipped: {reason.splitlines()[0][:120] if reason else ''} "
                     "| | | | |")
    return "\n".join(lines)


def multipart(field_name: str, filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field; returns (body, its Content-Type)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def http_request(path: str, body: bytes, content_type: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# ---------------------------------------------------------------- targets


def cache_dir() -> Path:
    return Path(os.environ.get("BTD_CACHE_DIR", Path.home() / ".cache" / "btd")) / "bench-peers"


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    kind: str  # "inprocess", "service" or "peer"
    ready_path: str = "/"
    # (image bytes) -> (path, body, content type)
    request: Callable[[bytes], tuple[str, bytes, str]] | None = None
    # JSON answer -> {label: probability}
    probabilities: Callable[[object], Mapping[str, float]] | None = None
    argv: Callable[[Path, int], list[str]] | None = None  # (venv python, port) -> command
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 180.0


def _raw(path: str) -> Callable[[bytes], tuple[str, bytes, str]]:
    return lambda image: (path, image, "image/jpeg")


def _kserve_request(image: bytes) -> tuple[str, bytes, str]:
    body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(image).decode()}}]}).encode()
    return "/v1/models/btd:predict", body, "application/json"


def _litserve_request(image: bytes) -> tuple[str, bytes, str]:
    return "/predict", json.dumps({"image": base64.b64encode(image).decode()}).encode(), "application/json"


def _bentoml_request(image: bytes) -> tuple[str, bytes, str]:
    body, content_type = multipart("image", "slice.jpg", "image/jpeg", image)
    return "/predict", body, content_type


def _peer_script(script: str) -> Callable[[Path, int], list[str]]:
    return lambda python, port: [str(python), str(PEERS_DIR / script), "--port", str(port)]


TARGETS = {
    "ort": Target("ort", "ONNX Runtime alone, tensor in", "inprocess"),
    "inproc": Target("inproc", "decode + preprocess + ONNX Runtime, in-process", "inprocess"),
    "ours": Target("ours", "**ours, defaults**", "service", "/readyz", _raw("/v1/predict"),
                   lambda a: a["probabilities"]),
    "ours-b1": Target("ours-b1", "ours, batch 1 no wait", "service", "/readyz", _raw("/v1/predict"),
                      lambda a: a["probabilities"], env={"BTD_MAX_BATCH_SIZE": "1", "BTD_MAX_WAIT_MS": "0"}),
    "fastapi": Target("fastapi", "naive FastAPI app", "peer", "/healthz", _raw("/predict"),
                      lambda a: a["probabilities"], _peer_script("fastapi_app.py")),
    "kserve": Target("kserve", "KServe Python model server", "peer", "/v1/models/btd", _kserve_request,
                     lambda a: a["predictions"][0]["probabilities"], _peer_script("kserve_app.py")),
    "litserve": Target("litserve", "LitServe, batch 8, 5 ms", "peer", "/health", _litserve_request,
                       lambda a: a["probabilities"], _peer_script("litserve_app.py")),
    "bentoml": Target("bentoml", "BentoML", "peer", "/readyz", _bentoml_request, lambda a: a["probabilities"],
                      lambda python, port: [str(python), "-m", "bentoml", "serve", "bentoml_app:Classifier",
                                            "--host", "127.0.0.1", "--port", str(port)],
                      env={"BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(cache_dir() / "bentoml-home")}),
    "ray": Target("ray", "Ray Serve", "peer", "/predict", _raw("/predict"), lambda a: a["probabilities"],
                  _peer_script("ray_app.py"), env={"RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout_s=300.0),
}


# ---------------------------------------------------------------- peer virtualenvs


def _requirement_files(peer: str) -> list[Path]:
    files = [PEERS_DIR / f"requirements-{peer}.txt", PEERS_DIR / "requirements-common.txt"]
    lock = PEERS_DIR / f"requirements-{peer}.lock"
    return files + ([lock] if lock.is_file() else [])


def venv_stamp(peer: str) -> str:
    digest = hashlib.sha256(sys.version.encode())
    for path in _requirement_files(peer):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def ensure_venv(peer: str, timeout_s: float = 1200.0) -> Path:
    """The peer's virtualenv python, built from its pinned requirements when missing or stale.
    Raises RuntimeError with pip's last lines when the build fails."""
    root = cache_dir() / peer
    python = root / "bin" / "python"
    stamp = root / ".btd-stamp"
    wanted = venv_stamp(peer)
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    log = root.parent / f"{peer}-build.log"
    print(f"  building {root} (log: {log}) ...", flush=True)
    requirements = PEERS_DIR / f"requirements-{peer}.txt"
    lock = PEERS_DIR / f"requirements-{peer}.lock"
    steps = [[sys.executable, "-m", "venv", str(root)],
             [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(requirements),
              *(["-c", str(lock)] if lock.is_file() else [])]]
    deadline = time.monotonic() + timeout_s
    with open(log, "wb") as out:
        for step in steps:
            try:
                done = subprocess.run(step, check=False, stdout=out, stderr=subprocess.STDOUT, cwd=PEERS_DIR,
                                      timeout=max(1.0, deadline - time.monotonic()),
                                      env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"building the {peer} virtualenv took over {timeout_s:.0f} s") from None
            if done.returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"building the {peer} virtualenv failed: " + " / ".join(tail))
    stamp.write_text(wanted)
    return python


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own session (so its whole tree can be signalled), log to a file,
    stopped (SIGTERM to the group, then SIGKILL) on exit, whatever happened."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path, port: int, ready_path: str,
                 ready_timeout_s: float, log_path: Path) -> None:
        self.argv, self.env, self.cwd, self.port = argv, env, cwd, port
        self.ready_path, self.ready_timeout_s, self.log_path = ready_path, ready_timeout_s, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, env=dict(self.env), cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    if httpx.get(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            raise RuntimeError(f"not ready after {self.ready_timeout_s:.0f} s: {self.log_tail()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def log_tail(self, lines: int = 8) -> str:
        self._log.flush()
        return " / ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            tree = descendants(self.proc.pid)  # before signalling: some escape the process group
            for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    # the leader is gone; give the rest of its group the same deadline
                    end = time.monotonic() + wait_s
                    while time.monotonic() < end and _group_alive(self.proc.pid):
                        time.sleep(0.1)
                    if not _group_alive(self.proc.pid):
                        break
                except subprocess.TimeoutExpired:
                    continue
            for pid, started in tree.items():  # still there (same pid, same start): killed
                if _start_time(pid) == started:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self._log.close()


def _start_time(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of the live descendants of ``root`` (Linux /proc; empty elsewhere)."""
    parents = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())[0]
            except (OSError, ValueError, IndexError):
                continue
    found, stack = {}, [root]
    while stack:
        current = stack.pop()
        for pid, ppid in parents.items():
            if ppid == current and pid not in found:
                started = _start_time(pid)
                if started is not None:
                    found[pid] = started
                    stack.append(pid)
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ---------------------------------------------------------------- the load generator


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("connection closed")
    status = int(line.split()[1])
    headers: dict[bytes, bytes] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def _closed_loop(port: int, request: bytes, clients: int, requests: int, limit_s: float) -> dict:
    remaining = requests
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + limit_s

    async def client() -> None:
        nonlocal remaining
        reader = writer = None
        try:
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                started = time.perf_counter()
                try:
                    writer.write(request)
                    status, headers, _ = await _read_response(reader)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    writer.close()
                    reader = writer = None
                    continue
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                    if status == 503:  # refused: wait as the server asks (bounded)
                        await asyncio.sleep(min(1.0, float(headers.get(b"retry-after", b"0.1") or 0.1)))
                if headers.get(b"connection", b"").lower() == b"close":
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {"images_per_s": len(latencies) / elapsed, "latencies_ms": latencies, "elapsed_s": elapsed,
            "errors": sum(errors.values()), "error_kinds": errors}


def load(port: int, request: bytes, clients: int, requests: int, server_pid: int, limit_s: float) -> dict:
    before = process_tree_cpu_s(server_pid)
    result = asyncio.run(_closed_loop(port, request, clients, requests, limit_s))
    cpu_s = process_tree_cpu_s(server_pid) - before
    answered = len(result["latencies_ms"])
    result["cpu_ms_per_image"] = 1000 * cpu_s / answered if answered else None
    return result


# ---------------------------------------------------------------- in-process


def inprocess(work: Callable[[], object], clients: int, requests: int, limit_s: float) -> dict:
    """``clients`` threads calling ``work`` until ``requests`` calls are done (closed loop)."""
    lock = threading.Lock()
    remaining = [requests]
    latencies: list[float] = []
    deadline = time.perf_counter() + limit_s

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            t = time.perf_counter()
            work()
            elapsed = (time.perf_counter() - t) * 1000
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu, started = process_tree_cpu_s(os.getpid()), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu = process_tree_cpu_s(os.getpid()) - cpu
    return {"images_per_s": len(latencies) / elapsed, "latencies_ms": latencies, "elapsed_s": elapsed,
            "errors": 0, "cpu_ms_per_image": 1000 * cpu / len(latencies) if latencies else None}


# ---------------------------------------------------------------- one round of one target


@dataclass
class Context:
    model: Path  # what the service is given (it picks its variant)
    served: Path  # the file the service serves: every other target loads this one
    threads: int
    image: bytes
    reference: dict[str, float]  # ONNX Runtime alone's probabilities for the image
    classifier: object  # peer_model.Classifier in this process
    tensor: object
    requests: int
    limit_s: float
    logs: Path
    pythons: dict[str, Path] = field(default_factory=dict)


def measure_round(target: Target, ctx: Context) -> dict:
    if target.kind == "inprocess":
        if target.name == "ort":
            batch = ctx.tensor[None]
            work = lambda: ctx.classifier.session.run(ctx.classifier.outputs, {"image": batch})
        else:
            work = lambda: ctx.classifier.predict(ctx.image)
        inprocess(work, 4, 8, ctx.limit_s)  # warm-up
        return {str(c): inprocess(work, c, ctx.requests, ctx.limit_s) for c in LEVELS}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    if target.kind == "service":
        env.update({"BTD_HOST": "127.0.0.1", "BTD_PORT": str(port), "BTD_MODEL_PATH": str(ctx.model),
                    **target.env})
        argv, cwd = [sys.executable, "-m", "app"], REPO
    else:
        env.update({"PYTHONPATH": f"{REPO}{os.pathsep}{PEERS_DIR}", "BTD_BENCH_MODEL": str(ctx.served),
                    "BTD_BENCH_THREADS": str(ctx.threads), **target.env})
        argv, cwd = target.argv(ctx.pythons[target.name], port), PEERS_DIR
    path, body, content_type = target.request(ctx.image)
    request = http_request(path, body, content_type)
    log = ctx.logs / f"{target.name}.log"
    with Server(argv, env, cwd, port, target.ready_path, target.ready_timeout_s, log) as server:
        check_answer(target, port, path, body, content_type, ctx.reference)
        load(port, request, 4, 8, server.proc.pid, ctx.limit_s)  # warm-up
        result = {str(c): load(port, request, c, ctx.requests, server.proc.pid, ctx.limit_s) for c in LEVELS}
        if target.kind == "service":
            result["served"] = served_by_service(port)
    return result


def check_answer(target: Target, port: int, path: str, body: bytes, content_type: str,
                 reference: Mapping[str, float]) -> None:
    """The server answers the image with ONNX Runtime alone's probabilities (same file, same tensor)."""
    import httpx

    response = httpx.post(f"http://127.0.0.1:{port}{path}", content=body, headers={"Content-Type": content_type},
                          timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"answered {response.status_code}: {response.text[:300]}")
    got = target.probabilities(response.json())
    worst = max(abs(float(got[k]) - v) for k, v in reference.items())
    if worst > 1e-3:
        raise RuntimeError(f"probabilities differ from ONNX Runtime alone's by {worst:.4f}: {dict(got)}")


def served_by_service(port: int) -> dict:
    import httpx

    model = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json()
    return {k: model.get(k) for k in ("variant", "sha256", "batch_buckets", "provider", "host_work")}


# ---------------------------------------------------------------- the run


def installed_versions(python: Path, packages: Sequence[str]) -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\nfor p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    try:
        done = subprocess.run([str(python), "-c", code, *packages], check=False, capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


PEER_PACKAGES = {"fastapi": ["fastapi", "uvicorn"], "kserve": ["kserve"], "litserve": ["litserve"],
                 "bentoml": ["bentoml"], "ray": ["ray"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-peers.json", help="the JSON report")
    parser.add_argument("--peers", default=",".join(DEFAULT_TARGETS),
                        help=f"comma list of targets, in table order (known: {', '.join(ALL_TARGETS)}; "
                             "ort is always measured: every ratio is to it)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (at least 3)")
    parser.add_argument("--requests", type=int, default=200, help="answered requests per client level and round")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="the model the service is given; it serves its CPU variant (the INT8 file beside "
                             "it), which every other target loads")
    parser.add_argument("--limit-s", type=float, default=120.0, help="longest one measurement may take")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(ALL_TARGETS)}")
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    if "ort" not in names:
        names.insert(0, "ort")
    names = list(dict.fromkeys(names))

    sys.path[:0] = [str(REPO), str(PEERS_DIR)]
    import onnxruntime as ort
    from peer_model import Classifier

    from app.engine.engine import choose_model_file
    from app.engine.runner import available_cpus

    served, variant = choose_model_file(args.model, "auto", on_gpu=False)
    threads = available_cpus()
    image, image_note = sample_image()
    classifier = Classifier(str(served), threads)
    tensor = classifier.tensor(image)
    reference = classifier.predict(image)["probabilities"]
    logs = REPO / "runs" / "bench-peers-logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.model, served, threads, image, reference, classifier, tensor, args.requests, args.limit_s,
                  logs)
    skipped: dict[str, str] = {}
    versions: dict[str, dict] = {}
    started = time.perf_counter()
    print(f"model {served} ({variant}), image {image_note}, {threads} ONNX Runtime threads, "
          f"{args.rounds} rounds x {args.requests} requests per level; server logs in {logs}", flush=True)
    for name in names:
        if TARGETS[name].kind == "peer":
            try:
                ctx.pythons[name] = ensure_venv(name)
                versions[name] = installed_versions(ctx.pythons[name], PEER_PACKAGES[name] + ["onnxruntime"])
            except RuntimeError as exc:
                skipped[name] = str(exc)
                print(f"  {name}: skipped: {exc}", flush=True)
    active = [n for n in names if n not in skipped]
    results: dict[str, list[dict]] = {n: [] for n in active}
    served_info: dict[str, dict] = {}
    for round_no in range(args.rounds):
        order = active[round_no % len(active):] + active[:round_no % len(active)]
        for name in order:
            if name in skipped:
                continue
            t0 = time.perf_counter()
            try:
                measured = measure_round(TARGETS[name], ctx)
            except Exception as exc:  # noqa: BLE001 (a peer that cannot serve here is reported, not fatal)
                skipped[name] = f"round {round_no + 1}: {type(exc).__name__}: {exc}"[:2000]
                print(f"  {name}: skipped: {skipped[name][:400]}", flush=True)
                continue
            if "served" in measured:
                served_info[name] = measured.pop("served")
            results[name].append(measured)
            brief = ", ".join(f"{c} cl {m['images_per_s']:.1f}/s" for c, m in measured.items())
            print(f"  round {round_no + 1} {name}: {brief} ({time.perf_counter() - t0:.0f} s)", flush=True)
    summaries = {n: summarise(results[n]) for n in active if n not in skipped and results[n]}
    labels = {n: TARGETS[n].label for n in ALL_TARGETS}
    table = markdown_table(summaries, labels, skipped)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": threads, "cores_online": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": ort.__version__,
                    "loadavg_at_start_and_end": None},
        "model": str(args.model), "served_file": str(served), "variant": variant,
        "served_sha256": hashlib.sha256(served.read_bytes()).hexdigest(),
        "image": image_note, "rounds": args.rounds, "requests_per_level": args.requests,
        "client_levels": list(LEVELS), "onnxruntime_threads": threads,
        "targets": {n: {"label": labels[n], "summary": summaries[n],
                        "rounds": [{c: {k: v for k, v in m.items() if k != "latencies_ms"} for c, m in r.items()}
                                   for r in results[n]],
                        **({"served": served_info[n]} if n in served_info else {}),
                        **({"versions": versions[n]} if n in versions else {})} for n in summaries},
        "skipped": skipped,
        "ratios_to_ort_alone": ratios(summaries),
        "goals": goals(summaries),
        "table": table, "table_note": TABLE_NOTE,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    del report["machine"]["loadavg_at_start_and_end"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(table)
    print(f"\n{TABLE_NOTE}")
    print("goals:", json.dumps(report["goals"], indent=2))
    print(f"written {args.out} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
