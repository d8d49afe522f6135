"""The runner and the model loader: provider choice, TensorRT options, GPU->CPU fallback warning,
contract checks at load, batch buckets."""

import logging
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

from app.core.contract import TUMOUR_MAP_NAME, LocalisationSpec, ModelMetadata, PreprocessSpec
from app.core.model import ModelContractError, ModelFile
from app.engine.runner import (
    Runner,
    RuntimeOptions,
    _provider_options,
    available_cpus,
    choose_providers,
    default_buckets,
)
from tests.model_factory import LABELS, build_model, build_model_proto

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def load_runner(path, options: RuntimeOptions | None = None) -> Runner:
    return Runner.load(ModelFile.load(path), options)


def test_auto_providers_prefer_tensorrt_then_cuda_then_cpu():
    assert choose_providers(None, [CPU]) == [CPU]
    assert choose_providers(None, [CPU, CUDA]) == [CUDA, CPU]
    assert choose_providers(None, ["AzureExecutionProvider", CPU, CUDA, TRT]) == [TRT, CUDA, CPU]


def test_explicit_providers_skip_missing_ones():
    assert choose_providers([TRT, CUDA, CPU], [CPU]) == [CPU]
    assert choose_providers(["OpenVINOExecutionProvider", CPU], [CPU, CUDA]) == [CPU]


def test_explicit_gpu_list_on_cpu_machine_warns_once_about_cpu_fallback(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="app.engine.runner"):
        runner = load_runner(build_model(tmp_path / "m.onnx"), RuntimeOptions(providers=[TRT, CUDA, CPU]))
    assert runner.provider == CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "FALLING BACK TO CPU" in warnings[0] and TRT in warnings[0] and CUDA in warnings[0]


def test_explicit_providers_none_installed_is_an_error():
    with pytest.raises(ModelContractError, match="none of the requested"):
        choose_providers([CUDA], [CPU])


def test_tensorrt_options_carry_fp16_engine_cache_and_batch_profile(tmp_path):
    options = RuntimeOptions(trt_fp16=True, trt_engine_cache_dir=tmp_path / "engines", buckets=(1, 2, 4, 8))
    opts = _provider_options(TRT, options, channels=3, size=224)
    assert opts == {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1",
                    "trt_engine_cache_path": str(tmp_path / "engines"),
                    "trt_profile_min_shapes": "image:1x3x224x224", "trt_profile_opt_shapes": "image:8x3x224x224",
                    "trt_profile_max_shapes": "image:8x3x224x224"}
    assert (tmp_path / "engines").is_dir()
    assert _provider_options(CPU, RuntimeOptions(trt_fp16=True)) == {}


def test_a_per_bucket_tensorrt_session_has_one_shape_and_its_own_engine_cache(tmp_path):
    options = RuntimeOptions(trt_fp16=True, trt_engine_cache_dir=tmp_path / "engines", buckets=(1, 2, 4, 8))
    opts = _provider_options(TRT, options, channels=3, size=224, bucket=4)
    assert opts["trt_profile_min_shapes"] == opts["trt_profile_opt_shapes"] == opts["trt_profile_max_shapes"] \
        == "image:4x3x224x224"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "engines" / "b4")  # engines of buckets never collide


def test_cuda_graph_is_asked_of_per_bucket_cuda_sessions_only():
    options = RuntimeOptions(cuda_graph=True, buckets=(1, 2))
    assert _provider_options(CUDA, options, bucket=2) == {"enable_cuda_graph": "1"}
    assert _provider_options(CUDA, options) == {}
    assert _provider_options(CUDA, RuntimeOptions(buckets=(1, 2)), bucket=2) == {}


def test_default_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert default_buckets(1) == (1,)
    assert default_buckets(8) == (1, 2, 4, 8)
    assert default_buckets(12) == (1, 2, 4, 8, 12)
    with pytest.raises(ValueError):
        RuntimeOptions(buckets=(4, 2))


