"""The tumour-map decoder for a model we hold only as an exported ONNX file.

``btd fit-localiser MODEL.onnx`` reads the trunk's layer2, layer3 and layer4 maps with ONNX Runtime
(``OnnxTrunk``: the stage outputs exposed as extra graph outputs; layer4's is the ``features`` output)
and trains the same decoder as for a checkpoint; ``graft`` then exports the decoder on its own
(inputs: the three maps) and appends its nodes and initializers, prefixed, to the model's graph, so
``tumour_map`` comes from the same forward pass. Every other node, output and metadata key is kept.

The stage outputs are found by shape, not by name, so an INT8 (QDQ) file works too: layer2's output
is the last tensor of shape [1, 512, s/8, s/8] made by an Add, Relu or DequantizeLinear node (the
residual sum, its ReLU, or in a QDQ graph its dequantized copy), layer3's the last [1, 1024, s/16, s/16].
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

from app.core.contract import (
    FEATURES_NAME,
    INPUT_NAME,
    META_LOCALISATION,
    META_VERSION,
    TUMOUR_MAP_NAME,
    LocalisationSpec,
    ModelMetadata,
    PreprocessSpec,
)
from app.core.model import cam_weights

PREFIX = "localiser/"
STAGE_CHANNELS = ((512, 8), (1024, 16))  # layer2, layer3: channels and stride (layer4 is FEATURES_NAME)
STAGE_OPS = ("Add", "Relu", "DequantizeLinear")
MAP_INPUTS = ("l2", "l3", "l4")


class GraftError(RuntimeError):
    pass


def metadata(proto: onnx.ModelProto) -> ModelMetadata:
    return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})


def stage_outputs(proto: onnx.ModelProto, size: int) -> tuple[str, str, str]:
    """Names of the layer2, layer3 and layer4 output tensors (see the module docstring)."""
    fixed = copy.deepcopy(proto)
    del fixed.graph.value_info[:]
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, 3, size, size)):
        dim.Clear()
        dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    found = []
    for channels, stride in STAGE_CHANNELS:
        want = [1, channels, size // stride, size // stride]
        hits = [out for node in proto.graph.node if node.op_type in STAGE_OPS for out in node.output
                if shapes.get(out) == want]
        if not hits:
            raise GraftError(f"no stage output of shape {want} in the graph: not a ResNet50 trunk at input {size}")
        found.append(hits[-1])
    if FEATURES_NAME not in [o.name for o in proto.graph.output]:
        raise GraftError(f"the model has no {FEATURES_NAME!r} output (the layer4 map)")
    return found[0], found[1], FEATURES_NAME


def without_localiser(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without an earlier graft (so a grafted file can be grafted again)."""
    out = copy.deepcopy(proto)
    graph = out.graph
    keep_nodes = [n for n in graph.node if not n.name.startswith(PREFIX)]
    keep_inits = [i for i in graph.initializer if not i.name.startswith(PREFIX)]
    keep_outputs = [o for o in graph.output if o.name != TUMOUR_MAP_NAME]
    for field, kept in ((graph.node, keep_nodes), (graph.initializer, keep_inits), (graph.output, keep_outputs)):
        del field[:]
        field.extend(kept)
    props = [p for p in out.metadata_props if p.key != META_LOCALISATION]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    return out


def with_map_outputs(proto: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    out = copy.deepcopy(proto)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                            if n not in present)
    return out


def stores_fp16(proto: onnx.ModelProto) -> bool:
    """Weights stored as float16 initializers cast to float32 (``btd export --fp16-weights``)."""
    halves = {i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT16}
    return any(n.op_type == "Cast" and n.input and n.input[0] in halves for n in proto.graph.node)


