"""Build small ONNX models that follow the model contract, with the ``onnx`` helper API (no torch).

Shared by every engineer's tests (service, CLI, web, deploy)::

    from tests.model_factory import build_model
    path = build_model(tmp_path / "model.onnx")

The graph: ``image [N,3,S,S]`` -> Conv(k x k, stride k) -> Relu = ``features [N,K,S/k,S/k]``
-> GlobalAveragePool -> Flatten -> Gemm(W [C,K], b [C], transB) = ``logits [N,C]``. With
``ood_threshold``, also ``ood_score [N]`` = the mean of the features, and ``btd.ood`` metadata
with that threshold (as models from 1.2.0 have). With ``localisation``, also ``tumour_map [N,1,S/m,S/m]``
(m = ``map_stride``) = sigmoid(8 * (the mean input intensity of each m x m cell - 0.5)), in the units the
model sees (after its preprocessing window, before normalisation): the map is high where the input is
bright, so a bright blob in a test image is its tumour region; and ``btd.localisation`` metadata.
Weights are seeded, so the same arguments give the same file (and the same sha256).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.core.contract import (
    FEATURES_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    OOD_NAME,
    TUMOUR_MAP_NAME,
    LocalisationSpec,
    ModelMetadata,
    OodSpec,
    PreprocessSpec,
)

LABELS = ("glioma", "meningioma", "notumor", "pituitary")


def build_model_proto(
    *,
    labels: Sequence[str] = LABELS,
    size: int = 32,
    channels: int = 8,
    stride: int = 4,
    seed: int = 0,
    fp16_weights: bool = False,
    metadata: ModelMetadata | None = None,
    temperature: float = 1.0,
    version: str = "0.0.1-test",
    name: str = "btd-test",
    spec: PreprocessSpec | None = None,
    ood_threshold: float | None = None,
    localisation: LocalisationSpec | None = None,
    map_stride: int = 4,
) -> onnx.ModelProto:
    """A contract-conforming model. ``fp16_weights`` stores the classifier weight as float16 behind a
    Cast node (as the release model may); ``metadata`` overrides the default metadata entirely;
    ``spec`` the preprocessing (default: the current version at ``size``); ``ood_threshold`` adds the
    ``ood_score`` output and its metadata; ``localisation`` the ``tumour_map`` output and its metadata."""
    rng = np.random.default_rng(seed)
    num_classes = len(labels)
    conv_w = rng.normal(0, 0.5, (channels, 3, stride, stride)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (channels,)).astype(np.float32)
    fc_w = rng.normal(0, 1.0, (num_classes, channels)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, (num_classes,)).astype(np.float32)

    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "conv.weight", "conv.bias"], ["conv_out"],
                         kernel_shape=[stride, stride], strides=[stride, stride]),
        helper.make_node("Relu", ["conv_out"], [FEATURES_NAME]),
        helper.make_node("GlobalAveragePool", [FEATURES_NAME], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
    ]
    initializers = [numpy_helper.from_array(conv_w, "conv.weight"), numpy_helper.from_array(conv_b, "conv.bias"),
                    numpy_helper.from_array(fc_b, "fc.bias")]
    if fp16_weights:
        initializers.append(numpy_helper.from_array(fc_w.astype(np.float16), "fc.weight"))
        nodes.append(helper.make_node("Cast", ["fc.weight"], ["fc.weight.f32"], to=TensorProto.FLOAT))
        gemm_w = "fc.weight.f32"
    else:
        initializers.append(numpy_helper.from_array(fc_w, "fc.weight"))
        gemm_w = "fc.weight"
    nodes.append(helper.make_node("Gemm", ["flat", gemm_w, "fc.bias"], [LOGITS_NAME], transB=1))

    feat = size // stride
    outputs = [helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["N", num_classes]),
               helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["N", channels, feat, feat])]
    if ood_threshold is not None:
        nodes.append(helper.make_node("ReduceMean", [FEATURES_NAME], [OOD_NAME], axes=[1, 2, 3], keepdims=0))
        outputs.append(helper.make_tensor_value_info(OOD_NAME, TensorProto.FLOAT, ["N"]))
    spec = spec or PreprocessSpec(size=size)
    if localisation is not None:  # conv = 8 * (mean of channel 0's cell in [0, 1] units - 0.5), one node
        steep, cell = 8.0, map_stride * map_stride
        map_w = np.zeros((1, 3, map_stride, map_stride), np.float32)
        map_w[0, 0] = steep * spec.std[0] / cell  # undo the normalisation: unit = x * std + mean
        map_b = np.array([steep * (spec.mean[0] - 0.5)], np.float32)
        initializers += [numpy_helper.from_array(map_w, "map.weight"), numpy_helper.from_array(map_b, "map.bias")]
        nodes += [helper.make_node("Conv", [INPUT_NAME, "map.weight", "map.bias"], ["map_logit"],
                                   kernel_shape=[map_stride, map_stride], strides=[map_stride, map_stride]),
                  helper.make_node("Sigmoid", ["map_logit"], [TUMOUR_MAP_NAME])]
        side = size // map_stride
        outputs.append(helper.make_tensor_value_info(TUMOUR_MAP_NAME, TensorProto.FLOAT, ["N", 1, side, side]))
    graph = helper.make_graph(
        nodes, "btd-test", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        outputs, initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    meta = metadata or ModelMetadata(
        labels=tuple(labels), preprocess=spec, cam_weight="fc.weight",
        cam_bias="fc.bias", temperature=temperature, tumour_threshold=0.5, model_name=name, model_version=version,
        training_data={"source": "synthetic"}, metrics={"accuracy": 0.25},
        ood=None if ood_threshold is None else OodSpec(threshold=ood_threshold, method="mean-feature (test)"),
        localisation=localisation,
    )
    helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    return model


def tumour_slice(shape: tuple[int, int] = (256, 320), blob: tuple[int, int] = (200, 100), radius: int = 20) -> np.ndarray:
    """A uint8 slice: a grey head with a bright disc centred at ``blob`` (x, y), where a ``localisation``
    model's tumour map is high (its region)."""
    import cv2

    img = np.zeros(shape, np.uint8)
    cv2.ellipse(img, (shape[1] // 2, shape[0] // 2), (shape[1] // 3, shape[0] // 3 + 10), 0, 0, 360, 100, -1)
    cv2.circle(img, blob, radius, 250, -1)
    return img


def tumour_slice_png(**kwargs) -> bytes:
    import cv2

    return cv2.imencode(".png", tumour_slice(**kwargs))[1].tobytes()


def build_model(path: str | Path, **kwargs) -> Path:
    """Write :func:`build_model_proto` to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model_proto(**kwargs), str(path))
    return path


if __name__ == "__main__":  # a demo model to try the API with: random weights, meaningless predictions
    import sys

    out = build_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/btd-demo.onnx", size=224, channels=64, stride=32,
                      version="0.0.0-demo", name="btd-demo")
    print(f"wrote {out} (untrained demo model: random weights, for trying the API only)")
