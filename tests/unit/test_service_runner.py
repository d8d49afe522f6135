"""The runner: provider choice, TensorRT options, GPU->CPU fallback warning, contract checks at load."""

import logging

import numpy as np
import onnx
import pytest
from onnx import helper

from app.contract import ModelMetadata, PreprocessSpec
from app.inference.runner import (
    ModelContractError,
    Runner,
    RuntimeOptions,
    _provider_options,
    available_cpus,
    choose_providers,
)
from tests.model_factory import LABELS, build_model, build_model_proto

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def test_auto_providers_prefer_tensorrt_then_cuda_then_cpu():
    assert choose_providers(None, [CPU]) == [CPU]
    assert choose_providers(None, [CPU, CUDA]) == [CUDA, CPU]
    assert choose_providers(None, ["AzureExecutionProvider", CPU, CUDA, TRT]) == [TRT, CUDA, CPU]


def test_explicit_providers_skip_missing_ones():
    assert choose_providers([TRT, CUDA, CPU], [CPU]) == [CPU]
    assert choose_providers(["OpenVINOExecutionProvider", CPU], [CPU, CUDA]) == [CPU]


def test_explicit_gpu_list_on_cpu_machine_warns_once_about_cpu_fallback(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="app.inference.runner"):
        runner = Runner.load(build_model(tmp_path / "m.onnx"), RuntimeOptions(providers=[TRT, CUDA, CPU]))
    assert runner.provider == CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "FALLING BACK TO CPU" in warnings[0] and TRT in warnings[0] and CUDA in warnings[0]


def test_explicit_providers_none_installed_is_an_error():
    with pytest.raises(ModelContractError, match="none of the requested"):
        choose_providers([CUDA], [CPU])


def test_tensorrt_options_carry_fp16_engine_cache_and_batch_profile(tmp_path):
    options = RuntimeOptions(trt_fp16=True, trt_engine_cache_dir=tmp_path / "engines", max_batch_size=8)
    opts = _provider_options(TRT, options, channels=3, size=224)
    assert opts == {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1",
                    "trt_engine_cache_path": str(tmp_path / "engines"),
                    "trt_profile_min_shapes": "image:1x3x224x224", "trt_profile_opt_shapes": "image:8x3x224x224",
                    "trt_profile_max_shapes": "image:8x3x224x224"}
    assert (tmp_path / "engines").is_dir()
    assert _provider_options(CPU, RuntimeOptions(trt_fp16=True)) == {}


def test_gpu_requested_but_unusable_warns_once_about_cpu_fallback(tmp_path, monkeypatch, caplog):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])  # CUDA "installed" but unusable
    with caplog.at_level(logging.WARNING, logger="app.inference.runner"):
        runner = Runner.load(build_model(tmp_path / "m.onnx"))
    assert runner.provider == CPU
    fallbacks = [r for r in caplog.records if "FALLING BACK TO CPU" in r.getMessage()]
    assert len(fallbacks) == 1 and CUDA in fallbacks[0].getMessage()


def test_runner_reads_fp16_cam_weights_as_float32(tmp_path):
    runner = Runner.load(build_model(tmp_path / "m.onnx", fp16_weights=True, channels=6))
    assert runner.cam_weights.dtype == np.float32 and runner.cam_weights.shape == (len(LABELS), 6)
    runner.warm_up((1, 2))
    logits, features = runner.run(np.zeros((2, 3, 32, 32), np.float32))
    assert logits.shape == (2, 4) and features.shape == (2, 6, 8, 8)


def test_runner_uses_the_thread_budget(tmp_path):
    runner = Runner.load(build_model(tmp_path / "m.onnx"), RuntimeOptions(intra_op_threads=1))
    assert runner.session.get_session_options().intra_op_num_threads == 1
    assert available_cpus() >= 1


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_load_rejects_model_without_metadata(tmp_path):
    model = build_model_proto()
    del model.metadata_props[:]
    with pytest.raises(ModelContractError, match="contract version"):
        Runner.load(_save(model, tmp_path / "m.onnx"))


def test_load_rejects_unknown_cam_weight(tmp_path):
    meta = ModelMetadata(labels=LABELS, preprocess=PreprocessSpec(size=32), cam_weight="head.w", cam_bias="fc.bias")
    with pytest.raises(ModelContractError, match="head.w"):
        Runner.load(_save(build_model_proto(metadata=meta), tmp_path / "m.onnx"))


def test_load_rejects_cam_weight_of_wrong_shape(tmp_path):
    meta = ModelMetadata(labels=LABELS, preprocess=PreprocessSpec(size=32), cam_weight="conv.weight",
                         cam_bias="fc.bias")
    with pytest.raises(ModelContractError, match="shape"):
        Runner.load(_save(build_model_proto(metadata=meta), tmp_path / "m.onnx"))


def test_load_rejects_renamed_output(tmp_path):
    model = build_model_proto()
    model.graph.output[1].name = "feats"
    model.graph.node[1].output[0] = "feats"
    for node in model.graph.node:
        node.input[:] = ["feats" if x == "features" else x for x in node.input]
    with pytest.raises(ModelContractError, match="features"):
        Runner.load(_save(model, tmp_path / "m.onnx"))


def test_warm_up_explains_a_fixed_batch_model(tmp_path):
    model = build_model_proto()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # exported with batch 1 only
    runner = Runner.load(_save(model, tmp_path / "m.onnx"))
    runner.warm_up((1,))
    with pytest.raises(ModelContractError, match="BTD_MAX_BATCH_SIZE=1"):
        runner.warm_up((1, 4))


def test_warm_up_rejects_labels_that_do_not_match_logits(tmp_path):
    model = build_model_proto()
    meta = ModelMetadata(labels=("a", "b", "c", "d", "e"), preprocess=PreprocessSpec(size=32),
                         cam_weight="fc.weight", cam_bias="fc.bias")
    helper.set_model_props(model, meta.to_props())
    with pytest.raises(ModelContractError):
        Runner.load(_save(model, tmp_path / "m.onnx")).warm_up((1,))


def test_load_rejects_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(ModelContractError, match="not a readable ONNX model"):
        Runner.load(path)
