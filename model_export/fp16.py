"""Float16 weight storage (``btd export --fp16-weights``, and grafts into such a file): weights rounded
to float16 in torch, stored as float16 initializers, cast to float32 in the graph (float32 compute)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def round_to_fp16(model: nn.Module) -> nn.Module:
    """In place: every float parameter/buffer rounded to the nearest float16 (kept as float32)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


def store_weights_as_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float32 initializers -> float16 initializers of the same name + Cast(to float32) nodes."""
    graph = model.graph
    casts, renamed = [], {}
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        init.CopyFrom(numpy_helper.from_array(half, init.name))
        renamed[init.name] = f"{init.name}/float32"
        casts.append(helper.make_node("Cast", [init.name], [renamed[init.name]], to=TensorProto.FLOAT,
                                      name=f"{init.name}/cast"))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model
