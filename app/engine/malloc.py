"""Give freed memory back to the operating system (glibc, Linux), without paying for it on the
allocations of an ordinary slice.

glibc keeps freed heap memory for reuse, and after each large block is freed it raises the size
above which blocks get their own mapping (a "dynamic mmap threshold", up to 32 MiB). A server that
decodes large images then keeps hundreds of MiB it no longer uses after a burst, round after round
(also at the top of each thread's arena, which ``malloc_trim`` does not shrink). A fixed threshold
gives every block above it its own mapping, unmapped the moment it is freed; at 256 KiB (up to
b19439c) that was every image plane, page-faulted and unmapped per request: CPU per 512x512 JPEG
rose from 35 to 47 ms (issue 22). ``MMAP_THRESHOLD_BYTES`` is therefore above the planes of an
ordinary slice (a 1024x1024 float32 plane is 4 MiB; a 512x512 one 1 MiB) and below those of the
large images that make a burst's memory; and once the server has been idle for ``IDLE_S``
(``IdleTrim``, at most every ``MIN_INTERVAL_S``) ``malloc_trim(0)`` returns the free pages left
inside the heaps, off the hot path. ``bench/bench_inprocess.py`` measures CPU and memory after a
burst. ``return_freed_memory`` is called by ``python -m app`` and in each host worker process,
before any image is decoded.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024  # blocks above: their own mapping (large images' planes)
TRIM_THRESHOLD_BYTES = 8 * 1024 * 1024  # the heap's free top beyond this goes back to the system
IDLE_S = 0.25  # the server trims once no request has run for this long
MIN_INTERVAL_S = 1.0  # and at most this often


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_LOCK = threading.Lock()


def supported() -> bool:
    return _LIBC is not None


def return_freed_memory() -> bool:
    """Set the bounded thresholds; True when glibc took them (False elsewhere: nothing changed)."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def trim() -> bool:
    """Return the heap's free pages to the system now (True when glibc did release some)."""
    if _LIBC is None:
        return False
    with _LOCK:  # one trim at a time; it locks each arena in turn
        return bool(_LIBC.malloc_trim(0))


class IdleTrim:
    """Counts the work in progress (``with idle_trim.busy():``) and trims in a thread once none has run
    for ``idle_s``, at most every ``min_interval_s``: after a burst, never between the requests of one.
    Used on the event loop's thread only."""

    def __init__(self, idle_s: float = IDLE_S, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.idle_s = idle_s
        self.min_interval_s = min_interval_s
        self.trims = 0
        self._active = 0
        self._last_activity = 0.0
        self._last_trim = 0.0
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None

    @contextmanager
    def busy(self) -> Iterator[None]:
        self._active += 1
        self._dirty = True
        try:
            yield
        finally:
            self._active -= 1
            self._last_activity = time.monotonic()
            if self._active == 0 and self._timer is None and supported():
                self._arm(self.idle_s)

    def _arm(self, delay: float) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        except RuntimeError:  # no loop (a synchronous caller): nothing to schedule on
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._active or not self._dirty:
            return
        now = time.monotonic()
        wait = max(self._last_activity + self.idle_s, self._last_trim + self.min_interval_s) - now
        if wait > 0:
            self._arm(wait)
            return
        self._dirty = False
        self._last_trim = now
        self.trims += 1
        asyncio.get_running_loop().run_in_executor(None, self._trim)

    def _trim(self) -> None:
        started = time.perf_counter()
        released = trim()
        log.debug("malloc_trim after a burst: %s in %.1f ms", "released memory" if released else "nothing to release",
                  (time.perf_counter() - started) * 1000.0)
