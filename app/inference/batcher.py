"""Dynamic micro-batching in front of the (blocking) model call.

Requests wait in a bounded queue; one worker task takes up to ``max_batch_size`` of them, waiting
at most ``max_wait_s`` after the oldest arrived, stacks them and runs the model in a dedicated
thread, so ``session.run`` never blocks the event loop. A full queue is refused at once
(``Overloaded``: 503 with Retry-After) instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from app.errors import ModelNotReady, Overloaded

log = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class BatchOutput:
    logits: np.ndarray  # [C] of this request
    features: np.ndarray  # [K, h, w] of this request
    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass
class _Item:
    tensor: np.ndarray
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_s: float, queue_size: int,
                 on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_depth or (lambda n: None)
        self._items: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btd-infer")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._busy = False

    @property
    def depth(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="btd-batcher")

    def refuse_if_full(self) -> None:
        """``Overloaded`` (503 with Retry-After) while the queue is full."""
        if len(self._items) >= self.queue_size:
            retry = max(1, math.ceil(self.max_wait_s + 0.05 * self.queue_size / self.max_batch_size))
            raise Overloaded(f"the inference queue is full ({self.queue_size} waiting); retry shortly",
                             headers={"Retry-After": str(retry)})

    async def submit(self, tensor: np.ndarray) -> BatchOutput:
        """Queue one preprocessed image; resolves when its batch has run."""
        if self._closing or self._task is None:
            raise ModelNotReady("the server is shutting down")
        self.refuse_if_full()
        future = asyncio.get_running_loop().create_future()
        self._items.append(_Item(tensor, future, time.perf_counter()))
        self._on_depth(len(self._items))
        self._arrived.set()
        return await future  # cancelling this (request timeout) leaves a done future the worker skips

    async def _next_batch(self) -> list[_Item]:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._items[0].enqueued + self.max_wait_s
        while len(self._items) < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = [self._items.popleft() for _ in range(min(self.max_batch_size, len(self._items)))]
        self._on_depth(len(self._items))
        return [item for item in batch if not item.future.done()]

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._next_batch()
            if not items:
                continue
            started = time.perf_counter()
            self._busy = True
            try:
                logits, features = await loop.run_in_executor(
                    self._executor, self._run_batch, np.stack([item.tensor for item in items]))
            except Exception as exc:  # a failing model call fails its batch, not the worker
                log.exception("model call failed for a batch of %d", len(items))
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            inference_ms = (time.perf_counter() - started) * 1000.0
            self._on_batch(len(items))
            for i, item in enumerate(items):
                if not item.future.done():
                    item.future.set_result(BatchOutput(
                        logits[i], features[i], (started - item.enqueued) * 1000.0, inference_ms, len(items)))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new work, finish what is queued (up to ``timeout_s``), then stop the worker."""
        self._closing = True
        self._arrived.set()
        deadline = time.perf_counter() + timeout_s
        while (self._items or self._busy) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self._items:
            if not item.future.done():
                item.future.set_exception(ModelNotReady("the server shut down before this request ran"))
        self._items.clear()
        self._on_depth(0)
        self._executor.shutdown(wait=False, cancel_futures=True)
