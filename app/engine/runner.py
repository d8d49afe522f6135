"""ONNX Runtime sessions with shape-stable batch buckets.

The CUDA provider re-runs its cuDNN algorithm search whenever a session sees an input shape that
differs from the previous call (242 ms a call when batch 4 and 5 alternate, against 2.9 ms at a
constant batch), so no session ever sees two shapes: the batch sizes form a fixed set of
*buckets* (e.g. 1, 2, 4, 8, 16, 32), a batch is padded with zeros up to the next bucket and the
padding is dropped from the outputs. On GPU providers every bucket has its own session (its own
algorithm cache, TensorRT profile and engine), with inputs and outputs bound to device buffers
(I/O binding, optionally replayed as a CUDA graph) so only what a request needs is copied back; on
the CPU one session serves every bucket (a shape change costs nothing there, and one copy of the
weights keeps the pod's memory small). Every bucket is run once at start (``warm_up``).

``features`` (400 KB a slice for ResNet-50) is fetched only when a request in the batch wants a CAM.
``tumour_map`` (a localising model's, 3 KB a slice at 28 x 28) is fetched with every batch: ONNX
Runtime computes every node whatever is fetched, so skipping it would save only that copy
(``bench/bench_region.py`` measures it), and whether an image gets a region is known only after the
pass (its tumour decision).
Idle ORT threads sleep instead of spinning, so decoding and HTTP keep their cores.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.core.contract import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, OOD_NAME, TUMOUR_MAP_NAME
from app.core.model import ModelContractError, ModelFile

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
AUTO_ORDER = (*GPU_PROVIDERS, "CPUExecutionProvider")


def default_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself."""
    return tuple(sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
                        | {max_batch_size}))


@dataclass(frozen=True)
class RuntimeOptions:
    providers: Sequence[str] | None = None  # None: automatic
    trt_fp16: bool = False
    trt_engine_cache_dir: Path | None = None
    intra_op_threads: int = 0  # 0: available_cpus(), shared among model_runs on the CPU
    # Batches the model runs at once (CPU providers; GPU providers run one: one stream, bound buffers).
    # ONNX Runtime alone on our 2-core CPU: two runs of one intra-op thread do 1.32x the images of one
    # run of two threads, but a lone request takes 1.5x as long; through the service the throughput
    # gain did not show (bench/bench_peers.py), so the default stays one run with every CPU.
    model_runs: int = 1
    buckets: tuple[int, ...] = (1,)
    cuda_graph: bool = False  # CUDA provider: replay each bucket as a CUDA graph (needs I/O binding)
    session_per_bucket: bool | None = None  # None: on GPU providers
    io_binding: bool | None = None  # None: on GPU providers

    def __post_init__(self) -> None:
        if not self.buckets or any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be increasing positive batch sizes, got {self.buckets}")

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]


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


def _provider_options(provider: str, options: RuntimeOptions, channels: int = 3, size: int = 224,
                      bucket: int | None = None) -> dict[str, str]:
    """Provider options; ``bucket`` is the one batch size a per-bucket session will see."""
    if provider == "CUDAExecutionProvider":
        return {"enable_cuda_graph": "1"} if options.cuda_graph and bucket is not None else {}
    if provider != "TensorrtExecutionProvider":
        return {}
    opts = {"trt_fp16_enable": "1" if options.trt_fp16 else "0"}
    if options.trt_engine_cache_dir is not None:
        cache = Path(options.trt_engine_cache_dir) / (f"b{bucket}" if bucket is not None else "")
        cache.mkdir(parents=True, exist_ok=True)
        opts["trt_engine_cache_enable"] = "1"
        opts["trt_engine_cache_path"] = str(cache)
    # One engine per session: exactly its bucket, or every batch size up to the largest bucket.
    shape = f"{INPUT_NAME}:{{n}}x{channels}x{size}x{size}"
    opts["trt_profile_min_shapes"] = shape.format(n=bucket or 1)
    opts["trt_profile_opt_shapes"] = shape.format(n=bucket or options.max_batch_size)
    opts["trt_profile_max_shapes"] = shape.format(n=bucket or options.max_batch_size)
    return opts


