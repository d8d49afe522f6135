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
import re
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from app.core.decode import DICOM, DICOM_BYTES_PER_PIXEL, JPEG, PNG, sniff
from app.core.errors import Overloaded

RASTER_BYTES_PER_PIXEL = 17
HEADER_SCAN_BYTES = 64 * 1024  # where a cheap size reading looks (JPEG frame header, DICOM Rows / Columns)
_JPEG_FRAMES = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7})
# (0028,0002) Samples per Pixel, (0028,0010) Rows and (0028,0011) Columns, explicit VR "US" or
# implicit VR, little endian.
_DICOM_SIZE = re.compile(rb"\x28\x00(\x02|\x10|\x11)\x00(?:US\x02\x00|\x02\x00\x00\x00)(..)", re.DOTALL)


def worst_cost(max_pixels: int) -> int:
    return max_pixels * DICOM_BYTES_PER_PIXEL


def decode_cost(data: bytes, max_pixels: int, kind: str | None = None) -> int:
    """Bytes that decoding and preprocessing ``data`` may take at most, from a cheap look at its header.
    A size over the pixel limit costs nothing: the decoder refuses it (413) before allocating.
    ``kind``: ``sniff(data)`` when the caller has it already."""
    kind = kind or sniff(data)
    if kind == PNG and len(data) >= 24:
        pixels = int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
        return _cost(pixels, max_pixels, RASTER_BYTES_PER_PIXEL)
    if kind == JPEG:
        return _cost(_jpeg_pixels(data[:HEADER_SCAN_BYTES]), max_pixels, RASTER_BYTES_PER_PIXEL)
    if kind == DICOM:
        return _cost(_dicom_pixels(data[:HEADER_SCAN_BYTES]), max_pixels, DICOM_BYTES_PER_PIXEL) + len(data)
    return 0  # not an image: refused before anything is decoded


def _cost(pixels: int | None, max_pixels: int, per_pixel: int) -> int:
    if pixels is None:  # not readable cheaply: the largest admissible image
        return max_pixels * per_pixel
    return 0 if pixels > max_pixels else pixels * per_pixel


def _jpeg_pixels(head: bytes) -> int | None:
    """width x height of the first frame header, reading segments only (no scan data), else None."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", head, pos + 2)[0]
        if marker in _JPEG_FRAMES and pos + 9 <= len(head):
            height, width = struct.unpack_from(">HH", head, pos + 5)
            return width * height or None
        if marker == 0xDA:  # the first scan comes before any frame header: not a size we can trust
            return None
        pos += 2 + length
    return None


def _dicom_pixels(head: bytes) -> int | None:
    """The largest Rows x the largest Columns x the most Samples per Pixel found in the head (an
    icon's are smaller than the image's; 3 samples when none is said), else None."""
    found: dict[bytes, list[int]] = {b"\x02": [], b"\x10": [], b"\x11": []}
    for match in _DICOM_SIZE.finditer(head):
        found[match.group(1)].append(int.from_bytes(match.group(2), "little"))
    rows, columns, samples = found[b"\x10"], found[b"\x11"], found[b"\x02"]
    if not rows or not columns:
        return None
    return max(rows) * max(columns) * (max(samples) if samples else 3) or None


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
