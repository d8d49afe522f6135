"""``btd quantize``: an INT8 variant of an exported model (ONNX Runtime static QDQ).

uint8 activations with int8 per-channel weights: on the project's 2-vCPU AMD EPYC (Zen 4, AVX-512
VNNI) the INT8 variant of 1.1.0 ran 2.8x faster than the shipped file (13.7 vs 38.7 ms per image at
batch 1; ``bench/compare.py``, table in models/MODEL_CARD.md, "Side by side"). Calibration images go
through the service's decoder and the contract's ``preprocess``. The classifier (the Gemm
producing ``logits``) stays float32 so its ``fc.weight`` / ``fc.bias`` initializers remain for
the CAM; ``features`` stays a float output. The metadata is carried over, its metrics filed under
``fp32_source`` (they were measured on the float file; `btd evaluate --baseline` measures this one).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from app.core.contract import (
    FEATURES_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    META_METRICS,
    OOD_NAME,
    TUMOUR_MAP_NAME,
    ModelMetadata,
    preprocess,
)
from app.core.model import ModelFile, metadata_of, read_proto
from model_export.data import Sample, limit_per_class, load_samples, read_gray, select
from model_export.options import QuantizeConfig

log = logging.getLogger(__name__)

QUANTIZATION_PROP = "btd.quantization"


def weights_to_fp32(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Undo float16 weight storage (fp16 initializer -> Cast -> float32): float32 initializers of
    the same names, Casts removed. The quantizer needs float32 weights to quantize."""
    graph = proto.graph
    half = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT16}
    casts = [n for n in graph.node if n.op_type == "Cast" and len(n.input) == 1 and n.input[0] in half]
    if not casts:
        return proto
    rename = {n.output[0]: n.input[0] for n in casts}
    for init in graph.initializer:
        if init.name in half:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    kept = [n for n in graph.node if n not in casts]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    return proto


def _ancestors(graph: onnx.GraphProto, output: str) -> set[str]:
    """Names of the nodes ``output`` depends on (itself included)."""
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def head_node_names(graph: onnx.GraphProto) -> list[str]:
    """The nodes after ``features``: the classifier producing ``logits`` (kept float so the CAM
    weights stay readable) and the optional ``ood_score`` head (kept float: its whitening amplifies
    small directions, where 8-bit rounding would move the score) and the optional ``tumour_map`` decoder
    (kept float for the same reason: it starts with whitening projections; it is small at 28x28)."""
    trunk = _ancestors(graph, FEATURES_NAME)
    heads = set().union(*(_ancestors(graph, name) for name in (LOGITS_NAME, OOD_NAME, TUMOUR_MAP_NAME)))
    return sorted(heads - trunk)


class _Reader(CalibrationDataReader):
    """Calibration batches: preprocessed images, one at a time."""

    def __init__(self, samples: Sequence[Sample], metadata: ModelMetadata) -> None:
        self.samples, self.spec, self.position = list(samples), metadata.preprocess, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.samples):
            return None
        sample = self.samples[self.position]
        self.position += 1
        return {INPUT_NAME: preprocess(read_gray(sample.path), self.spec)[None]}

    def rewind(self) -> None:
        self.position = 0


def quantize_model(source: Path, out: Path, calibration: Sequence[Sample]) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = read_proto(source)
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = metadata_of(proto)
    proto = weights_to_fp32(proto)
    exclude = head_node_names(proto.graph)
    reader = _Reader(calibration, metadata)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(proto, str(fp32))
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize_static(
            str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
        )
    quantized = onnx.load(str(out))
    names = {i.name for i in quantized.graph.initializer}
    if metadata.cam_weight not in names or metadata.cam_bias not in names:
        raise RuntimeError("quantization lost the classifier initializers the CAM needs")
    # The metrics in the metadata were measured on the float file: keep them, labelled as such.
    props[META_METRICS] = json.dumps({"fp32_source": metadata.metrics} if metadata.metrics else {})
    props[QUANTIZATION_PROP] = json.dumps({"method": "static QDQ", "activations": "uint8",
                                           "weights": "int8 per-channel", "calibration_images": len(calibration),
                                           "source": Path(source).name})
    helper.set_model_props(quantized, props)
    onnx.save(quantized, str(out))
    ModelFile.load(out)  # the variant must follow the contract as the service reads it
    return out


def main(config: QuantizeConfig) -> Path:
    samples = load_samples(Path(config.data), config.split_file, seed=config.seed, **config.columns)
    samples = select(limit_per_class(samples, config.limit_per_class, config.seed), config.split)
    if not samples:
        raise ValueError(f"no {config.split!r} images to calibrate on")
    random.Random(config.seed).shuffle(samples)
    calibration = samples[: config.calibration_images]
    out = config.out or config.model.with_name(config.model.stem + "-int8.onnx")
    log.info("quantizing %s with %d calibration images", config.model, len(calibration))
    return quantize_model(config.model, out, calibration)
