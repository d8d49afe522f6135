"""Synchronous, server-less prediction for ``btd predict`` (local mode): the ``Engine`` at batch 1,
no batcher, no host pool::

    predictor = Predictor.load("models/btd-resnet50.onnx")
    prediction = predictor.predict(Path("slice.dcm").read_bytes(), cam="grid")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from app.core.contract import ModelMetadata
from app.core.result import ModelIdentity, Prediction
from app.engine.engine import Engine, EngineOptions


class Predictor:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def load(cls, model_path: str | Path, options: EngineOptions | None = None) -> Predictor:
        """Load and check the model (raises ``ModelContractError``, a ValueError, if it breaks the
        contract). One image at a time, so only the batch-1 bucket is opened and warmed up."""
        options = options or EngineOptions()
        return cls(Engine.load(model_path, replace(options, runtime=replace(options.runtime, buckets=(1,)))))

    @property
    def metadata(self) -> ModelMetadata:
        return self.engine.metadata

    @property
    def model_identity(self) -> ModelIdentity:
        return self.engine.builder.model_identity

    def predict(self, data: bytes, media_type: str | None = None, cam: str = "none") -> Prediction:
        """Image bytes -> ``Prediction``. Raises the typed errors of ``app.core.errors`` for bad input;
        ValueError for a bad ``cam``."""
        return self.engine.predict(data, media_type, cam)