def test_runner_pads_to_the_next_bucket_and_returns_only_the_real_rows(tmp_path):
    runner = load_runner(build_model(tmp_path / "m.onnx"), RuntimeOptions(buckets=(1, 2, 4)))
    runner.warm_up()
    images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    out = runner.run(list(images), features=True)
    assert runner.bucket_for(3) == 4 and out.logits.shape == (3, 4) and out.features.shape == (3, 8, 8, 8)
    for i, image in enumerate(images):
        alone = runner.run([image], features=True)
        np.testing.assert_allclose(out.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.features[i], alone.features[0], rtol=1e-5, atol=1e-5)
    assert runner.run(list(images), features=False).features is None
    with pytest.raises(ValueError, match="largest bucket"):
        runner.run(list(np.zeros((5, 3, 32, 32), np.float32)), features=False)


def test_io_binding_gives_the_plain_run_results(tmp_path):
    path = build_model(tmp_path / "m.onnx", ood_threshold=0.5)
    plain = load_runner(path, RuntimeOptions(buckets=(1, 4), io_binding=False))
    bound = load_runner(path, RuntimeOptions(buckets=(1, 4), io_binding=True, session_per_bucket=True))
    plain.warm_up()
    bound.warm_up()
    assert len({id(s) for s in bound.sessions.values()}) == 2 and len({id(s) for s in plain.sessions.values()}) == 1
    images = list(np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32))
    for features in (True, False):
        a, b = plain.run(images, features=features), bound.run(images, features=features)
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6)
        np.testing.assert_allclose(a.ood_score, b.ood_score, rtol=1e-6)
        assert a.ood_score.shape == (3,)
        if features:
            np.testing.assert_allclose(a.features, b.features, rtol=1e-6)
        else:
            assert a.features is None and b.features is None


def test_gpu_requested_but_unusable_warns_once_about_cpu_fallback(tmp_path, monkeypatch, caplog):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])  # CUDA "installed" but unusable
    with caplog.at_level(logging.WARNING, logger="app.engine.runner"), warnings.catch_warnings():
        # ONNX Runtime's own complaint about the provider this test pretends is installed: expected here
        warnings.filterwarnings("ignore", message=f"Specified provider '{CUDA}' is not in available provider names",
                                category=UserWarning)
        runner = load_runner(build_model(tmp_path / "m.onnx"))
    assert runner.provider == CPU
    fallbacks = [r for r in caplog.records if "FALLING BACK TO CPU" in r.getMessage()]
    assert len(fallbacks) == 1 and CUDA in fallbacks[0].getMessage()


def test_runner_reads_fp16_cam_weights_as_float32(tmp_path):
    runner = load_runner(build_model(tmp_path / "m.onnx", fp16_weights=True, channels=6))
    weights = runner.model.cam_weights
    assert weights.dtype == np.float32 and weights.shape == (len(LABELS), 6)
    runner.warm_up()
    out = runner.run(list(np.zeros((1, 3, 32, 32), np.float32)), features=True)
    assert out.logits.shape == (1, 4) and out.features.shape == (1, 6, 8, 8)


def test_runner_uses_the_thread_budget(tmp_path):
    runner = load_runner(build_model(tmp_path / "m.onnx"), RuntimeOptions(intra_op_threads=1))
    assert runner.sessions[1].get_session_options().intra_op_num_threads == 1
    assert available_cpus() >= 1


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_load_rejects_model_without_metadata(tmp_path):
    model = build_model_proto()
    del model.metadata_props[:]
    with pytest.raises(ModelContractError, match="contract version"):
        load_runner(_save(model, tmp_path / "m.onnx"))


def test_load_rejects_unknown_cam_weight(tmp_path):
    meta = ModelMetadata(labels=LABELS, preprocess=PreprocessSpec(size=32), cam_weight="head.w", cam_bias="fc.bias")
    with pytest.raises(ModelContractError, match="head.w"):
        load_runner(_save(build_model_proto(metadata=meta), tmp_path / "m.onnx"))


def test_load_rejects_cam_weight_of_wrong_shape(tmp_path):
    meta = ModelMetadata(labels=LABELS, preprocess=PreprocessSpec(size=32), cam_weight="conv.weight",
                         cam_bias="fc.bias")
    with pytest.raises(ModelContractError, match="shape"):
        load_runner(_save(build_model_proto(metadata=meta), tmp_path / "m.onnx"))


