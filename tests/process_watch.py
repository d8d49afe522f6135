"""Watching a server process from the outside while it is attacked: its peak resident memory and
the worst latency of its liveness probe.

Peak memory comes from Linux's own high-water mark (``VmHWM`` in /proc/PID/status), reset before
each attack by writing 5 to /proc/PID/clear_refs: exact, unlike sampling, which misses short spikes.
The server's child processes (decode workers) are included: their peaks are added up, an upper
bound of what the pod held at once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

PROC = Path("/proc")


def children(pid: int) -> list[int]:
    found = []
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def process_tree(pid: int) -> list[int]:
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children(current))
    return tree


def status_kb(pid: int, field: str) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # the process ended meanwhile
        pass
    return 0


class Memory:
    """Resident memory of a process and (``children=True``) its child processes, in MiB."""

    def __init__(self, pid: int, *, children: bool = True) -> None:
        self.pid = pid
        self.children = children

    def _pids(self) -> list[int]:
        return process_tree(self.pid) if self.children else [self.pid]

    @staticmethod
    def supported() -> bool:
        return (PROC / "self" / "clear_refs").exists()

    def reset_peak(self) -> None:
        for pid in self._pids():
            try:
                (PROC / str(pid) / "clear_refs").write_text("5")
            except OSError:
                pass

    def peak_mb(self) -> float:
        return sum(status_kb(pid, "VmHWM") for pid in self._pids()) / 1024

    def rss_mb(self) -> float:
        return sum(status_kb(pid, "VmRSS") for pid in self._pids()) / 1024


class LivezWatch:
    """Polls ``/livez`` every ``interval_s`` from a thread; ``worst_s`` is the slowest answer (or the
    time waited for one that has not come) since the last ``reset``. A failed probe counts as
    ``timeout_s``, as a kubelet would see it."""

    def __init__(self, url: str, interval_s: float = 0.05, timeout_s: float = 5.0) -> None:
        self.url = url + "/livez"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.worst_s = 0.0
        self.failures = 0
        self.probes = 0
        self._pending_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LivezWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 5)

    def reset(self) -> None:
        self.worst_s, self.failures, self.probes = 0.0, 0, 0

    def current_worst_s(self) -> float:
        pending = self._pending_since
        waiting = time.perf_counter() - pending if pending is not None else 0.0
        return max(self.worst_s, waiting)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                started = self._pending_since = time.perf_counter()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                self._pending_since = None
                self.probes += 1
                if not ok:
                    self.failures += 1
                    elapsed = max(elapsed, self.timeout_s)
                self.worst_s = max(self.worst_s, elapsed)
                self._stop.wait(self.interval_s)