def session(proto: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


class OnnxTrunk:
    """A feature source for ``btd fit-localiser``: an exported model run by ONNX Runtime."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        proto = without_localiser(onnx.load(str(path)))
        meta = metadata(proto)
        self.spec: PreprocessSpec = meta.preprocess
        self.names = stage_outputs(proto, self.spec.size)
        self.session = session(with_map_outputs(proto, self.names), threads)
        self.cam_weights = torch.from_numpy(cam_weights(proto, meta.cam_weight, len(meta.labels)))
        self.fp16 = stores_fp16(proto)
        # the trunk's weights identify it (not the file: grafting rewrites the file and its metadata)
        digest = hashlib.sha256()
        for init in proto.graph.initializer:
            digest.update(init.name.encode() + init.raw_data)
        self.fingerprint = digest.digest()

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """layer2, layer3, layer4 maps and the logits of a preprocessed batch."""
        l2, l3, l4, logits = self.session.run([*self.names, "logits"], {INPUT_NAME: x.numpy()})
        return torch.from_numpy(l2), torch.from_numpy(l3), torch.from_numpy(l4), torch.from_numpy(logits)


def decoder_graph(localiser: nn.Module, size: int, opset: int, fp16: bool) -> onnx.ModelProto:
    """The localiser alone as ONNX: inputs l2, l3, l4; output ``tumour_map``; names prefixed."""
    maps = (torch.randn(2, c, size // s, size // s) for c, s in ((512, 8), (1024, 16), (2048, 32)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        path = Path(tmp) / "decoder.onnx"
        torch.onnx.export(localiser.eval(), tuple(maps), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=True, input_names=list(MAP_INPUTS), output_names=[TUMOUR_MAP_NAME],
                          dynamic_axes={n: {0: "N"} for n in (*MAP_INPUTS, TUMOUR_MAP_NAME)})
        proto = onnx.load(str(path))
    if fp16:
        from model_export.fp16 import store_weights_as_fp16

        proto = store_weights_as_fp16(proto)
    for node in proto.graph.node:
        node.name = node.name or f"{node.op_type}_{id(node)}"
    return onnx.compose.add_prefix(proto, PREFIX)


def graft(proto: onnx.ModelProto, localiser: nn.Module, spec: LocalisationSpec,
          version: str | None = None) -> onnx.ModelProto:
    """The model with the localiser's ``tumour_map`` output and ``btd.localisation`` metadata (and
    ``btd.model_version`` set to ``version`` when given); nothing else changes."""
    out = without_localiser(proto)
    size = metadata(out).preprocess.size
    names = stage_outputs(out, size)
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    part = decoder_graph(localiser, size, opset, stores_fp16(out))
    wire = {PREFIX + n: real for n, real in zip(MAP_INPUTS, names)} | {PREFIX + TUMOUR_MAP_NAME: TUMOUR_MAP_NAME}
    for node in part.graph.node:
        node.input[:] = [wire.get(x, x) for x in node.input]
        node.output[:] = [wire.get(x, x) for x in node.output]
    out.graph.initializer.extend(part.graph.initializer)
    out.graph.node.extend(part.graph.node)
    out.graph.output.append(helper.make_tensor_value_info(TUMOUR_MAP_NAME, TensorProto.FLOAT,
                                                          ["N", 1, size // 8, size // 8]))
    props = {p.key: p.value for p in out.metadata_props}
    props[META_LOCALISATION] = spec.to_json()
    if version is not None:
        props[META_VERSION] = version
    del out.metadata_props[:]
    onnx.helper.set_model_props(out, props)
    onnx.checker.check_model(out)
    return out


def check_graft(original: onnx.ModelProto, grafted: onnx.ModelProto, localiser: nn.Module,
                batch: np.ndarray) -> dict[str, float]:
    """The grafted graph's outputs on ``batch``: every original output bit for bit, and ``tumour_map``
    against the torch localiser on ONNX Runtime's own stage maps. Raises GraftError when they differ."""
    base = without_localiser(original)
    names = stage_outputs(base, metadata(base).preprocess.size)
    outputs = [o.name for o in base.graph.output]
    before = session(with_map_outputs(base, names)).run([*outputs, *names], {INPUT_NAME: batch})
    after = session(grafted).run([*outputs, TUMOUR_MAP_NAME], {INPUT_NAME: batch})
    for name, a, b in zip(outputs, before, after):
        if not np.array_equal(a, b):
            raise GraftError(f"grafting changed the {name!r} output")
    with torch.inference_mode():
        expected = localiser.eval()(*(torch.from_numpy(m) for m in before[len(outputs):])).numpy()
    gap = float(np.abs(after[-1] - expected).max())
    if gap > 1e-4:
        raise GraftError(f"the grafted tumour_map differs from the torch decoder by {gap:.2e}")
    return {"tumour_map_max_abs_diff": gap}



def graft_file(source: Path, out: Path, localiser: nn.Module, threshold: float, min_area: float,
               version: str | None, batch: np.ndarray) -> dict:
    """``source`` with the localiser grafted, checked on ``batch`` (``check_graft``), written to ``out``."""
    original = onnx.load(str(source))
    grafted = graft(original, localiser, LocalisationSpec(threshold=threshold, min_area=min_area), version)
    parity = check_graft(original, grafted, localiser, batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(grafted, str(out))
    return {"model": str(out), "model_version": metadata(grafted).model_version, "parity_images": len(batch),
            **parity}
