"""A series through the engine: DICOM instances (one series) or a NIfTI volume -> its slices in order ->
one prediction each -> ``SeriesResult`` (the slices and the finding, ``app.core.series``).

Two fronts, one plan: ``predict_*_sync`` for ``btd predict`` (``Engine``, batch 1, this process) and
``answer_*`` for the HTTP route (``InferenceService``: headers read in the isolated DICOM worker, the
slices through the micro-batcher, so a series' slices batch together).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from app.core.decode import DICOM, read_slice_geometry
from app.core.errors import InferenceTimeout
from app.core.nifti import NIFTI_MEDIA_TYPE, VOLUME_MEMORY_FACTOR, Volume, is_gzip, read_volume
from app.core.series import SeriesResult, plan_dicom_series
from app.engine.engine import Engine
from app.engine.pipeline import InputFacts, prepare_slice
from app.engine.service import Answer, InferenceService

T = TypeVar("T")


@dataclass(frozen=True)
class SeriesLimits:
    max_slices: int = 512  # BTD_MAX_SERIES_SLICES
    max_volume_bytes: int = 128 * 1024 * 1024  # BTD_MAX_VOLUME_BYTES: a NIfTI file, inflated
    timeout_s: float = 300.0  # BTD_SERIES_TIMEOUT_S: a whole series, once received
    max_cam_slices: int = 200  # BTD_MAX_SERIES_CAM_SLICES: most slices whose CAM images (cam=png) one answer holds


def cam_within(cam: str, slices: int, limits: SeriesLimits) -> tuple[str, list[str]]:
    """(the CAM mode a series of ``slices`` slices is answered with, what the answer says about it).
    ``cam=png`` costs a few hundred kB of base64 per slice in the answer (the slice, its heatmap and
    their blend): past ``max_cam_slices`` the series is still answered, without images, and says so."""
    if cam != "png" or slices <= limits.max_cam_slices:
        return cam, []
    said = (f"no class activation maps: the series has {slices} slices, cam=png is answered for at most "
            f"{limits.max_cam_slices} (BTD_MAX_SERIES_CAM_SLICES)")
    return "none", [said]


def _volume(data: bytes, limits: SeriesLimits, max_pixels: int) -> Volume:
    return read_volume(data, max_bytes=limits.max_volume_bytes, max_slices=limits.max_slices, max_pixels=max_pixels)


# ---------------------------------------------------------------------------------- synchronous (CLI)

def predict_dicom_series_sync(engine: Engine, instances: Sequence[bytes], limits: SeriesLimits,
                              cam: str = "none") -> SeriesResult:
    """The instances of one DICOM series -> its result, at batch 1 in this process."""
    max_pixels = engine.options.max_pixels
    plan, ordering = plan_dicom_series([read_slice_geometry(d, max_pixels) for d in instances], limits.max_slices)
    slices = []
    for instance, geometry, position in plan:
        started = time.perf_counter()
        frame = None if geometry.frame_number is None else geometry.frame_number - 1
        prepared = engine.prepare(instances[instance], DICOM, cam, frame_index=frame)
        slices.append((position, geometry.instance_uid, geometry.frame_number,
                       engine.predict_prepared(prepared, cam, started=started)))
    return SeriesResult.build("dicom", ordering, slices)


def predict_volume_sync(engine: Engine, data: bytes, limits: SeriesLimits, cam: str = "none") -> SeriesResult:
    """A NIfTI volume -> its result, at batch 1 in this process."""
    volume = _volume(data, limits, engine.options.max_pixels)
    slices = []
    for k, position in enumerate(volume.positions):
        started = time.perf_counter()
        prepared = prepare_slice(volume.slice(k), NIFTI_MEDIA_TYPE, engine.prepare_options, cam == "png")
        slices.append((position, None, None, engine.predict_prepared(prepared, cam, started=started)))
    return SeriesResult.build("nifti", "position", slices, volume.warnings)


# ------------------------------------------------------------------------------------ the service

def _concurrency(service: InferenceService) -> int:
    """Slices of one series in flight at once: enough for full batches, well inside the queue, so a
    series does not refuse itself (or crowd out single-slice requests)."""
    return max(1, min(2 * service.engine.max_batch_size, service.options.queue_size // 2))


async def _bounded(calls: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def _within(coro: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except asyncio.TimeoutError:
        raise InferenceTimeout(f"the series took longer than {timeout_s:g} s (BTD_SERIES_TIMEOUT_S)") from None


@dataclass(frozen=True)
class DicomSeriesAnswer:
    """A DICOM series answered: its result, and per slice (slice order) the answer and the index of its
    instance among those sent (a multi-frame instance holds several slices)."""

    result: SeriesResult
    answers: list[Answer]
    instances: list[int]

    @property
    def facts(self) -> list[InputFacts | None]:
        return [a.facts for a in self.answers]


async def answer_dicom_series(service: InferenceService, instances: Sequence[bytes], limits: SeriesLimits,
                              cam: str = "none", source: bool = False) -> DicomSeriesAnswer:
    """The instances of one DICOM series -> its answer. Each header is read in the isolated DICOM worker
    (under its limits), never in the server; ``source``: each answer carries the attributes DICOM results
    copy (``Answer.source``)."""
    service.refuse_if_full()
    return await _within(_dicom(service, instances, limits, cam, source), limits.timeout_s)


async def _dicom(service: InferenceService, instances: Sequence[bytes], limits: SeriesLimits, cam: str,
                 source: bool) -> DicomSeriesAnswer:
    max_pixels, limit = service.options.max_pixels, _concurrency(service)
    headers = await _bounded([lambda d=d: service.host.run_isolated(read_slice_geometry, d, max_pixels)
                              for d in instances], limit)
    plan, ordering = plan_dicom_series(headers, limits.max_slices)
    cam, said = cam_within(cam, len(plan), limits)
    answers: list[Answer] = await _bounded(
        [lambda i=i, g=g: service.answer(instances[i], DICOM, cam, batch_file=True, source=source,
                                         frame_index=None if g.frame_number is None else g.frame_number - 1)
         for i, g, _ in plan], limit)
    slices = [(pos, g.instance_uid, g.frame_number, a.prediction) for (_, g, pos), a in zip(plan, answers)]
    return DicomSeriesAnswer(SeriesResult.build("dicom", ordering, slices, said), answers, [i for i, _, _ in plan])


async def answer_volume(service: InferenceService, data: bytes, limits: SeriesLimits,
                        cam: str = "none") -> tuple[SeriesResult, list[InputFacts | None]]:
    """A NIfTI volume -> (its result, each slice's record facts). The volume is read in a host worker."""
    service.refuse_if_full()
    return await _within(_nifti(service, data, limits, cam), limits.timeout_s)


def volume_cost(data: bytes, limits: SeriesLimits) -> int:
    """Memory reading a NIfTI body may take (its decode budget): a .nii.gz's inflated size is known only
    once inflated, so it is costed at the limit."""
    return VOLUME_MEMORY_FACTOR * (limits.max_volume_bytes if is_gzip(data) else len(data))


async def _nifti(service: InferenceService, data: bytes, limits: SeriesLimits,
                 cam: str) -> tuple[SeriesResult, list[InputFacts | None]]:
    async with service.decode_budget.hold(volume_cost(data, limits)):  # held while the volume lives
        volume = await service.host.run(_volume, data, limits, service.options.max_pixels)
        cam, said = cam_within(cam, len(volume), limits)
        answers: list[Answer] = await _bounded(
            [lambda k=k: service.answer_slice(volume.slice(k), NIFTI_MEDIA_TYPE, cam) for k in range(len(volume))],
            _concurrency(service))
        slices = [(pos, None, None, a.prediction) for pos, a in zip(volume.positions, answers)]
    return SeriesResult.build("nifti", "position", slices, [*volume.warnings, *said]), [a.facts for a in answers]
