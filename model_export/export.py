"""Checkpoint -> ONNX file per the model contract, with metadata and a parity gate.

The graph: input ``image`` float32 [N, 3, S, S] (N dynamic), outputs ``logits`` [N, C] and
``features`` [N, 2048, s, s] (layer4, for the CAM). BatchNorm is folded into the convolutions
in torch before tracing, so the ONNX weights are exactly the torch model's weights; with
``fp16_weights`` those weights are rounded to float16 in torch first and stored as float16
initializers, each followed by a Cast to float32 (compute stays float32), so the parity check
compares like with like. The classifier's initializers keep the names ``fc.weight`` /
``fc.bias``, which the metadata names for the service's CAM.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from app.core.contract import (
    DEFAULT_VALIDATED,
    FEATURES_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    OOD_NAME,
    TUMOUR_MAP_NAME,
    LocalisationSpec,
    ModelMetadata,
    OodSpec,
    PreprocessSpec,
    ValidatedUse,
)
from model_export.checkpoint import model_from_checkpoint, read_checkpoint
from model_export.fp16 import round_to_fp16, store_weights_as_fp16
from model_export.localiser import Localiser, trunk_maps
from model_export.ood import OodFit
from model_export.options import ExportConfig
from model_export.resnet import Bottleneck, ResNet50

log = logging.getLogger(__name__)

CAM_WEIGHT = "fc.weight"
CAM_BIAS = "fc.bias"
PARITY_BATCHES = (1, 5)
# Float32 on both sides, different kernels: differences are accumulated rounding only.
PARITY_RTOL = 1e-3
PARITY_ATOL = 1e-3


class ParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond tolerance: the export is not trusted."""


def fold_batchnorm(model: ResNet50) -> ResNet50:
    """A copy with every BatchNorm folded into the preceding convolution (eval-mode statistics)."""
    fused = copy.deepcopy(model).eval()
    fused.conv1, fused.bn1 = fuse_conv_bn_eval(fused.conv1, fused.bn1), nn.Identity()
    for module in fused.modules():
        if isinstance(module, Bottleneck):
            for i in "123":
                conv, bn = getattr(module, f"conv{i}"), getattr(module, f"bn{i}")
                setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{i}", nn.Identity())
            if module.downsample is not None:
                module.downsample = nn.Sequential(fuse_conv_bn_eval(module.downsample[0], module.downsample[1]))
    return fused


def check_folding(model: ResNet50, folded: ResNet50, size: int) -> None:
    """The folded copy computes what the trained model computes (torch on both sides); raises
    ParityError. The ONNX parity check compares against the folded copy, so without this a wrong
    fold would be exported faithfully and pass."""
    x = torch.from_numpy(parity_inputs(size, max(PARITY_BATCHES), seed=99))
    with torch.inference_mode():
        want, got = model.eval()(x), folded.eval()(x)
    for name, w, g in zip((LOGITS_NAME, FEATURES_NAME), want, got):
        if not torch.allclose(g, w, rtol=PARITY_RTOL, atol=PARITY_ATOL):
            raise ParityError(f"folding BatchNorm changed {name}: max |diff| = {float((g - w).abs().max()):.3g}")


