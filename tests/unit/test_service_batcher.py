"""The micro-batcher: batches concurrent requests, keeps results with their requests, survives a
failing model call, drains on close. (Admission, which refuses a full queue, has its own tests.)"""

import asyncio
import threading

import numpy as np
import pytest

from app.core.errors import ModelNotReady
from app.core.result import ModelOutput
from app.engine.batcher import MicroBatcher


def outputs(tensors, features) -> list[ModelOutput]:
    """logits = the image's first pixel, so each result can be traced back to its request."""
    return [ModelOutput(t[:1, 0, 0], t[:, :2, :2] if f else None) for t, f in zip(tensors, features)]


class RecordingModel:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batch_sizes: list[int] = []
        self.gate = gate

    def __call__(self, tensors, features):
        if self.gate is not None:
            self.gate.wait(5)
        self.batch_sizes.append(len(tensors))
        return outputs(tensors, features)


def image(value: float) -> np.ndarray:
    return np.full((3, 4, 4), value, np.float32)


def run(coro):
    return asyncio.run(coro)


async def busy_batcher(model: RecordingModel) -> tuple[MicroBatcher, asyncio.Future]:
    """A batch-1 batcher whose worker is inside the (gated) model with a first request."""
    batcher = MicroBatcher(model, max_batch_size=1, max_wait_s=0.0)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(image(0)))
    await asyncio.sleep(0.05)  # the worker takes it and blocks in the model
    return batcher, first


def test_concurrent_requests_share_a_batch_and_get_their_own_results():
    model = RecordingModel()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=0.2)
        batcher.start()
        outs = await asyncio.gather(*(batcher.submit(image(i), features=i % 2 == 0) for i in range(5)))
        await batcher.close(1)
        return outs

    outs = run(main())
    assert [float(o.logits[0]) for o in outs] == [0, 1, 2, 3, 4]
    assert model.batch_sizes == [5] and all(o.batch_size == 5 for o in outs)
    assert [o.features is not None for o in outs] == [True, False, True, False, True]
    assert outs[0].features.shape == (3, 2, 2)


def test_on_start_is_called_when_the_batch_is_taken():
    model = RecordingModel()
    started: list[int] = []

    async def main():
        batcher = MicroBatcher(model, max_batch_size=2, max_wait_s=0.05)
        batcher.start()
        await asyncio.gather(*(batcher.submit(image(i), on_start=lambda i=i: started.append(i)) for i in range(3)))
        await batcher.close(1)

    run(main())
    assert sorted(started) == [0, 1, 2]


def test_batches_never_exceed_max_batch_size():
    model = RecordingModel()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=3, max_wait_s=0.05)
        batcher.start()
        await asyncio.gather(*(batcher.submit(image(i)) for i in range(10)))
        await batcher.close(1)

    run(main())
    assert sum(model.batch_sizes) == 10 and max(model.batch_sizes) == 3


def test_failing_model_fails_only_its_batch():
    calls = {"n": 0}

    def flaky(tensors, features):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return outputs(tensors, features)

    async def main():
        batcher = MicroBatcher(flaky, max_batch_size=4, max_wait_s=0.0)
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
        batcher = MicroBatcher(model, max_batch_size=2, max_wait_s=0.01)
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
        batcher, first = await busy_batcher(model)
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
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=30.0)
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


@pytest.mark.parametrize("max_runs", [1, 2])
def test_the_model_runs_as_many_batches_at_once_as_it_may(max_runs):
    """Two requests, batch size 1: with two model runs both are in the model together; with one,
    the second waits for the first (the runs overlap or they do not)."""
    inside, peak, lock, release = [0], [0], threading.Lock(), threading.Event()

    def model(tensors, features):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        release.wait(0.3)  # hold the run long enough for a second to start, if it may
        with lock:
            inside[0] -= 1
        return outputs(tensors, features)

    async def main():
        batcher = MicroBatcher(model, max_batch_size=1, max_wait_s=0.0, max_runs=max_runs)
        batcher.start()
        results = await asyncio.gather(batcher.submit(image(1.0)), batcher.submit(image(2.0)))
        await batcher.close()
        return [float(r.logits[0]) for r in results]

    assert run(main()) == [1.0, 2.0]  # each result still with its request
    assert peak[0] == max_runs


def test_concurrent_runs_of_the_runner_give_each_batch_its_own_answers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from app.core.model import ModelFile
    from app.engine.runner import Runner, RuntimeOptions
    from tests.model_factory import build_model

    runner = Runner.load(ModelFile.load(build_model(tmp_path / "m.onnx")), RuntimeOptions(buckets=(1, 2), model_runs=2))
    assert runner.model_runs == 2 and runner.intra_op_threads >= 1
    runner.warm_up()
    spec = runner.model.metadata.preprocess
    rng = np.random.default_rng(0)
    batches = [[rng.random((spec.channels, spec.size, spec.size), dtype=np.float32) for _ in range(1 + i % 2)]
               for i in range(16)]
    alone = [runner.run(b, features=False).logits for b in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: runner.run(b, features=False).logits, batches))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
