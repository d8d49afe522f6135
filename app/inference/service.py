"""The asynchronous orchestrator behind the HTTP routes: runner + micro-batcher + the shared
pipeline, with the request timeout and the metrics. Transport-free (no FastAPI): routes hand it
bytes and get the response dict or a typed error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from typing import Any

import numpy as np

from app import metrics
from app.errors import InferenceTimeout
from app.inference.batcher import MicroBatcher
from app.inference.pipeline import check_cam_mode, prepare
from app.inference.predictor import result_builder, runtime_options
from app.inference.runner import Runner, available_cpus
from app.settings import Settings


class InferenceService:
    def __init__(self, runner: Runner, settings: Settings) -> None:
        self.runner = runner
        self.settings = settings
        self.builder = result_builder(runner, settings)
        self.batcher = MicroBatcher(
            runner.run, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size, on_batch=metrics.BATCH_SIZE.observe, on_depth=metrics.QUEUE_DEPTH.set,
        )
        # Decode, preprocess and CAM encoding run here, off the event loop (bounded: one per CPU).
        self._cpu = ThreadPoolExecutor(max_workers=max(2, available_cpus()), thread_name_prefix="btd-cpu")

    @classmethod
    def load(cls, settings: Settings) -> InferenceService:
        """Load, check and warm up the model (blocking: call it in a thread)."""
        runner = Runner.load(settings.model_path, runtime_options(settings))
        runner.warm_up(sorted({1, settings.max_batch_size}))
        return cls(runner, settings)

    def start(self) -> None:
        self.batcher.start()
        meta = self.runner.metadata
        metrics.set_model_info(meta.model_name, meta.model_version, self.runner.sha256, self.runner.provider)

    async def predict(self, data: bytes, media_type: str | None, cam: str = "none") -> dict[str, Any]:
        """One image -> the response dict (without ``request_id``); typed errors for bad input,
        ``Overloaded`` when the queue is full, ``InferenceTimeout`` past the request timeout."""
        check_cam_mode(cam)
        started = time.perf_counter()
        timeout = self.settings.request_timeout_s
        try:
            with metrics.IN_FLIGHT.track_inprogress():  # admitted work: the upload is complete
                result = await asyncio.wait_for(self._predict(data, media_type, cam, started), timeout)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"the request took longer than {timeout:g} s") from None
        metrics.observe_prediction(result)
        return result

    async def _predict(self, data: bytes, media_type: str | None, cam: str, started: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        spec = self.runner.metadata.preprocess
        prepared = await loop.run_in_executor(
            self._cpu, partial(prepare, data, media_type, spec, max_pixels=self.settings.max_pixels,
                               multiframe=self.settings.multiframe))
        out = await self.batcher.submit(prepared.tensor)
        return await loop.run_in_executor(self._cpu, partial(
            self.builder.build, prepared, out.logits, out.features, cam, started=started,
            queue_ms=out.queue_ms, inference_ms=out.inference_ms))

    async def infer_logits(self, inputs: Sequence[np.ndarray | bytes]) -> np.ndarray:
        """Model inputs ``[channels, size, size]`` (or image bytes, prepared as ``predict`` does) -> raw
        logits ``[N, C]``, through the micro-batcher: the same queue, limits and timeout as ``predict``."""
        timeout = self.settings.request_timeout_s
        metrics.IN_FLIGHT.inc(len(inputs))  # admitted work: one per image, as predict counts
        try:
            return await asyncio.wait_for(self._infer_logits(inputs), timeout)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"the request took longer than {timeout:g} s") from None
        finally:
            metrics.IN_FLIGHT.dec(len(inputs))

    async def _infer_logits(self, inputs: Sequence[np.ndarray | bytes]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        spec = self.runner.metadata.preprocess
        tensors = [item if isinstance(item, np.ndarray) else (await loop.run_in_executor(
            self._cpu, partial(prepare, item, None, spec, max_pixels=self.settings.max_pixels,
                               multiframe=self.settings.multiframe))).tensor for item in inputs]
        outs = await asyncio.gather(*(self.batcher.submit(tensor) for tensor in tensors))
        return np.stack([out.logits for out in outs])

    def refuse_if_full(self) -> None:
        """``Overloaded`` (503 with Retry-After) at once while the model's queue is full: for a
        batch request, before its files are read and decoded."""
        self.batcher.refuse_if_full()

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns."""
        meta = self.runner.metadata
        return {
            **self.builder.model_identity,
            "labels": list(meta.labels),
            "input": asdict(meta.preprocess),
            "temperature": meta.temperature,
            "threshold": self.builder.threshold,
            "metrics": meta.metrics,
            "training_data": meta.training_data,
            "provider": self.runner.provider,
            "providers": self.runner.providers,
        }

    async def close(self, timeout_s: float) -> None:
        await self.batcher.close(timeout_s)
        self._cpu.shutdown(wait=False, cancel_futures=True)