class OodScore(nn.Module):
    """The out-of-distribution score in the graph (``model_export.ood.score``): pooled layer4
    features, centred and whitened, smallest squared distance to a class mean. Output [N]."""

    def __init__(self, fit: OodFit) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.asarray(fit.mean, np.float32)))
        self.register_buffer("projection", torch.from_numpy(np.asarray(fit.projection, np.float32)))
        self.register_buffer("class_means", torch.from_numpy(np.asarray(fit.class_means, np.float32)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.mean(dim=(2, 3)) - self.mean) @ self.projection
        return ((z[:, None, :] - self.class_means[None, :, :]) ** 2).sum(dim=2).amin(dim=1)


class _ExportedResNet50(ResNet50):
    """The exported graph: logits and features, plus the OOD score and the tumour map when attached."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        localiser = getattr(self, "localiser", None)
        if localiser is None:
            logits, features = super().forward(x)
        else:
            l2, l3, features = trunk_maps(self, x)
            logits = self.head(features)
        outputs = [logits, features]
        if getattr(self, "ood", None) is not None:
            outputs.append(self.ood(features))
        if localiser is not None:
            outputs.append(localiser(l2, l3, features))
        return tuple(outputs)


def with_outputs(network: ResNet50, ood: OodFit | None = None, localiser: Localiser | None = None) -> ResNet50:
    """A copy of ``network`` with the OOD score and / or the tumour map as further outputs. The class is
    swapped rather than the network wrapped so that every module keeps its name (the classifier stays
    "fc.weight")."""
    extended = copy.deepcopy(network)
    extended.ood = OodScore(ood) if ood is not None else None
    extended.localiser = copy.deepcopy(localiser) if localiser is not None else None
    extended.__class__ = _ExportedResNet50
    return extended


def with_ood_score(network: ResNet50, fit: OodFit) -> ResNet50:
    return with_outputs(network, ood=fit)


def output_names(module: nn.Module) -> list[str]:
    names = [LOGITS_NAME, FEATURES_NAME]
    if getattr(module, "ood", None) is not None:
        names.append(OOD_NAME)
    if getattr(module, "localiser", None) is not None:
        names.append(TUMOUR_MAP_NAME)
    return names


def trace_to_onnx(module: nn.Module, size: int, path: Path, opset: int) -> onnx.ModelProto:
    path.parent.mkdir(parents=True, exist_ok=True)
    trace_input = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1234))
    # The TorchScript exporter: the torch.export one needs onnxscript (not a dependency) and renames
    # initializers; this one keeps "fc.weight" / "fc.bias". It warns that it is deprecated.
    names = output_names(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (trace_input,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={INPUT_NAME: {0: "N"}, **{name: {0: "N"} for name in names}},
        )
    return onnx.load(str(path))


def check_classifier_initializers(graph: onnx.GraphProto, num_classes: int) -> None:
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    expected = {CAM_WEIGHT: (num_classes, 2048), CAM_BIAS: (num_classes,)}
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise RuntimeError(f"exported graph lacks initializer {name} of shape {shape} (found {shapes.get(name)})")


def parity_inputs(size: int, batch: int, seed: int) -> np.ndarray:
    """Inputs unlike the trace input: preprocessed synthetic slices (bright blobs on dark)."""
    from app.core.contract import preprocess

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for _ in range(batch):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        gray = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2) + 0.1 * rng.random((size, size))
        images.append(preprocess(gray.astype(np.float32), PreprocessSpec(size=size)))
    return np.stack(images)


def check_parity(module: nn.Module, onnx_path: Path, size: int) -> dict[str, float]:
    """Torch vs ONNX Runtime on fresh inputs at each of PARITY_BATCHES; raises ParityError."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst: dict[str, float] = {}
    module.eval()
    names = output_names(module)
    for seed, batch in enumerate(PARITY_BATCHES):
        x = parity_inputs(size, batch, seed=100 + seed)
        with torch.inference_mode():
            expected = [t.numpy() for t in module(torch.from_numpy(x))]
        got = session.run(names, {INPUT_NAME: x})
        for name, want, have in zip(names, expected, got):
            if want.shape != have.shape:
                raise ParityError(f"{name} at batch {batch}: shape {have.shape}, torch gives {want.shape}")
            diff = float(np.abs(want - have).max())
            worst[name] = max(worst.get(name, 0.0), diff)
            if not np.allclose(have, want, rtol=PARITY_RTOL, atol=PARITY_ATOL):
                raise ParityError(f"{name} at batch {batch}: max |torch - onnx| = {diff:.3g} exceeds "
                                  f"rtol {PARITY_RTOL} / atol {PARITY_ATOL}")
        if not np.array_equal(expected[0].argmax(1), got[0].argmax(1)):
            raise ParityError(f"predicted classes differ at batch {batch}")
    return worst


def report_metrics(report_path: Path | None) -> tuple[dict, float | None]:
    """(metrics for the metadata, temperature) from evaluate's report.json, if given."""
    if report_path is None:
        return {}, None
    report = json.loads(Path(report_path).read_text())
    keep = ("images", "split", "accuracy", "macro_f1", "weighted_f1", "macro_roc_auc", "ece", "ece_calibrated",
            "tumour_sensitivity", "tumour_specificity", "threshold", "temperature")
    metrics = {k: report[k] for k in keep if k in report}
    metrics["per_class_f1"] = {label: row["f1"] for label, row in report.get("per_class", {}).items()}
    return metrics, report.get("temperature")


def export(
    model: ResNet50,
    labels: tuple[str, ...],
    spec: PreprocessSpec,
    out: Path,
    *,
    fp16_weights: bool = False,
    temperature: float = 1.0,
    threshold: float = 0.5,
    name: str = "btd-resnet50",
    version: str = "0.0.0",
    training_data: dict | None = None,
    metrics: dict | None = None,
    opset: int = 17,
    ood: OodFit | None = None,
    localiser: dict | None = None,
    validated: ValidatedUse = DEFAULT_VALIDATED,
) -> Path:
    """Export, write metadata, check parity (raises ParityError and removes the file on failure).
    With ``ood`` the graph gets the ``ood_score`` output and the metadata its threshold."""
    if opset < 17:
        raise ValueError("opset must be 17 or newer")
    folded = fold_batchnorm(model.cpu().eval())
    check_folding(model, folded, spec.size)
    # ResNet50.forward is already image -> (logits, features); names stay "fc.weight".
    # ``localiser``: the state ``btd fit-localiser`` stored in the checkpoint (decoder, threshold, min area).
    module = with_outputs(folded, ood, Localiser.from_state(localiser) if localiser else None)
    if fp16_weights:
        round_to_fp16(module)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    ood_spec = None if ood is None else OodSpec(threshold=ood.threshold, method="mahalanobis",
                                                calibration=ood.calibration)
    meta = ModelMetadata(labels=tuple(labels), preprocess=spec, cam_weight=CAM_WEIGHT, cam_bias=CAM_BIAS,
                         temperature=temperature, tumour_threshold=threshold, model_name=name,
                         model_version=version, training_data=training_data or {}, metrics=metrics or {},
                         ood=ood_spec, validated=validated, localisation=None if not localiser else LocalisationSpec(
                             threshold=float(localiser["threshold"]), min_area=float(localiser["min_area"])))
    try:
        proto = trace_to_onnx(module, spec.size, tmp, opset)
        check_classifier_initializers(proto.graph, len(labels))
        if fp16_weights:
            proto = store_weights_as_fp16(proto)
        helper.set_model_props(proto, meta.to_props())
        proto.producer_name = "btd model_export"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        worst = check_parity(module, tmp, spec.size)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed export leaves no file behind
        raise
    if fp16_weights:  # how far float16 storage moved the outputs from the float32 model (information)
        drift = _max_logit_change(model, module, spec.size)
        log.info("float16 weights change logits by at most %.3g vs the float32 model", drift)
    tmp.replace(out)
    log.info("parity ok at batch %s: max |diff| logits %.2g, features %.2g; %s (%.1f MB)", PARITY_BATCHES,
             worst[LOGITS_NAME], worst[FEATURES_NAME], out, out.stat().st_size / 1e6)
    return out


def float16_variant(source: Path, out: Path | None = None) -> Path:
    """``<model>-fp16.onnx`` beside ``source``: the same graph computing in float16 on a GPU (inputs
    and outputs stay float32, the heads after ``features`` stay float32), metadata kept. The
    service serves it on a GPU by ``BTD_MODEL_VARIANT`` (auto: when present); measure its accuracy
    change on a GPU with ``btd evaluate <fp16 file> --baseline <model> --providers CUDAExecutionProvider``
    (ONNX Runtime's CPU provider computes float16 graphs in float32, so a CPU run shows no change)."""
    from onnxconverter_common import float16

    from app.core.model import ModelFile, read_proto, variant_path
    from model_export.quantize import head_node_names, weights_to_fp32

    out = Path(out) if out is not None else variant_path(source, "fp16")
    proto = weights_to_fp32(read_proto(source))
    graph = proto.graph
    heads = head_node_names(graph)  # the classifier and the OOD head, kept float32
    # An output that is also read inside the graph (``features`` feeds the pooling) would be cast
    # back to float32 before its readers: give each output its own Identity at the end instead.
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        node.input[:] = [f"{x}/fp16" if x in outputs else x for x in node.input]
        node.output[:] = [f"{x}/fp16" if x in outputs else x for x in node.output]
    graph.node.extend(helper.make_node("Identity", [f"{name}/fp16"], [name], name=f"{name}/out") for name in outputs)
    with warnings.catch_warnings():  # "the float32 number ... will be truncated": tiny weights, expected
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(proto, keep_io_types=True,
                                                node_block_list=heads)
    helper.set_model_props(half, {**{p.key: p.value for p in proto.metadata_props},
                                  "btd.precision": json.dumps({"compute": "float16", "source": Path(source).name})})
    onnx.checker.check_model(half)
    tmp = out.with_name(out.name + ".partial")
    onnx.save(half, str(tmp))
    try:
        ModelFile.load(tmp)  # the variant follows the contract as the service reads it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    log.info("float16 variant: %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def _max_logit_change(original: nn.Module, rounded: nn.Module, size: int) -> float:
    x = torch.from_numpy(parity_inputs(size, 5, seed=7))
    with torch.inference_mode():
        return float((original.eval()(x)[0] - rounded(x)[0]).abs().max())


def main(config: ExportConfig) -> Path:
    if Path(config.checkpoint).suffix.lower() == ".onnx":  # an exported model: make its fp16 variant only
        if not config.fp16:
            raise ValueError("an .onnx input is only read for --fp16 (its float16 variant); export a checkpoint")
        return float16_variant(config.checkpoint)
    ckpt = read_checkpoint(config.checkpoint)
    model, labels, spec = model_from_checkpoint(ckpt)
    metrics, report_temperature = report_metrics(config.report)
    temperature = config.temperature or report_temperature or ckpt.get("temperature") or 1.0
    path = export(
        model, labels, spec, config.out, fp16_weights=config.fp16_weights, temperature=float(temperature),
        threshold=config.threshold, name=config.name, version=config.version,
        training_data=ckpt.get("training_data", {}), metrics=metrics, opset=config.opset,
        ood=OodFit.from_state(ckpt["ood"]) if ckpt.get("ood") else None,
        localiser=ckpt.get("localiser"),
        validated=validated_use(config),
    )
    if config.fp16:
        float16_variant(path)
    return path


def validated_use(config: ExportConfig) -> ValidatedUse:
    """The validated use ``--validated-sequences`` and ``--specific-sequences`` say; without the
    latter, release 1.2.0's specific sequences among the validated ones."""
    sequences = _names(config.validated_sequences)
    if config.specific_sequences is None:
        return ValidatedUse(sequences=sequences,
                            specific_sequences=tuple(s for s in DEFAULT_VALIDATED.specific if s in sequences))
    return ValidatedUse(sequences=sequences, specific_sequences=_names(config.specific_sequences))


def _names(comma_list: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in comma_list.split(",") if name.strip())