def test_load_rejects_renamed_output(tmp_path):
    model = build_model_proto()
    model.graph.output[1].name = "feats"
    model.graph.node[1].output[0] = "feats"
    for node in model.graph.node:
        node.input[:] = ["feats" if x == "features" else x for x in node.input]
    with pytest.raises(ModelContractError, match="features"):
        load_runner(_save(model, tmp_path / "m.onnx"))


def test_warm_up_explains_a_fixed_batch_model(tmp_path):
    model = build_model_proto()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # exported with batch 1 only
    load_runner(_save(model, tmp_path / "m.onnx")).warm_up()
    with pytest.raises(ModelContractError, match="BTD_MAX_BATCH_SIZE=1"):
        load_runner(_save(model, tmp_path / "m.onnx"), RuntimeOptions(buckets=(1, 4))).warm_up()


def test_warm_up_rejects_labels_that_do_not_match_logits(tmp_path):
    model = build_model_proto()
    meta = ModelMetadata(labels=("a", "b", "c", "d", "e"), preprocess=PreprocessSpec(size=32),
                         cam_weight="fc.weight", cam_bias="fc.bias")
    helper.set_model_props(model, meta.to_props())
    with pytest.raises(ModelContractError):
        load_runner(_save(model, tmp_path / "m.onnx")).warm_up()


def test_load_rejects_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(ModelContractError, match="not a readable ONNX model"):
        ModelFile.load(path)


def test_load_rejects_an_ood_output_without_its_metadata(tmp_path):
    model = build_model_proto(ood_threshold=1.0)
    props = {p.key: p.value for p in model.metadata_props if p.key != "btd.ood"}
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    with pytest.raises(ModelContractError, match="ood_score"):
        ModelFile.load(_save(model, tmp_path / "m.onnx"))


def test_bound_buffers_take_their_shapes_from_the_graph_or_refuse_a_cuda_graph(tmp_path):
    from types import SimpleNamespace

    from app.engine.runner import _declared_shapes

    fixed = SimpleNamespace(get_outputs=lambda: [SimpleNamespace(name="logits", shape=["N", 4]),
                                                 SimpleNamespace(name="features", shape=["N", 8, 7, 7])])
    assert _declared_shapes(fixed, 16) == {"logits": (16, 4), "features": (16, 8, 7, 7)}
    loose = SimpleNamespace(get_outputs=lambda: [SimpleNamespace(name="features", shape=["N", 8, "h", "w"])])
    assert _declared_shapes(loose, 2) is None
    runner = load_runner(build_model(tmp_path / "m.onnx"), RuntimeOptions(buckets=(1, 2), io_binding=True))
    runner.sessions = {b: loose for b in runner.buckets}
    runner.cuda_graph = True
    with pytest.raises(ModelContractError, match="BTD_CUDA_GRAPH=false"):
        runner.warm_up()


def test_the_tumour_map_comes_with_every_batch_through_plain_and_bound_runs(tmp_path):
    path = build_model(tmp_path / "m.onnx", localisation=LocalisationSpec())
    plain = load_runner(path, RuntimeOptions(buckets=(1, 4), io_binding=False))
    bound = load_runner(path, RuntimeOptions(buckets=(1, 4), io_binding=True, session_per_bucket=True))
    plain.warm_up()
    bound.warm_up()
    images = list(np.random.default_rng(2).normal(size=(3, 3, 32, 32)).astype(np.float32))
    for features in (True, False):
        a, b = plain.run(images, features=features), bound.run(images, features=features)
        assert a.tumour_map.shape == (3, 8, 8) and ((a.tumour_map >= 0) & (a.tumour_map <= 1)).all()
        np.testing.assert_allclose(a.tumour_map, b.tumour_map, rtol=1e-6)
    assert load_runner(build_model(tmp_path / "plain.onnx")).run(images[:1], features=False).tumour_map is None


def test_warm_up_rejects_a_tumour_map_of_another_shape(tmp_path):
    model = build_model_proto(localisation=LocalisationSpec())
    sigmoid = next(n for n in model.graph.node if n.output[0] == TUMOUR_MAP_NAME)
    sigmoid.input[0] = "features"  # [N, 8, 8, 8]: eight channels, not one
    model.graph.output[-1].type.tensor_type.shape.dim[1].dim_value = 8
    with pytest.raises(ModelContractError, match="tumour_map shape"):
        load_runner(_save(model, tmp_path / "m.onnx")).warm_up()
