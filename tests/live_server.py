"""Start the real service (``python -m app``) on a free 127.0.0.1 port for a test, and stop it.

    with live_service(model_path) as base_url:
        httpx.get(f"{base_url}/v1/model")

Bounded waits everywhere; the process is always terminated (then killed) when the block ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_service(model_path: str | Path, **settings: str) -> Iterator[str]:
    """Serve ``model_path``; yields the base URL once ``/readyz`` is 200. ``settings`` are extra
    ``BTD_*`` variables, e.g. ``live_service(path, BTD_MAX_BATCH_SIZE="4")``."""
    port = free_port()
    env = {**os.environ, "BTD_MODEL_PATH": str(model_path), "BTD_HOST": "127.0.0.1", "BTD_PORT": str(port),
           "BTD_INTRA_OP_THREADS": "1", "BTD_LOG_LEVEL": "warning", **settings}
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            wait_ready(base_url, process, log)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)


def wait_ready(base_url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the service exited with {process.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    log.seek(0)
    raise TimeoutError(f"the service was not ready within {READY_TIMEOUT_S:.0f} s:\n{log.read()[-4000:]}")
