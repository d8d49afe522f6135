"""Dynamic micro-batching in front of the (blocking) model call.

Requests wait in a queue; one worker task takes up to ``max_batch_size`` of them, waiting at most
``max_wait_s`` after the oldest arrived, and runs the model on them in a dedicated thread, so
``session.run`` never blocks the event loop. The runner pads each batch to its bucket. How many
requests may wait is the admission's business (``app.engine.admission``), not the queue's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from app.core.errors import ModelNotReady
from app.core.result import ModelOutput

log = logging.getLogger(__name__)

# (inputs, which want features) -> one ModelOutput per input, in order. Blocking. An input is
# whatever the model call takes (a tensor, or a prepared request whose tensor it makes).
RunBatch = Callable[[Sequence[Any], Sequence[bool]], "list[ModelOutput]"]


@dataclass
class _Item:
    tensor: Any
    features: bool
    future: asyncio.Future
    enqueued: float
    on_start: Callable[[], None] | None


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int], None] | None = None, max_runs: int = 1) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_runs = max_runs  # batches in the model at once (the runner's model_runs)
        self._on_batch = on_batch or (lambda n: None)
        self._items: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=max_runs, thread_name_prefix="btd-infer")
        self._runs = asyncio.Semaphore(max_runs)
        self._running: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="btd-batcher")

    async def submit(self, tensor: Any, features: bool = True,
                     on_start: Callable[[], None] | None = None) -> ModelOutput:
        """Queue one preprocessed image; resolves when its batch has run. ``features``: fetch the
        features output for it (a CAM); ``on_start`` is called when its batch is taken."""
        if self._closing or self._task is None:
            raise ModelNotReady("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._items.append(_Item(tensor, features, future, time.perf_counter(), on_start))
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
        live = [item for item in batch if not item.future.done()]
        for item in live:
            if item.on_start is not None:
                item.on_start()
        return live

    async def _worker(self) -> None:
        while True:
            await self._runs.acquire()  # a free model run first: meanwhile the queue keeps filling a batch
            try:
                items = await self._next_batch()
            except BaseException:
                self._runs.release()
                raise
            if not items:
                self._runs.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, [item.tensor for item in items], [item.features for item in items])
        except Exception as exc:  # a failing model call fails its batch, not the worker
            log.exception("model call failed for a batch of %d", len(items))
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._runs.release()
        inference_ms = (time.perf_counter() - started) * 1000.0
        self._on_batch(len(items))
        for item, output in zip(items, outputs):
            if not item.future.done():
                item.future.set_result(replace(output, queue_ms=(started - item.enqueued) * 1000.0,
                                               inference_ms=inference_ms, batch_size=len(items)))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new work, finish what is queued (up to ``timeout_s``), then stop the worker."""
        self._closing = True
        self._arrived.set()
        deadline = time.perf_counter() + timeout_s
        while (self._items or self._running) and time.perf_counter() < deadline:
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
        self._executor.shutdown(wait=False, cancel_futures=True)
