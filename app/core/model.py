"""The one model loader: an ONNX file -> its metadata, CAM weights, graph outputs and sha256.

Everything that opens a model file goes through here (the service, ``btd predict``, ``btd
evaluate``, ``btd quantize``, ``bench/compare.py``, the localisation study), so the metadata is
parsed in one place and a file that breaks the contract is refused in one way. No ONNX Runtime
here: sessions are opened by ``app.engine.runner``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from app.core.contract import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, OOD_NAME, TUMOUR_MAP_NAME, ModelMetadata

# Reduced-precision variants live beside the model file: ``btd-resnet50.onnx`` ->
# ``btd-resnet50-int8.onnx`` (``btd quantize``), ``btd-resnet50-fp16.onnx`` (``btd export --fp16``).
VARIANTS = ("fp32", "fp16", "int8")


class ModelContractError(ValueError):
    """The model file does not follow the contract (or cannot be loaded); the service cannot start."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def variant_path(path: Path, variant: str) -> Path:
    """Where the ``variant`` of the model at ``path`` lives (``fp32`` is the file itself)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r} (one of {', '.join(VARIANTS)})")
    path = Path(path)
    return path if variant == "fp32" else path.with_name(f"{path.stem}-{variant}{path.suffix}")


def metadata_of(proto: onnx.ModelProto) -> ModelMetadata:
    """The contract metadata of a loaded proto; ``ModelContractError`` naming what is wrong."""
    try:
        return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    except ValueError as exc:
        raise ModelContractError(f"model metadata: {exc}") from None


def read_proto(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ModelContractError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends: all mean "not a model"
        raise ModelContractError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None


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


def check_graph_io(model: onnx.ModelProto, metadata: ModelMetadata) -> tuple[str, ...]:
    """The graph's output names, after checking its input and required outputs against the contract."""
    inputs = {i.name: i for i in model.graph.input}
    initializers = {i.name for i in model.graph.initializer}
    real_inputs = [name for name in inputs if name not in initializers]
    if real_inputs != [INPUT_NAME]:
        raise ModelContractError(f"model inputs are {real_inputs}, expected [{INPUT_NAME!r}]")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelContractError(f"input {INPUT_NAME!r} has rank {len(dims)}, expected 4 (N, 3, H, W)")
    outputs = tuple(o.name for o in model.graph.output)
    for name in (LOGITS_NAME, FEATURES_NAME):
        if name not in outputs:
            raise ModelContractError(f"model has no output named {name!r}")
    if (OOD_NAME in outputs) != (metadata.ood is not None):
        raise ModelContractError(f"the graph's {OOD_NAME!r} output and the btd.ood metadata come together; "
                                 "this model has only one of them")
    return outputs


@dataclass(frozen=True)
class ModelFile:
    """A model file that follows the contract, with what every user of it needs."""

    path: Path
    metadata: ModelMetadata
    cam_weights: np.ndarray  # float32 [C, K]
    outputs: tuple[str, ...]
    sha256: str

    @property
    def has_ood(self) -> bool:
        return OOD_NAME in self.outputs

    @property
    def localises(self) -> bool:
        """The model gives a tumour map and says how to read it (``btd.localisation``): a tumour region.
        Without both (older models, or a map without its metadata) there is no region."""
        return TUMOUR_MAP_NAME in self.outputs and self.metadata.localisation is not None

    @classmethod
    def load(cls, path: str | Path) -> ModelFile:
        """Read and check ``path``; raises ``ModelContractError`` (a ValueError) naming the problem."""
        path = Path(path)
        proto = read_proto(path)
        metadata = metadata_of(proto)
        weights = cam_weights(proto, metadata.cam_weight, len(metadata.labels))
        outputs = check_graph_io(proto, metadata)
        del proto
        return cls(path, metadata, weights, outputs, file_sha256(path))
