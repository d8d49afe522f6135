"""Synchronous, server-less prediction for the CLI's local mode (``btd predict``).

Same core as the HTTP service (``app.inference.pipeline``), same runner, no batcher::

    predictor = Predictor.load("models/btd-resnet50.onnx")
    result = predictor.predict(Path("slice.dcm").read_bytes(), cam="grid")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from app.contract import ModelMetadata
from app.inference.pipeline import ResultBuilder, check_cam_mode, ms_since, prepare
from app.inference.runner import Runner, RuntimeOptions
from app.settings import Settings


def runtime_options(settings: Settings) -> RuntimeOptions:
    return RuntimeOptions(
        providers=settings.provider_list(),
        trt_fp16=settings.trt_fp16,
        trt_engine_cache_dir=settings.trt_engine_cache_dir,
        intra_op_threads=settings.intra_op_threads,
        max_batch_size=settings.max_batch_size,
    )


def result_builder(runner: Runner, settings: Settings) -> ResultBuilder:
    threshold = settings.tumour_threshold
    if threshold is None:
        threshold = runner.metadata.tumour_threshold
    return ResultBuilder(runner.metadata, runner.cam_weights, runner.sha256, threshold)


class Predictor:
    def __init__(self, runner: Runner, settings: Settings) -> None:
        self.runner = runner
        self.settings = settings
        self.builder = result_builder(runner, settings)

    @classmethod
    def load(cls, model_path: str | Path, settings: Settings | None = None) -> Predictor:
        """Load and check the model (raises ``ModelContractError``, a ValueError, if it breaks the contract)."""
        settings = settings or Settings()
        runner = Runner.load(model_path, runtime_options(settings))
        runner.warm_up((1,))
        return cls(runner, settings)

    @property
    def metadata(self) -> ModelMetadata:
        return self.runner.metadata

    def predict(self, data: bytes, media_type: str | None = None, cam: str = "none") -> dict[str, Any]:
        """Image bytes -> the response dict of ``POST /v1/predict`` without ``request_id``.
        Raises the typed errors of ``app.errors`` for bad input; ValueError for a bad ``cam``."""
        check_cam_mode(cam)
        started = time.perf_counter()
        prepared = prepare(data, media_type, self.metadata.preprocess, max_pixels=self.settings.max_pixels,
                           multiframe=self.settings.multiframe)
        infer_start = time.perf_counter()
        logits, features = self.runner.run(prepared.tensor[None])
        inference_ms = ms_since(infer_start)
        return self.builder.build(prepared, logits[0], features[0], cam, started=started, queue_ms=0.0,
                                  inference_ms=inference_ms)
