"""The micro-batcher: batches concurrent requests, keeps results with their requests, refuses a
full queue at once, survives a failing model call, drains on close."""

import asyncio
import threading

import numpy as np
import pytest

from app.errors import ModelNotReady, Overloaded
from app.inference.batcher import MicroBatcher


class RecordingModel:
    """logits[i] = the image's first pixel, so each result can be traced back to its request."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batch_sizes: list[int] = []
        self.gate = gate

    def __call__(self, batch: np.ndarray):
        if self.gate is not None:
            self.gate.wait(5)
        self.batch_sizes.append(len(batch))
        return batch[:, :1, 0, 0], batch[:, :, :2, :2]


def image(value: float) -> np.ndarray:
    return np.full((3, 4, 4), value, np.float32)


def run(coro):
    return asyncio.run(coro)


async def busy_batcher(model: RecordingModel, queue_size: int) -> tuple[MicroBatcher, asyncio.Future]:
    """A batch-1 batcher whose worker is inside the (gated) model with a first request."""
    batcher = MicroBatcher(model, max_batch_size=1, max_wait_s=0.0, queue_size=queue_size)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(image(0)))
    await asyncio.sleep(0.05)  # the worker takes it and blocks in the model
    return batcher, first


def test_concurrent_requests_share_a_batch_and_get_their_own_results():
    model = RecordingModel()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=0.2, queue_size=16)
        batcher.start()
        outs = await asyncio.gather(*(batcher.submit(image(i)) for i in range(5)))
        await batcher.close(1)
        return outs

    outs = run(main())
    assert [float(o.logits[0]) for o in outs] == [0, 1, 2, 3, 4]
    assert model.batch_sizes == [5] and all(o.batch_size == 5 for o in outs)
    assert all(o.features.shape == (3, 2, 2) for o in outs)


def test_batches_never_exceed_max_batch_size():
    model = RecordingModel()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=3, max_wait_s=0.05, queue_size=32)
        batcher.start()
        await asyncio.gather(*(batcher.submit(image(i)) for i in range(10)))
        await batcher.close(1)

    run(main())
    assert sum(model.batch_sizes) == 10 and max(model.batch_sizes) == 3


def test_full_queue_is_refused_with_retry_after():
    gate = threading.Event()
    model = RecordingModel(gate)

    async def main():
        batcher, first = await busy_batcher(model, queue_size=2)
        waiting = [asyncio.ensure_future(batcher.submit(image(i))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(image(3))
        gate.set()
        await asyncio.gather(first, *waiting)
        await batcher.close(1)
        return refused.value

    error = run(main())
    assert error.status == 503 and int(error.headers["Retry-After"]) >= 1


def test_failing_model_fails_only_its_batch():
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return batch[:, :1, 0, 0], batch

    async def main():
        batcher = MicroBatcher(flaky, max_batch_size=4, max_wait_s=0.0, queue_size=4)
        batcher.start()
        with pytest.raises(RuntimeError):
            await batcher.submit(image(1))
        ok = await batcher.submit(image(2))
        await batcher.close(1)
        return ok

    assert float(run(main()).logits[0]) == 2


def test_close_finishes_queued_work_then_refuses():
    model = RecordingModel()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=2, max_wait_s=0.01, queue_size=8)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(image(i))) for i in range(4)]
        await asyncio.sleep(0)
        await batcher.close(2)
        results = await asyncio.gather(*pending)
        with pytest.raises(ModelNotReady):
            await batcher.submit(image(9))
        return results

    assert [float(r.logits[0]) for r in run(main())] == [0, 1, 2, 3]


def test_cancelled_request_is_skipped():
    gate = threading.Event()
    model = RecordingModel(gate)

    async def main():
        batcher, first = await busy_batcher(model, queue_size=4)
        doomed = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.sleep(0.01)
        doomed.cancel()  # e.g. the request timed out while queued
        gate.set()
        await first
        last = await batcher.submit(image(2))
        await batcher.close(1)
        return last

    run(main())
    assert model.batch_sizes == [1, 1]  # the cancelled request never reached the model


def test_request_waits_up_to_max_wait_for_company():
    model = RecordingModel()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=30.0, queue_size=4)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.sleep(0.1)  # well inside the window: the first one is still waiting
        assert not first.done()
        second = asyncio.ensure_future(batcher.submit(image(2)))
        await asyncio.sleep(0)
        await batcher.close(5)  # closing ends the wait: the batch runs with both
        return await first, await second

    first, second = run(main())
    assert first.batch_size == second.batch_size == 2 and model.batch_sizes == [2]
