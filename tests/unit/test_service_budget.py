"""The decode budget (app/engine/budget.py): each image's cost read cheaply from its header, decodes
waiting while the budget is full, admission refusing while more than a budget's worth waits; and
the service sending DICOM decoding to a worker process while rasters stay in threads."""

from __future__ import annotations

import asyncio
import io

import cv2
import numpy as np
import pydicom
import pytest

from app.core.errors import Overloaded
from app.core.formats import DICOM_BYTES_PER_PIXEL, RASTER_BYTES_PER_PIXEL
from app.engine.budget import DecodeBudget, decode_cost, worst_cost
from tests.hostile_inputs import dicom_sample, jpeg_bomb, png_bomb, small_jpeg

MAX_PIXELS = 4096 * 4096


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# --- costs ------------------------------------------------------------------------------------------


def test_png_cost_comes_from_its_ihdr_and_a_bomb_costs_nothing():
    png = cv2.imencode(".png", np.zeros((300, 200, 3), np.uint8))[1].tobytes()
    assert decode_cost(png, MAX_PIXELS) == 300 * 200 * RASTER_BYTES_PER_PIXEL
    assert decode_cost(png_bomb(), MAX_PIXELS) == 0  # over the pixel limit: refused by its header, never decoded


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_cost_comes_from_its_first_frame_header(progressive):
    assert decode_cost(small_jpeg((30, 40, 3), progressive), MAX_PIXELS) == 30 * 40 * RASTER_BYTES_PER_PIXEL
    assert decode_cost(jpeg_bomb(fill_bytes=2), MAX_PIXELS) == 0


def test_jpeg_whose_frame_header_is_not_in_its_head_costs_the_most():
    data = small_jpeg((30, 40))
    big_app = b"\xff\xe1" + (65535).to_bytes(2, "big") + bytes(65533)
    assert decode_cost(data[:2] + big_app + data[2:], MAX_PIXELS) == MAX_PIXELS * RASTER_BYTES_PER_PIXEL


def test_dicom_cost_reads_rows_and_columns_in_either_vr_and_counts_the_file():
    for name in ("MR_small.dcm", "MR_small_implicit.dcm"):
        data = dicom_sample(name)
        assert decode_cost(data, MAX_PIXELS) == 64 * 64 * DICOM_BYTES_PER_PIXEL + len(data), name  # 1 sample
    rgb = dicom_sample("SC_rgb_jpeg.dcm")
    assert decode_cost(rgb, MAX_PIXELS) == 256 * 256 * 3 * DICOM_BYTES_PER_PIXEL + len(rgb)
    ds = pydicom.dcmread(io.BytesIO(dicom_sample("MR_small.dcm")))
    del ds.SamplesPerPixel
    unsaid = dicom_bytes(ds)
    assert decode_cost(unsaid, MAX_PIXELS) == 64 * 64 * 3 * DICOM_BYTES_PER_PIXEL + len(unsaid)  # assume colour


def test_dicom_without_a_readable_size_costs_the_most():
    ds = pydicom.dcmread(io.BytesIO(dicom_sample("MR_small.dcm")))
    ds.add_new(0x00091010, "OB", bytes(70_000))  # pushes Rows / Columns past the cheap look
    del ds.Rows
    data = dicom_bytes(ds)
    assert decode_cost(data, MAX_PIXELS) == worst_cost(MAX_PIXELS) + len(data)


def test_bytes_that_are_no_image_cost_nothing():
    assert decode_cost(b"hello", MAX_PIXELS) == 0


# --- the budget -------------------------------------------------------------------------------------


