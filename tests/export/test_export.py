"""ONNX export per the model contract, float16 weight storage, the parity gate, and INT8 quantization."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from app.core.contract import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, ModelMetadata, PreprocessSpec
from model_export import export as exporter
from model_export.resnet import ResNet50
from tests.export.synthetic_mri import LABELS, write_image_folder

SIZE = 64
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def trained_like_model() -> ResNet50:
    """A random ResNet-50 whose BN statistics and head are not at their initial values."""
    torch.manual_seed(0)
    model = ResNet50(len(LABELS), stride_in_1x1=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(trained_like_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    spec = PreprocessSpec(size=SIZE)
    common = dict(temperature=1.5, threshold=0.4, version="1.2.3", training_data={"images": 10},
                  metrics={"accuracy": 0.9})
    return {
        "fp32": exporter.export(trained_like_model, LABELS, spec, out / "fp32.onnx", **common),
        "fp16": exporter.export(trained_like_model, LABELS, spec, out / "fp16.onnx", fp16_weights=True, **common),
    }


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_exported_model_follows_the_contract(exported, kind: str) -> None:
    proto = onnx.load(str(exported[kind]))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.labels == LABELS and meta.preprocess == PreprocessSpec(size=SIZE)
    assert (meta.temperature, meta.tumour_threshold, meta.model_version) == (1.5, 0.4, "1.2.3")
    assert meta.metrics == {"accuracy": 0.9} and meta.training_data == {"images": 10}
    assert proto.opset_import[0].version >= 17
    inits = {i.name: i for i in proto.graph.initializer}
    assert list(inits[meta.cam_weight].dims) == [len(LABELS), 2048]
    assert list(inits[meta.cam_bias].dims) == [len(LABELS)]
    sess = session(exported[kind])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in sess.get_outputs()] == [LOGITS_NAME, FEATURES_NAME]
    logits, features = sess.run(None, {INPUT_NAME: np.zeros((3, 3, SIZE, SIZE), np.float32)})  # batch 3: dynamic
    assert logits.shape == (3, 4) and features.shape == (3, 2048, 2, 2)
    assert logits.dtype == np.float32 and features.dtype == np.float32


def test_fp16_storage_halves_the_file_and_keeps_float32_outputs(exported, trained_like_model) -> None:
    assert exported["fp16"].stat().st_size < 0.55 * exported["fp32"].stat().st_size
    proto = onnx.load(str(exported["fp16"]))
    weight = next(i for i in proto.graph.initializer if i.name == exporter.CAM_WEIGHT)
    assert weight.data_type == onnx.TensorProto.FLOAT16
    x = exporter.parity_inputs(SIZE, 2, seed=9)
    fp32 = session(exported["fp32"]).run([LOGITS_NAME], {INPUT_NAME: x})[0]
    fp16 = session(exported["fp16"]).run([LOGITS_NAME], {INPUT_NAME: x})[0]
    np.testing.assert_allclose(fp16, fp32, atol=0.05 * max(1.0, float(np.abs(fp32).max())))


def test_cam_weights_in_the_file_are_the_classifier_weights(exported, trained_like_model) -> None:
    proto = onnx.load(str(exported["fp32"]))
    weight = next(i for i in proto.graph.initializer if i.name == exporter.CAM_WEIGHT)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(weight), trained_like_model.fc.weight.detach().numpy())


def test_parity_check_fails_when_the_onnx_file_is_not_the_model(exported, trained_like_model) -> None:
    other = ResNet50(len(LABELS), stride_in_1x1=True).eval()
    with pytest.raises(exporter.ParityError):
        exporter.check_parity(exporter.fold_batchnorm(other), exported["fp32"], SIZE)


def test_failed_export_leaves_no_file(trained_like_model, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise exporter.ParityError("simulated mismatch")

    monkeypatch.setattr(exporter, "check_parity", broken)
    with pytest.raises(exporter.ParityError):
        exporter.export(trained_like_model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_fails_when_batchnorm_folding_changes_the_model(trained_like_model, tmp_path: Path,
                                                               monkeypatch) -> None:
    def fold_that_drops_bn1(model: ResNet50) -> ResNet50:
        broken = copy.deepcopy(model).eval()
        broken.bn1 = torch.nn.Identity()
        return broken

    monkeypatch.setattr(exporter, "fold_batchnorm", fold_that_drops_bn1)
    with pytest.raises(exporter.ParityError, match="folding"):
        exporter.export(trained_like_model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_batchnorm_folding_keeps_outputs(trained_like_model) -> None:
    x = torch.from_numpy(exporter.parity_inputs(SIZE, 2, seed=3))
    with torch.inference_mode():
        torch.testing.assert_close(exporter.fold_batchnorm(trained_like_model)(x)[0], trained_like_model(x)[0],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_quantized_model_keeps_outputs_metadata_and_cam_weights(exported, tmp_path: Path) -> None:
    from model_export.data import scan_image_folder
    from model_export.quantize import QUANTIZATION_PROP, quantize_model

    write_image_folder(tmp_path / "imgs", per_class=2, size=SIZE)
    out = quantize_model(exported["fp16"], tmp_path / "int8.onnx", scan_image_folder(tmp_path / "imgs"))
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMetadata.from_props(props)
    assert meta.labels == LABELS and QUANTIZATION_PROP in props
    assert meta.metrics == {"fp32_source": {"accuracy": 0.9}}
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    inits = {i.name: i for i in proto.graph.initializer}
    # uint8 activations, int8 per-channel weights (the int8/int8 default gives no speed-up on our CPU)
    zero_points = {inits[n.input[2]].data_type for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {onnx.TensorProto.UINT8}
    producer = {out: n for n in proto.graph.node for out in n.output}
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        dq = producer[conv.input[1]]
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert dq.op_type == "DequantizeLinear" and weight.data_type == onnx.TensorProto.INT8
        assert list(scale.dims) == [weight.dims[0]]  # one scale per output channel
    assert inits[meta.cam_weight].data_type == onnx.TensorProto.FLOAT
    x = exporter.parity_inputs(SIZE, 2, seed=4)
    logits, features = session(out).run(None, {INPUT_NAME: x})
    reference = session(exported["fp32"]).run([LOGITS_NAME], {INPUT_NAME: x})[0]
    assert logits.shape == reference.shape and features.shape == (2, 2048, 2, 2)
    assert np.isfinite(logits).all()


def test_fp16_variant_computes_in_float16_with_float32_inputs_and_outputs(exported) -> None:
    from app.core.model import ModelFile, variant_path

    out = exporter.float16_variant(exported["fp32"])
    assert out == variant_path(exported["fp32"], "fp16") and out.name == "fp32-fp16.onnx"
    proto = onnx.load(str(out))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in proto.graph.initializer}
    assert convs and all(inits[c.input[1]].data_type == onnx.TensorProto.FLOAT16 for c in convs)
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
    model = ModelFile.load(out)  # the service reads it: metadata and CAM weights kept
    assert model.metadata.labels == LABELS and model.cam_weights.dtype == np.float32
    x = exporter.parity_inputs(SIZE, 2, seed=5)
    half = session(out).run([LOGITS_NAME, "features"], {INPUT_NAME: x})
    full = session(exported["fp32"]).run([LOGITS_NAME, "features"], {INPUT_NAME: x})
    for h, f in zip(half, full):
        assert h.shape == f.shape and np.allclose(h, f, rtol=2e-2, atol=2e-2)


def test_btd_export_fp16_of_an_onnx_file_writes_only_the_variant(exported, tmp_path: Path) -> None:
    import shutil

    from model_export.cli import main as btd

    source = Path(shutil.copy(exported["fp32"], tmp_path / "m.onnx"))
    assert btd(["export", str(source), "--fp16"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-fp16.onnx", "m.onnx"]
    assert btd(["export", str(source)]) == 2  # an .onnx input without --fp16 is refused with a message


def _ood_fit(model: ResNet50, seed: int = 0):
    """An OOD score fitted on pooled features of random inputs, two pseudo-classes."""
    from model_export import ood

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0, 1, (24, 3, SIZE, SIZE)).astype(np.float32))
    with torch.inference_mode():
        pooled = model(x)[1].mean(dim=(2, 3)).numpy()
    fit = ood.fit(pooled, np.arange(24) % 2, components=8)
    return ood.calibrate(fit, pooled, quantile=0.9)


@pytest.mark.parametrize("fp16", [False, True])
def test_ood_score_is_a_third_output_equal_to_the_numpy_score(trained_like_model, tmp_path, fp16: bool) -> None:
    from app.core.contract import OOD_NAME
    from model_export import ood

    fit = _ood_fit(trained_like_model)
    path = exporter.export(trained_like_model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "ood.onnx",
                           ood=fit, fp16_weights=fp16)
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == [LOGITS_NAME, FEATURES_NAME, OOD_NAME]
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.ood is not None and meta.ood.threshold == pytest.approx(fit.threshold)
    assert meta.ood.calibration["components"] == 8
    # The classifier keeps its name, so the service still finds the CAM weights.
    assert {"fc.weight", "fc.bias"} <= {init.name for init in proto.graph.initializer}
    x = exporter.parity_inputs(SIZE, 3, seed=5)
    logits, features, score = session(path).run([LOGITS_NAME, FEATURES_NAME, OOD_NAME], {INPUT_NAME: x})
    assert score.shape == (3,)
    expected = ood.score(fit, features.mean(axis=(2, 3)))
    np.testing.assert_allclose(score, expected, rtol=2e-3 if fp16 else 1e-4)


def test_export_without_ood_keeps_two_outputs_and_no_ood_metadata(exported) -> None:
    proto = onnx.load(str(exported["fp32"]))
    assert [o.name for o in proto.graph.output] == [LOGITS_NAME, FEATURES_NAME]
    assert ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props}).ood is None


@pytest.mark.slow
def test_quantization_keeps_the_ood_head_in_float(trained_like_model, tmp_path: Path) -> None:
    from app.core.contract import OOD_NAME
    from model_export.data import scan_image_folder
    from model_export.quantize import head_node_names, quantize_model

    path = exporter.export(trained_like_model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "ood.onnx",
                           ood=_ood_fit(trained_like_model))
    head = set(head_node_names(onnx.load(str(path)).graph))
    assert head and not any("conv" in name.lower() for name in head)  # the trunk is quantized, the heads not
    write_image_folder(tmp_path / "imgs", per_class=2, size=SIZE)
    out = quantize_model(path, tmp_path / "int8.onnx", scan_image_folder(tmp_path / "imgs"))
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == [LOGITS_NAME, FEATURES_NAME, OOD_NAME]
    # No quantize/dequantize pair sits between the features and the OOD score's matrix product.
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(not inp.endswith("_DequantizeLinear_Output") for n in matmuls for inp in n.input)
    score = session(out).run([OOD_NAME], {INPUT_NAME: exporter.parity_inputs(SIZE, 2, seed=4)})[0]
    assert score.shape == (2,) and np.isfinite(score).all()


def test_fp16_variant_of_a_model_with_an_ood_head_keeps_the_head_in_float32(trained_like_model, tmp_path) -> None:
    from app.core.contract import OOD_NAME
    from app.core.model import ModelFile

    path = exporter.export(trained_like_model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "ood.onnx",
                           ood=_ood_fit(trained_like_model))
    half = exporter.float16_variant(path)
    assert ModelFile.load(half).has_ood
    proto = onnx.load(str(half))
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    inits = {i.name: i for i in proto.graph.initializer}
    assert matmuls and all(inits[i].data_type == onnx.TensorProto.FLOAT for n in matmuls for i in n.input if i in inits)
    x = exporter.parity_inputs(SIZE, 2, seed=6)
    np.testing.assert_allclose(session(half).run([OOD_NAME], {INPUT_NAME: x})[0],
                               session(path).run([OOD_NAME], {INPUT_NAME: x})[0], rtol=2e-2)


def test_btd_export_writes_the_validated_sequences_the_service_gates_on(trained_like_model, tmp_path: Path) -> None:
    """``--validated-sequences`` and ``--specific-sequences`` reach the metadata (the intended-use gate
    reads them); without them the use is release 1.2.0's (T1 post-contrast and FLAIR, specific on FLAIR)."""
    from app.core.contract import DEFAULT_VALIDATED, ValidatedUse
    from model_export.checkpoint import save_checkpoint
    from model_export.cli import main as btd

    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, {"labels": list(LABELS), "args": {"dropout": 0.0},
                                 "model": trained_like_model.state_dict(),
                                 "preprocess": PreprocessSpec(size=SIZE).to_json(), "temperature": 1.0})

    def validated(path: Path):
        proto = onnx.load(str(path))
        return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props}).validated

    assert btd(["export", str(checkpoint), "--out", str(tmp_path / "a.onnx")]) == 0
    assert validated(tmp_path / "a.onnx") == DEFAULT_VALIDATED
    assert btd(["export", str(checkpoint), "--out", str(tmp_path / "b.onnx"),
                "--validated-sequences", "t1, t1post,flair"]) == 0
    assert validated(tmp_path / "b.onnx").sequences == ("t1", "t1post", "flair")
    assert validated(tmp_path / "b.onnx").specific == ("flair",)  # 1.2.0's, among those validated
    assert btd(["export", str(checkpoint), "--out", str(tmp_path / "s.onnx"), "--validated-sequences", "t1,flair",
                "--specific-sequences", "t1,flair"]) == 0
    assert validated(tmp_path / "s.onnx") == ValidatedUse(sequences=("t1", "flair"), specific_sequences=("t1", "flair"))
    assert btd(["export", str(checkpoint), "--out", str(tmp_path / "n.onnx"), "--validated-sequences", "flair",
                "--specific-sequences", "t1post"]) == 2  # specific must be validated
    assert btd(["export", str(checkpoint), "--out", str(tmp_path / "c.onnx"), "--validated-sequences", "t3"]) == 2
    assert not (tmp_path / "c.onnx").exists()
