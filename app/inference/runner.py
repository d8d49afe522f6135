"""The runner: owns the ONNX Runtime session, checks the model contract, warms up.

Execution providers are chosen from those installed (TensorRT > CUDA > CPU) or taken from an
explicit list; the provider actually in use is reported (``/v1/model``, metrics). The thread
budget keeps ORT from fighting the HTTP server for cores: intra-op threads default to the CPUs
this process may use (affinity and cgroup quota), spinning is off so idle ORT threads sleep.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from app.contract import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, ModelMetadata

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
AUTO_ORDER = (*GPU_PROVIDERS, "CPUExecutionProvider")


class ModelContractError(ValueError):
    """The model file does not follow the contract (or cannot be loaded); the service cannot start."""


@dataclass(frozen=True)
class RuntimeOptions:
    providers: Sequence[str] | None = None  # None: automatic
    trt_fp16: bool = False
    trt_engine_cache_dir: Path | None = None
    intra_op_threads: int = 0  # 0: available_cpus()
    max_batch_size: int = 1  # TensorRT: the engine's shape profile covers batches 1..this


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpu_quota() -> int | None:
    """ceil(quota / period) from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def choose_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Providers to ask ORT for, best first. Automatic: every known one that is installed.
    Explicit: those of the list that are installed (the caller warns about a GPU fallback);
    none installed is an error."""
    if requested is None:
        chosen = [p for p in AUTO_ORDER if p in available]
        return chosen or ["CPUExecutionProvider"]
    chosen = [p for p in requested if p in available]
    if not chosen:
        raise ModelContractError(
            f"none of the requested execution providers is installed ({', '.join(requested)}); "
            f"installed: {', '.join(available)}"
        )
    skipped = [p for p in requested if p not in available and p not in GPU_PROVIDERS]
    if skipped:
        log.info("execution providers not installed, skipped: %s", ", ".join(skipped))
    return chosen


def _provider_options(provider: str, options: RuntimeOptions, channels: int = 3, size: int = 224) -> dict[str, str]:
    if provider != "TensorrtExecutionProvider":
        return {}
    opts = {"trt_fp16_enable": "1" if options.trt_fp16 else "0"}
    if options.trt_engine_cache_dir is not None:
        Path(options.trt_engine_cache_dir).mkdir(parents=True, exist_ok=True)
        opts["trt_engine_cache_enable"] = "1"
        opts["trt_engine_cache_path"] = str(options.trt_engine_cache_dir)
    # One engine for every batch size the batcher sends, built once (not one per new batch size).
    shape = f"{INPUT_NAME}:{{n}}x{channels}x{size}x{size}"
    opts["trt_profile_min_shapes"] = shape.format(n=1)
    opts["trt_profile_opt_shapes"] = shape.format(n=options.max_batch_size)
    opts["trt_profile_max_shapes"] = shape.format(n=options.max_batch_size)
    return opts


def cam_weights(model: onnx.ModelProto, name: str, num_classes: int) -> np.ndarray:
    """The classifier weight initializer as float32 ``[C, K]`` (fp16 storage and ``[K, C]`` layout accepted)."""
    for init in model.graph.initializer:
        if init.name == name:
            weights = numpy_helper.to_array(init).astype(np.float32)
            break
    else:
        raise ModelContractError(f"the model has no initializer named {name!r} (metadata btd.cam.weight)")
    if weights.ndim != 2 or num_classes not in weights.shape:
        raise ModelContractError(f"CAM weight {name!r} has shape {weights.shape}, expected [{num_classes}, K]")
    return weights if weights.shape[0] == num_classes else np.ascontiguousarray(weights.T)


class Runner:
    """One ORT session plus what the service needs to know about the model."""

    def __init__(self, session, metadata: ModelMetadata, weights: np.ndarray, path: Path, sha256: str) -> None:
        self.session = session
        self.metadata = metadata
        self.cam_weights = weights  # float32 [C, K]
        self.path = path
        self.sha256 = sha256
        self.providers: list[str] = list(session.get_providers())

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (the first one ORT kept)."""
        return self.providers[0]

    @classmethod
    def load(cls, path: str | Path, options: RuntimeOptions | None = None) -> Runner:
        import onnxruntime as ort

        options = options or RuntimeOptions()
        path = Path(path)
        if not path.is_file():
            raise ModelContractError(f"model file not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and friends: all mean "not a model"
            raise ModelContractError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
        try:
            metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
        except ValueError as exc:
            raise ModelContractError(f"model metadata: {exc}") from None
        weights = cam_weights(model, metadata.cam_weight, len(metadata.labels))
        _check_graph_io(model)
        del model

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = options.intra_op_threads or available_cpus()
        so.inter_op_num_threads = 1
        # Idle ORT threads sleep instead of spinning, so the event loop and decoding keep their cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        available = ort.get_available_providers()
        chosen = choose_providers(options.providers, available)
        spec = metadata.preprocess
        providers = [(p, _provider_options(p, options, spec.channels, spec.size)) for p in chosen]
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for invalid graphs
            raise ModelContractError(f"ONNX Runtime cannot load {path}: {exc}") from None
        runner = cls(session, metadata, weights, path, file_sha256(path))
        wanted_gpu = [p for p in (options.providers or chosen) if p in GPU_PROVIDERS]
        if wanted_gpu and runner.provider not in GPU_PROVIDERS:  # one warning, whatever the cause
            log.warning(
                "GPU execution provider(s) %s requested but not usable (not installed, or failed to "
                "initialise); FALLING BACK TO CPU (%s): inference will be much slower.",
                ", ".join(wanted_gpu), runner.provider,
            )
        log.info("model %s %s loaded with providers %s (intra-op threads %d)", metadata.model_name,
                 metadata.model_version, ", ".join(runner.providers), so.intra_op_num_threads)
        return runner

    @property
    def input_size(self) -> int:
        return self.metadata.preprocess.size

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[N, 3, S, S]`` float32 -> (logits ``[N, C]``, features ``[N, K, h, w]``). Blocking."""
        logits, features = self.session.run([LOGITS_NAME, FEATURES_NAME], {INPUT_NAME: batch})
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the model once per batch size and check the output shapes against the contract."""
        spec = self.metadata.preprocess
        num_classes = len(self.metadata.labels)
        for n in batch_sizes:
            try:
                logits, features = self.run(np.zeros((n, spec.channels, spec.size, spec.size), np.float32))
            except Exception as exc:  # ORT's own error types: a fixed batch or input size, a broken graph
                raise ModelContractError(
                    f"the model cannot run a batch of {n} at {spec.size}x{spec.size} (from its metadata): {exc}; "
                    "a model exported with a fixed batch size needs BTD_MAX_BATCH_SIZE=1"
                ) from None
            if logits.shape != (n, num_classes):
                raise ModelContractError(f"logits shape {logits.shape}, expected ({n}, {num_classes}) for the labels")
            if features.ndim != 4 or features.shape[:2] != (n, self.cam_weights.shape[1]):
                raise ModelContractError(
                    f"features shape {features.shape}, expected ({n}, {self.cam_weights.shape[1]}, h, w) "
                    "to match the CAM weight"
                )


def _check_graph_io(model: onnx.ModelProto) -> None:
    inputs = {i.name: i for i in model.graph.input}
    initializers = {i.name for i in model.graph.initializer}
    real_inputs = [name for name in inputs if name not in initializers]
    if real_inputs != [INPUT_NAME]:
        raise ModelContractError(f"model inputs are {real_inputs}, expected [{INPUT_NAME!r}]")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelContractError(f"input {INPUT_NAME!r} has rank {len(dims)}, expected 4 (N, 3, H, W)")
    outputs = {o.name for o in model.graph.output}
    for name in (LOGITS_NAME, FEATURES_NAME):
        if name not in outputs:
            raise ModelContractError(f"model has no output named {name!r}")
