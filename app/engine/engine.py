"""The one inference core: ``Engine`` owns the model file, its ONNX Runtime session(s) and batch
buckets, the decision threshold, the out-of-distribution rule and the CAM weights. The HTTP
service (``InferenceService``: async, batched, host work in a pool) and ``btd predict``
(synchronous: ``Engine.predict``) get ``Prediction`` objects.

It is built from plain ``EngineOptions`` (``Settings.engine_options()`` derives them, in one place)::

    engine = Engine.load("models/btd-resnet50.onnx", EngineOptions())
    prediction = engine.predict(Path("slice.dcm").read_bytes(), cam="grid")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.core import formats
from app.core.contract import META_LOCALISATION, TUMOUR_MAP_NAME, ModelMetadata
from app.core.decision import Decision
from app.core.decode import DEFAULT_MAX_PIXELS, MultiframePolicy
from app.core.model import ModelFile, variant_path
from app.core.result import ModelIdentity, ModelOutput, Prediction
from app.engine.pipeline import Prepared, PrepareOptions, ResultBuilder, check_cam_mode, ms_since, prepare
from app.engine.runner import GPU_PROVIDERS, Runner, RuntimeOptions, choose_providers

log = logging.getLogger(__name__)

# Which file of the model to serve: "auto" takes ``<model>-int8.onnx`` on the CPU and
# ``<model>-fp16.onnx`` on a GPU when they lie beside the model file, else the model file itself.
ModelVariant = Literal["auto", "fp32", "fp16", "int8"]


@dataclass(frozen=True)
class EngineOptions:
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    variant: ModelVariant = "auto"
    tumour_threshold: float | None = None  # None: the model's own
    max_pixels: int = DEFAULT_MAX_PIXELS
    multiframe: MultiframePolicy = "middle"


def choose_model_file(path: Path, variant: ModelVariant, on_gpu: bool) -> tuple[Path, str]:
    """(file to load, its variant). An explicit variant must exist; "auto" falls back to ``path``."""
    if variant != "auto":
        chosen = variant_path(path, variant)
        if not chosen.is_file():
            raise FileNotFoundError(f"no {variant} variant of {path}: {chosen} does not exist")
        return chosen, variant
    preferred = "fp16" if on_gpu else "int8"
    candidate = variant_path(path, preferred)
    return (candidate, preferred) if candidate.is_file() else (Path(path), "fp32")


class Engine:
    def __init__(self, model: ModelFile, runner: Runner, options: EngineOptions, variant: str = "fp32") -> None:
        self.model = model
        self.runner = runner
        self.options = options
        self.variant = variant
        threshold = options.tumour_threshold
        self.builder = ResultBuilder(model.metadata, model.cam_weights, model.sha256,
                                     model.metadata.tumour_threshold if threshold is None else threshold)
        self.prepare_options = PrepareOptions(model.metadata.preprocess, options.max_pixels, options.multiframe,
                                              model.metadata.validated)

    @classmethod
    def load(cls, path: str | Path, options: EngineOptions | None = None) -> Engine:
        """Load the model (the variant the options choose), open its sessions and warm every bucket up.
        Raises ``ModelContractError`` (a ValueError) when the file breaks the contract."""
        import onnxruntime as ort

        options = options or EngineOptions()
        path = Path(path)
        wants_gpu = choose_providers(options.runtime.providers, ort.get_available_providers())[0] in GPU_PROVIDERS
        file, variant = choose_model_file(path, options.variant, wants_gpu)
        model = ModelFile.load(file)
        runner = Runner.load(model, options.runtime)
        if options.variant == "auto" and wants_gpu and runner.provider not in GPU_PROVIDERS and variant != "fp32":
            file, variant = choose_model_file(path, "auto", on_gpu=False)  # the GPU fell back to the CPU
            model = ModelFile.load(file)
            runner = Runner.load(model, options.runtime)
        runner.warm_up()
        output, spec = f"{TUMOUR_MAP_NAME} output", f"{META_LOCALISATION} metadata"
        if TUMOUR_MAP_NAME in model.outputs and not model.localises:
            log.warning("model %s has %s but not %s: it reports no tumour region", path.name, output, spec)
        elif model.metadata.localisation is not None and not model.localises:
            log.warning("model %s has %s but not %s: it reports no tumour region", path.name, spec, output)
        if variant != "fp32":  # the same model, quantised or in half precision: say which file that is
            log.info("model %s: serving its %s variant, the file %s", path.name, variant, file)
        return cls(model, runner, options, variant)

    @classmethod
    def load_single(cls, path: str | Path, options: EngineOptions | None = None) -> Engine:
        """``load`` for one image at a time (``btd predict``, the listener's in-process classifier,
        evaluation through the engine): only the batch-1 bucket is opened and warmed up."""
        options = options or EngineOptions()
        return cls.load(path, replace(options, runtime=replace(options.runtime, buckets=(1,))))

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata

    @property
    def model_identity(self) -> ModelIdentity:
        return self.builder.model_identity

    @property
    def threshold(self) -> float:
        return self.builder.threshold

    def decide(self, logits: np.ndarray, ood_score: float | None, image_reasons: Sequence[str] = ()) -> Decision:
        """The one decision (``app.core.decision``) with this model's labels, temperature and thresholds."""
        return self.builder.decide(logits, ood_score, image_reasons)

    @property
    def max_batch_size(self) -> int:
        return self.runner.max_batch_size

    def prepare(self, data: bytes, media_type: str | None, cam: str = "none") -> Prepared:
        return prepare(data, media_type, self.prepare_options, cam == "png")

    def infer_prepared(self, prepared: Sequence[Prepared | np.ndarray], features: Sequence[bool]) -> list[ModelOutput]:
        """``infer`` on prepared requests (or ready input tensors): their input tensors are made here,
        where the batch is assembled (host workers send the smaller model-size image)."""
        return self.infer([p if isinstance(p, np.ndarray) else p.tensor for p in prepared], features)

    def infer(self, tensors: Sequence[np.ndarray], features: Sequence[bool]) -> list[ModelOutput]:
        """One batch through the model; ``features[i]``: image i wants a CAM (the features output is
        fetched only when some image does); a localising model's tumour map comes with every image.
        Blocking."""
        out = self.runner.run(tensors, features=any(features))
        return [ModelOutput(out.logits[i], out.features[i] if want else None,
                            None if out.ood_score is None else float(out.ood_score[i]),
                            tumour_map=None if out.tumour_map is None else out.tumour_map[i])
                for i, want in enumerate(features)]

    def predict(self, data: bytes, media_type: str | None = None, cam: str = "none") -> Prediction:
        """Image bytes -> ``Prediction``, synchronously (batch 1). Raises the typed errors of
        ``app.core.errors`` for bad input; ValueError for a bad ``cam``."""
        check_cam_mode(cam)
        started = time.perf_counter()
        return self.predict_prepared(self.prepare(data, media_type, cam), cam, started=started)

    def predict_prepared(self, prepared: Prepared, cam: str = "none", *, started: float) -> Prediction:
        """``predict`` of an image prepared elsewhere (an isolated worker); ``cam="png"`` needs its view."""
        check_cam_mode(cam)
        infer_start = time.perf_counter()
        (output,) = self.infer([prepared.tensor], [cam != "none"])
        output = replace(output, queue_ms=0.0, inference_ms=ms_since(infer_start), batch_size=1)
        return self.builder.build(prepared, output, cam, started=started)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns."""
        meta = self.model.metadata
        return {
            **asdict(self.builder.model_identity),
            "labels": list(meta.labels),
            "input": asdict(meta.preprocess),
            "temperature": meta.temperature,
            "threshold": self.builder.threshold,
            "metrics": meta.metrics,
            "training_data": meta.training_data,
            "provider": self.runner.provider,
            "providers": self.runner.providers,
            "variant": self.variant,
            "batch_buckets": list(self.runner.buckets),
            "model_runs": self.runner.model_runs,
            "intra_op_threads": self.runner.intra_op_threads,
            "ood": None if meta.ood is None else asdict(meta.ood),
            "validated_for": asdict(meta.validated),
            "localisation": asdict(meta.localisation) if self.model.localises else None,
            "formats": formats.describe(),
        }
