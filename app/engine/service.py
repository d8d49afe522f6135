"""The asynchronous front of the ``Engine`` behind the HTTP routes: admission control, host work in a
pool, the micro-batcher, the request timeout and the metrics. Transport-free (no FastAPI): routes
hand it bytes and get a ``Prediction`` or a typed error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from app.core.decode import DICOM, sniff
from app.core.errors import InferenceTimeout
from app.core.postprocess import cam_images
from app.core.region import tumour_region
from app.core.result import ModelOutput, Prediction
from app.engine import metrics
from app.engine.admission import Admission
from app.engine.batcher import MicroBatcher
from app.engine.budget import DecodeBudget, decode_cost, worst_cost
from app.engine.engine import Engine, EngineOptions
from app.engine.host import HostWork, MixedHost, ProcessHost, ThreadHost
from app.engine.malloc import IdleTrim
from app.engine.pipeline import InputFacts, check_cam_mode, ms_since, prepare, tensor_facts
from app.engine.runner import GPU_PROVIDERS, available_cpus


@dataclass(frozen=True)
class RawOutputs:
    """What the Open Inference Protocol answers: the model's own outputs, no decision."""

    logits: np.ndarray  # float32 [N, C]
    ood_score: np.ndarray | None  # float32 [N]; None when the model has no OOD output
    facts: tuple[InputFacts, ...] = ()  # per input, what a prediction record keeps of it
    # per input, the out-of-distribution reasons its image gave (image bytes: modality, no-head,
    # small-image; a tensor gives none), for the one decision its audit line and record are made of
    image_reasons: tuple[list[str], ...] = ()
    tumour_map: np.ndarray | None = None  # float32 [N, 1, h, w]; None when the model does not localise


class Answer(NamedTuple):
    """One answered image: the prediction, the DICOM attributes its results copy (when asked for),
    and what a prediction record keeps of the input."""

    prediction: Prediction
    source: Any
    facts: InputFacts | None


@dataclass(frozen=True)
class ServiceOptions:
    max_wait_s: float | None = None  # longest the oldest request waits for company in the batcher; None: auto
    queue_size: int = 64  # requests that may wait for the model, decoding included
    max_queue_wait_s: float = 1.0  # refuse new requests while the oldest waiting one has waited longer
    request_timeout_s: float = 30.0
    host_workers: int | None = None  # processes for decode/preprocess/CAM images; 0: threads; None: auto
    host_task_timeout_s: float | None = None  # a host task past this: its worker is killed (None: no limit)
    host_memory_limit_bytes: int | None = None  # address-space limit of each host worker process
    decode_budget_bytes: int | None = None  # memory all decodes may take at once (app.engine.budget)
    max_pixels: int = 4096 * 4096  # the largest image a cost reading counts (BTD_MAX_PIXELS)


# The batcher's wait when not set. On the CPU a batch costs more CPU an image than batch 1 and waiting
# only adds latency: the model takes whatever waits when it is free (a burst still batches). On a GPU
# a few ms buy full batches (README, "The inference engine").
CPU_MAX_WAIT_S = 0.0
GPU_MAX_WAIT_S = 0.005


def auto_max_wait_s(on_gpu: bool) -> float:
    return GPU_MAX_WAIT_S if on_gpu else CPU_MAX_WAIT_S


def auto_host_workers(on_gpu: bool) -> int:
    """Host worker processes when not set: on a GPU node every core but one (the event loop's);
    on the CPU none (threads): the model needs the cores there (README, "The inference engine")."""
    return max(1, available_cpus() - 1) if on_gpu else 0


ISOLATION_WORKERS = 1  # worker processes for DICOM beside the threads (CPU default)


def host_work(options: ServiceOptions, on_gpu: bool = False) -> HostWork:
    """Processes when asked for (or auto on a GPU node); threads when BTD_HOST_WORKERS=0; auto on the
    CPU: threads, with DICOM decoding (GIL-bound, crash-prone codecs) in one worker process."""
    workers = auto_host_workers(on_gpu) if options.host_workers is None else options.host_workers
    limits = {"task_timeout_s": options.host_task_timeout_s, "memory_limit_bytes": options.host_memory_limit_bytes}
    if workers > 0:
        return ProcessHost(workers, **limits)
    threads = ThreadHost(max(2, available_cpus()))
    if options.host_workers is None:
        return MixedHost(threads, ProcessHost(ISOLATION_WORKERS, **limits))
    return threads