def resolve_parallelism(options: RuntimeOptions, *, wants_gpu: bool) -> RuntimeOptions:
    """``model_runs`` and ``intra_op_threads`` made explicit (see RuntimeOptions)."""
    cpus = available_cpus()
    runs = 1 if wants_gpu else max(1, options.model_runs)
    threads = options.intra_op_threads or (cpus if wants_gpu else max(1, cpus // runs))
    return replace(options, model_runs=runs, intra_op_threads=threads)


def open_session(path: Path | bytes, options: RuntimeOptions, *, channels: int = 3, size: int = 224,
                 bucket: int | None = None) -> Any:
    """An ORT InferenceSession with the service's thread policy and provider choice (``path``: a
    file, or a serialized model)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = options.intra_op_threads or available_cpus()
    so.inter_op_num_threads = 1
    # Idle ORT threads sleep instead of spinning, so the event loop and decoding keep their cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    chosen = choose_providers(options.providers, ort.get_available_providers())
    providers = [(p, _provider_options(p, options, channels, size, bucket)) for p in chosen]
    try:
        source = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(source, sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for invalid graphs
        shown = "the model" if isinstance(path, bytes) else path
        raise ModelContractError(f"ONNX Runtime cannot load {shown}: {exc}") from None


class Session(Protocol):
    """What the runner needs of an ORT session (tests pass fakes)."""

    def run(self, output_names: list[str], input_feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def get_providers(self) -> list[str]: ...


@dataclass
class RawOutputs:
    """Model outputs of the real rows of one batch (padding already dropped)."""

    logits: np.ndarray  # float32 [n, C]
    features: np.ndarray | None  # float32 [n, K, h, w], when asked for
    ood_score: np.ndarray | None  # float32 [n], when the graph has it
    tumour_map: np.ndarray | None = None  # float32 [n, h, w], when the model localises (``ModelFile.localises``)


class _PlainExecutor:
    """``session.run`` with numpy in and out: ORT copies back only the outputs named."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __call__(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, {INPUT_NAME: batch})


class _BoundExecutor:
    """One bucket's input and outputs bound to fixed buffers on the session's device (I/O
    binding): the model writes every output there, and only the outputs named are copied to the
    host. Fixed addresses are also what a CUDA graph replay needs."""

    def __init__(self, session: Any, batch_shape: tuple[int, ...], output_shapes: dict[str, tuple[int, ...]],
                 device: str) -> None:
        import onnxruntime as ort

        self.session = session
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(batch_shape, np.float32, device, 0)
        self.outputs = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, 0)
                        for name, shape in output_shapes.items()}
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(INPUT_NAME, self.input)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def __call__(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        self.input.update_inplace(batch)
        self.session.run_with_iobinding(self.binding)
        return [self.outputs[name].numpy() for name in names]


def _device_of(provider: str) -> str:
    return "cuda" if provider in GPU_PROVIDERS else "cpu"


@dataclass
class Runner:
    """The model's sessions, one per bucket or one shared, with a zeroed input buffer per bucket.
    ``run`` is thread-safe: with I/O binding one batch at a time (the bucket's bound buffers), else
    ``model_runs`` batches may run at once, each in its own input array."""

    model: ModelFile
    sessions: dict[int, Session]  # bucket -> session (the same object for every bucket when shared)
    buckets: tuple[int, ...]
    io_binding: bool = False
    cuda_graph: bool = False
    model_runs: int = 1  # batches ``run`` may run at once (threads); bound buffers allow one
    tumour_map_shape: tuple[int, int] | None = None  # (h, w) of a localising model's map, read at warm-up
    _executors: dict[int, Any] = field(default_factory=dict, repr=False)
    _inputs: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, model: ModelFile, options: RuntimeOptions | None = None) -> Runner:
        """Open the sessions (not yet warmed up: call ``warm_up``)."""
        import onnxruntime as ort

        options = options or RuntimeOptions()
        spec = model.metadata.preprocess
        chosen = choose_providers(options.providers, ort.get_available_providers())
        options = resolve_parallelism(options, wants_gpu=chosen[0] in GPU_PROVIDERS)
        per_bucket = options.session_per_bucket
        if per_bucket is None:
            per_bucket = chosen[0] in GPU_PROVIDERS and len(options.buckets) > 1

        def session_for(bucket: int | None) -> Session:
            return open_session(model.path, options, channels=spec.channels, size=spec.size, bucket=bucket)

        first = session_for(options.buckets[0] if per_bucket or len(options.buckets) == 1 else None)
        on_gpu = first.get_providers()[0] in GPU_PROVIDERS
        if per_bucket and (on_gpu or options.session_per_bucket):
            sessions = {options.buckets[0]: first, **{b: session_for(b) for b in options.buckets[1:]}}
        else:  # one session for every bucket (also when a GPU provider fell back to the CPU)
            sessions = {b: first for b in options.buckets}
        io_binding = on_gpu if options.io_binding is None else options.io_binding
        cuda_graph = options.cuda_graph and on_gpu and first.get_providers()[0] == "CUDAExecutionProvider"
        runner = cls(model, sessions, options.buckets, io_binding=io_binding or cuda_graph, cuda_graph=cuda_graph,
                     model_runs=1 if on_gpu or io_binding or cuda_graph else options.model_runs)
        wanted_gpu = [p for p in (options.providers or chosen) if p in GPU_PROVIDERS]
        if wanted_gpu and not on_gpu:  # one warning, whatever the cause
            log.warning(
                "GPU execution provider(s) %s requested but not usable (not installed, or failed to "
                "initialise); FALLING BACK TO CPU (%s): inference will be much slower.",
                ", ".join(wanted_gpu), runner.provider,
            )
        log.info("%s (%s %s) loaded with providers %s (intra-op threads %d); buckets %s with %s", Path(model.path).name,
                 model.metadata.model_name, model.metadata.model_version, ", ".join(runner.providers), options.intra_op_threads or available_cpus(),
                 ",".join(map(str, options.buckets)),
                 "a session each" if len({id(s) for s in sessions.values()}) > 1 else "one session")
        return runner

    @property
    def providers(self) -> list[str]:
        return list(next(iter(self.sessions.values())).get_providers())

    @property
    def intra_op_threads(self) -> int:
        """The ONNX Runtime intra-op thread count the sessions run with."""
        return int(next(iter(self.sessions.values())).get_session_options().intra_op_num_threads)

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (the first one ORT kept)."""
        return self.providers[0]

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds ``n`` images."""
        for bucket in self.buckets:
            if bucket >= n:
                return bucket
        raise ValueError(f"a batch of {n} is larger than the largest bucket ({self.max_batch_size})")

    def _input(self, bucket: int) -> np.ndarray:
        if bucket not in self._inputs:
            spec = self.model.metadata.preprocess
            self._inputs[bucket] = np.zeros((bucket, spec.channels, spec.size, spec.size), np.float32)
        return self._inputs[bucket]

    def _names(self, features: bool) -> list[str]:
        names = [LOGITS_NAME]
        if self.model.has_ood:
            names.append(OOD_NAME)
        if self.model.localises:
            names.append(TUMOUR_MAP_NAME)
        if features:
            names.append(FEATURES_NAME)
        return names

    def run(self, tensors: Sequence[np.ndarray], *, features: bool) -> RawOutputs:
        """``n`` preprocessed images ``[channels, size, size]`` -> the outputs of those ``n``.
        The session sees the next bucket's shape; the padding rows are zeros. Blocking."""
        n = len(tensors)
        bucket = self.bucket_for(n)
        names = self._names(features)
        if bucket in self._executors:  # bound buffers: one batch at a time
            with self._lock:
                return self._execute(self._executors[bucket], self._input(bucket), tensors, names)
        spec = self.model.metadata.preprocess  # an array of its own: batches may run at once
        batch = np.empty((bucket, spec.channels, spec.size, spec.size), np.float32)
        return self._execute(_PlainExecutor(self.sessions[bucket]), batch, tensors, names)

    @staticmethod
    def _execute(execute: Any, batch: np.ndarray, tensors: Sequence[np.ndarray], names: list[str]) -> RawOutputs:
        n = len(tensors)
        for i, tensor in enumerate(tensors):
            batch[i] = tensor
        batch[n:] = 0.0  # no earlier request's pixels in the padding
        values = dict(zip(names, execute(batch, names)))
        return RawOutputs(
            np.array(values[LOGITS_NAME][:n], dtype=np.float32),
            np.array(values[FEATURES_NAME][:n], dtype=np.float32) if FEATURES_NAME in names else None,
            np.array(values[OOD_NAME][:n], dtype=np.float32).reshape(n) if OOD_NAME in values else None,
            np.array(values[TUMOUR_MAP_NAME][:n, 0], dtype=np.float32) if TUMOUR_MAP_NAME in values else None,
        )

    def warm_up(self) -> None:
        """Run every bucket once (cuDNN's algorithm search, TensorRT engine builds happen here) and
        check the output shapes against the contract. With I/O binding the buckets' buffers are
        bound first and this first run goes through them: a CUDA graph is captured on it, so no
        run with other addresses may come before."""
        spec = self.model.metadata.preprocess
        names = self._names(True)
        for bucket in self.buckets:
            zeros = self._input(bucket)
            session = self.sessions[bucket]
            try:
                if self.io_binding:
                    shapes = _declared_shapes(session, bucket)
                    if shapes is None:
                        if self.cuda_graph:
                            raise ModelContractError("CUDA graphs need a model whose outputs have fixed shapes "
                                                     "(but for the batch); set BTD_CUDA_GRAPH=false")
                        shapes = {n: np.shape(v) for n, v in zip(names, _PlainExecutor(session)(zeros, names))}
                    self._executors[bucket] = _BoundExecutor(session, zeros.shape, shapes,
                                                             _device_of(session.get_providers()[0]))
                    values = dict(zip(names, self._executors[bucket](zeros, names)))
                else:
                    values = dict(zip(names, _PlainExecutor(session)(zeros, names)))
            except ModelContractError:
                raise
            except Exception as exc:  # ORT's own error types: a fixed batch or input size, a broken graph
                raise ModelContractError(
                    f"the model cannot run a batch of {bucket} at {spec.size}x{spec.size} (from its metadata): {exc}; "
                    "a model exported with a fixed batch size needs BTD_MAX_BATCH_SIZE=1"
                ) from None
            self._check_outputs(bucket, values)

    def _check_outputs(self, bucket: int, values: dict[str, np.ndarray]) -> None:
        num_classes, channels = len(self.model.metadata.labels), self.model.cam_weights.shape[1]
        logits, features = values[LOGITS_NAME], values[FEATURES_NAME]
        if logits.shape != (bucket, num_classes):
            raise ModelContractError(f"logits shape {logits.shape}, expected ({bucket}, {num_classes}) for the labels")
        if features.ndim != 4 or features.shape[:2] != (bucket, channels):
            raise ModelContractError(
                f"features shape {features.shape}, expected ({bucket}, {channels}, h, w) to match the CAM weight")
        if OOD_NAME in values and np.shape(values[OOD_NAME]) not in ((bucket,), (bucket, 1)):
            raise ModelContractError(f"{OOD_NAME} shape {np.shape(values[OOD_NAME])}, expected ({bucket},)")
        if TUMOUR_MAP_NAME in values:
            shape = np.shape(values[TUMOUR_MAP_NAME])
            if len(shape) != 4 or shape[:2] != (bucket, 1) or min(shape[2:]) < 1:
                raise ModelContractError(f"{TUMOUR_MAP_NAME} shape {shape}, expected ({bucket}, 1, h, w)")
            self.tumour_map_shape = (int(shape[2]), int(shape[3]))


def _declared_shapes(session: Any, bucket: int) -> dict[str, tuple[int, ...]] | None:
    """The outputs' shapes as the graph declares them, the batch dimension set to ``bucket``; None
    when another dimension is not a fixed number."""
    shapes = {}
    for output in session.get_outputs():
        rest = output.shape[1:]
        if not all(isinstance(d, int) for d in rest):
            return None
        shapes[output.name] = (bucket, *rest)
    return shapes