def test_decodes_wait_first_come_first_served_while_the_budget_is_full():
    async def scenario():
        budget = DecodeBudget(100)
        order, release = [], {name: asyncio.Event() for name in "abcd"}

        async def decode(name: str, cost: int) -> None:
            async with budget.hold(cost):
                order.append(name)
                await release[name].wait()

        tasks = [asyncio.create_task(decode(n, c)) for n, c in (("a", 60), ("b", 60), ("c", 30), ("d", 10))]
        await asyncio.sleep(0.01)
        assert order == ["a"] and budget.running == 60 and budget.waiting == 100  # c fits, yet waits behind b
        release["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c", "d"] and budget.running == 100 and budget.waiting == 0
        for event in release.values():
            event.set()
        await asyncio.gather(*tasks)
        assert budget.running == 0

    asyncio.run(scenario())


def test_admission_refuses_while_more_than_a_budget_waits():
    async def scenario():
        budget = DecodeBudget(100)
        budget.check(100)  # nothing waits: any single image is admitted
        gate = asyncio.Event()

        async def decode(cost: int) -> None:
            async with budget.hold(cost):
                await gate.wait()

        tasks = [asyncio.create_task(decode(c)) for c in (100, 70)]
        await asyncio.sleep(0.01)
        budget.check(30)  # 70 waiting + 30 fits in one budget
        with pytest.raises(Overloaded) as refused:
            budget.check(31)
        assert int(refused.value.headers["Retry-After"]) >= 1
        gate.set()
        await asyncio.gather(*tasks)
        budget.check(10**6)

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_place_back():
    async def scenario():
        budget = DecodeBudget(100)
        gate = asyncio.Event()

        async def decode(cost: int) -> None:
            async with budget.hold(cost):
                await gate.wait()

        running = asyncio.create_task(decode(80))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(decode(50))
        await asyncio.sleep(0.01)
        assert budget.waiting == 50
        waiter.cancel()
        await asyncio.sleep(0.01)
        assert budget.waiting == 0 and budget.running == 80
        gate.set()
        await running
        assert budget.running == 0

    asyncio.run(scenario())


def test_an_image_dearer_than_the_whole_budget_still_runs_alone():
    async def scenario():
        budget = DecodeBudget(100)
        async with budget.hold(500):
            assert budget.running == 100

    asyncio.run(scenario())


# --- where decoding runs ----------------------------------------------------------------------------


class RecordingHost:
    kind, isolated, workers = "threads", "dicom", 2

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def run(self, fn, *args):
        self.calls.append("thread")
        return fn(*args)

    async def run_isolated(self, fn, *args):
        self.calls.append("process")
        return fn(*args)

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_service_decodes_dicom_isolated_and_rasters_in_threads(tmp_path):
    from app.engine.engine import Engine
    from app.engine.service import InferenceService, ServiceOptions
    from app.settings import Settings
    from tests.api.helpers import png_bytes
    from tests.model_factory import build_model

    settings = Settings(model_path=build_model(tmp_path / "m.onnx"))
    host = RecordingHost()
    service = InferenceService(Engine.load(settings.model_path, settings.engine_options()), ServiceOptions(), host)

    async def scenario():
        service.start()
        try:
            await service.predict(dicom_sample("MR_small.dcm"), None)
            await service.predict(png_bytes(), None)
            await service.predict(dicom_sample("MR_small_jp2klossless.dcm"), None)
        finally:
            await service.close(1.0)

    asyncio.run(scenario())
    assert host.calls == ["process", "thread", "process"]


def test_cpu_default_host_is_threads_with_dicom_in_a_worker_process():
    from app.engine.host import MixedHost, ProcessHost, ThreadHost
    from app.engine.service import ServiceOptions, host_work

    mixed = host_work(ServiceOptions(host_workers=None), on_gpu=False)
    try:
        assert isinstance(mixed, MixedHost) and mixed.isolated == "dicom" and mixed.kind == "threads"
        assert mixed.processes.workers == 1
    finally:
        mixed.close()
    threads = host_work(ServiceOptions(host_workers=0), on_gpu=False)
    assert isinstance(threads, ThreadHost) and threads.isolated == "none"
    threads.close()
    processes = host_work(ServiceOptions(host_workers=2), on_gpu=False)
    assert isinstance(processes, ProcessHost) and processes.isolated == "all"
    processes.close()