class InferenceService:
    def __init__(self, engine: Engine, options: ServiceOptions, host: HostWork | None = None) -> None:
        self.engine = engine
        self.options = options
        on_gpu = engine.runner.provider in GPU_PROVIDERS
        self.host = host or host_work(options, on_gpu)
        self.max_wait_s = auto_max_wait_s(on_gpu) if options.max_wait_s is None else options.max_wait_s
        self.admission = Admission(options.queue_size, options.max_queue_wait_s, on_depth=metrics.QUEUE_DEPTH.set)
        self.decode_budget = DecodeBudget(options.decode_budget_bytes or worst_cost(options.max_pixels),
                                          on_change=metrics.DECODE_BYTES.set)
        self.batcher = MicroBatcher(self._run_batch, max_batch_size=engine.max_batch_size,
                                    max_wait_s=self.max_wait_s, on_batch=metrics.BATCH_SIZE.observe,
                                    max_runs=engine.runner.model_runs)
        self.idle_trim = IdleTrim()  # freed memory goes back to the system once a burst is over

    @classmethod
    def load(cls, model_path, engine_options: EngineOptions, options: ServiceOptions) -> InferenceService:
        """Load, check and warm up the model and start the host workers (blocking: call it in a thread)."""
        engine = Engine.load(model_path, engine_options)
        service = cls(engine, options)
        service.host.warm_up()
        return service

    def _run_batch(self, prepared, features):
        started = time.perf_counter()
        outputs = self.engine.infer_prepared(prepared, features)
        self.admission.observe_batch(len(prepared), time.perf_counter() - started)
        return outputs

    def start(self) -> None:
        self.batcher.start()
        meta, runner = self.engine.metadata, self.engine.runner
        metrics.set_model_info(meta.model_name, meta.model_version, self.engine.model.sha256, runner.provider)

    async def predict(self, data: bytes, media_type: str | None, cam: str = "none", *,
                      batch_file: bool = False) -> Prediction:
        """One image -> ``Prediction``; typed errors for bad input, ``Overloaded`` above capacity,
        ``InferenceTimeout`` past the request timeout. A ``batch_file`` of a request already past
        ``refuse_if_full`` waits for the decode budget instead of being refused for it."""
        return (await self.answer(data, media_type, cam, batch_file=batch_file)).prediction

    async def answer(self, data: bytes, media_type: str | None, cam: str = "none", *, batch_file: bool = False,
                     source: bool = False) -> Answer:
        """``predict``, with what a prediction record keeps of the input (``Answer.facts``) and, with
        ``source``, the attributes a DICOM's results copy (``dicom_read.results_header``), read with the
        pixels in the same isolated decode: the server never parses the file itself."""
        return await self._predict_admitted(data, media_type, cam, batch_file, source)

    async def _predict_admitted(self, data: bytes, media_type: str | None, cam: str, batch_file: bool,
                                source: bool) -> Answer:
        check_cam_mode(cam)
        started = time.perf_counter()
        kind = sniff(data)  # the one sniff of this request: the cost, the host and the decoder read it
        cost = decode_cost(data, self.options.max_pixels, kind)
        if not batch_file:
            self.decode_budget.check(cost)  # admission by decoded pixels, before the count and wait checks
        ticket = self.admission.admit()
        timeout = self.options.request_timeout_s
        try:
            with metrics.IN_FLIGHT.track_inprogress(), self.idle_trim.busy():  # admitted: the upload is complete
                answer = await asyncio.wait_for(
                    self._predict(data, media_type, cam, started, ticket, cost, kind, source), timeout)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"the request took longer than {timeout:g} s") from None
        finally:
            self.admission.stop_waiting(ticket)
        metrics.observe_prediction(answer.prediction)
        return answer

    async def _prepare(self, data: bytes, media_type: str | None, cost: int, kind: str | None, view: bool = False,
                       source: bool = False):
        """Decode and preprocess within the decode budget; DICOM where its codecs cannot stall or crash
        the server and its parsing runs under the worker's memory and time limits (a worker process,
        unless BTD_HOST_WORKERS=0). ``kind``: ``sniff(data)``, the request's one sniff."""
        run = self.host.run_isolated if kind == DICOM else self.host.run
        async with self.decode_budget.hold(cost):
            return await run(prepare, data, media_type, self.engine.prepare_options, view, source, kind)

    async def _predict(self, data: bytes, media_type: str | None, cam: str, started: float,
                       ticket: int, cost: int, kind: str | None, source: bool = False) -> Answer:
        engine = self.engine
        prepared = await self._prepare(data, media_type, cost, kind, cam == "png", source)
        output = await self.batcher.submit(prepared, cam != "none",
                                           on_start=lambda: self.admission.stop_waiting(ticket))
        cam_result, cam_ms = None, 0.0
        if cam == "png":  # the images are encoded by the host workers too
            cam_start = time.perf_counter()
            cam_result = await self.host.run(cam_images, prepared.view, engine.builder.cam_grid(output),
                                             prepared.framing, prepared.image_size)
            cam_ms = ms_since(cam_start)
        builder = engine.builder
        region_result = None, 0.0
        if builder.wants_region(output, builder.decide(output.logits, output.ood_score, prepared.image_reasons)):
            region_start = time.perf_counter()  # placing the map on the image: host work, as the CAM's images
            region = await self.host.run(tumour_region, output.tumour_map, engine.metadata.localisation,
                                         prepared.framing, prepared.image_size)
            region_result = region, ms_since(region_start)
        prediction = builder.build(prepared, output, cam, started=started, cam_result=cam_result, cam_ms=cam_ms,
                                   region_result=region_result)
        return Answer(prediction, prepared.source, prepared.facts)

    async def infer_raw(self, inputs: Sequence[np.ndarray | bytes]) -> RawOutputs:
        """Model inputs ``[channels, size, size]`` (or image bytes, prepared as ``predict`` does) -> raw
        logits ``[N, C]``, OOD scores and tumour maps, through the micro-batcher: the same admission, queue and
        timeout as ``predict``."""
        timeout = self.options.request_timeout_s
        metrics.IN_FLIGHT.inc(len(inputs))  # admitted work: one per image, as predict counts
        try:
            with self.idle_trim.busy():
                return await asyncio.wait_for(self._infer_raw(inputs), timeout)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"the request took longer than {timeout:g} s") from None
        finally:
            metrics.IN_FLIGHT.dec(len(inputs))

    async def _infer_raw(self, inputs: Sequence[np.ndarray | bytes]) -> RawOutputs:
        kinds = [None if isinstance(item, np.ndarray) else sniff(item) for item in inputs]
        costs = [0 if kind is None else decode_cost(item, self.options.max_pixels, kind)
                 for item, kind in zip(inputs, kinds)]
        self.decode_budget.check(sum(costs))

        async def one(item: np.ndarray | bytes, cost: int,
                      kind: str | None) -> tuple[ModelOutput, InputFacts | None, list[str]]:
            ticket = self.admission.admit()
            try:
                if isinstance(item, np.ndarray):
                    model_input, facts, reasons = item, tensor_facts(item), []
                else:
                    model_input = await self._prepare(item, None, cost, kind)
                    facts, reasons = model_input.facts, model_input.image_reasons
                out = await self.batcher.submit(model_input, False, on_start=lambda: self.admission.stop_waiting(ticket))
            finally:
                self.admission.stop_waiting(ticket)
            return out, facts, reasons

        answered = await asyncio.gather(*(one(item, cost, kind) for item, cost, kind in zip(inputs, costs, kinds)))
        outs = [out for out, _, _ in answered]
        scores = None if outs[0].ood_score is None else np.array([float(o.ood_score) for o in outs], np.float32)
        maps = None if outs[0].tumour_map is None else np.stack([o.tumour_map for o in outs])[:, None]
        return RawOutputs(np.stack([o.logits for o in outs]), scores, tuple(facts for _, facts, _ in answered),
                          tuple(reasons for _, _, reasons in answered), maps)

    def refuse_if_full(self) -> None:
        """``Overloaded`` (503 with Retry-After) at once when a new request would be refused: for a
        batch request, before its files are read and decoded (its files then wait for the decode
        budget, they are not refused one by one)."""
        self.decode_budget.check()
        self.admission.check()

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns."""
        return {**self.engine.describe(), "max_batch_size": self.batcher.max_batch_size,
                "max_wait_ms": self.max_wait_s * 1000.0, "host_workers": self.host.workers,
                "host_work": self.host.kind, "isolated_decoders": self.host.isolated}

    async def close(self, timeout_s: float) -> None:
        await self.batcher.close(timeout_s)
        self.host.close()
