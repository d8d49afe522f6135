"""The decode budget: memory that host work (decode and preprocess) may take at once, across all
concurrent requests and batch files, counted in bytes from each image's decoded size.

Decoding is where memory goes: ``prepare`` peaks at about 17 bytes per decoded pixel of a PNG or
JPEG and 32 of a DICOM (measured with tracemalloc: the decoded planes, the float slice, the
preprocessing's planes; pydicom's copies and LUTs for DICOM). Each image's cost is read from its
header before it is handed to a host worker; while the decodes running would exceed the budget, the
next one waits. A new request is refused at once (503 + Retry-After) when more than a whole budget's
worth of decoding already waits, so memory stays bounded under any mix of legal requests and a
burst does not queue without limit. The cost read here is cheap and conservative (a size that
cannot be read in the first kilobytes counts as the largest admissible image); the decoder checks
the real headers again before it allocates.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from app.core import formats
from app.core.errors import Overloaded


def worst_cost(max_pixels: int) -> int:
    return max_pixels * formats.DICOM_BYTES_PER_PIXEL


def decode_cost(data: bytes, max_pixels: int, kind: str | None = None) -> int:
    """Bytes that decoding and preprocessing ``data`` may take at most, from a cheap look at its header.
    A size over the pixel limit costs nothing: the decoder refuses it (413) before allocating.
    ``kind``: the media type ``sniff(data)`` gave, when the caller has it already."""
    fmt = formats.BY_MEDIA_TYPE.get(kind) if kind else formats.sniff(data)
    if fmt is None:
        return 0  # not an image: refused before anything is decoded
    pixels = fmt.pixels(data[:formats.HEADER_SCAN_BYTES])
    held = len(data) if fmt.cost_includes_file else 0
    if pixels is None:  # not readable cheaply: the largest admissible image
        return max_pixels * fmt.bytes_per_pixel + held
    return (0 if pixels > max_pixels else pixels * fmt.bytes_per_pixel) + held


class DecodeBudget:
    """``hold(cost)``: wait (first come, first served) until ``cost`` bytes fit beside the decodes
    running, hold them meanwhile. ``check(cost)`` refuses a new request while more than the budget
    already waits. One event loop: no lock."""

    def __init__(self, limit_bytes: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit_bytes
        self.running = 0
        self.waiting = 0
        self._queue: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._on_change = on_change or (lambda held: None)

    def check(self, cost: int = 0) -> None:
        if self.waiting and self.waiting + cost > self.limit:
            seconds = max(1, math.ceil(self.waiting / self.limit))  # about one decode round per budget's worth
            raise Overloaded(f"too much image decoding waits ({self.waiting >> 20} MiB of decoded pixels, limit "
                             f"{self.limit >> 20} MiB); retry shortly", headers={"Retry-After": str(seconds)})

    @asynccontextmanager
    async def hold(self, cost: int) -> AsyncIterator[None]:
        cost = min(cost, self.limit)  # a single image never waits for more than the whole budget
        if self._queue or self.running + cost > self.limit:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append((cost, future))
            self.waiting += cost
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # granted just as it was cancelled: give it back
                    self.running -= cost
                    self._grant()
                elif (cost, future) in self._queue:  # (else _grant already dropped it)
                    self._queue.remove((cost, future))
                    self.waiting -= cost
                    self._grant()
                raise
        else:
            self.running += cost
        self._on_change(self.running)
        try:
            yield
        finally:
            self.running -= cost
            self._on_change(self.running)
            self._grant()

    def _grant(self) -> None:
        while self._queue and self.running + self._queue[0][0] <= self.limit:
            cost, future = self._queue.popleft()
            self.waiting -= cost
            if future.cancelled():
                continue
            self.running += cost
            future.set_result(None)
