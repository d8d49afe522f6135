"""The layer3 feature cache of the fast CPU path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from app.core.contract import PreprocessSpec
from model_export.augment import Augment
from model_export.data import scan_image_folder
from model_export.datasets import CachedFeatureDataset, SliceDataset
from model_export.features import build_feature_cache
from model_export.resnet import ResNet50
from tests.export.synthetic_mri import write_image_folder

torch.set_num_threads(2)
LABELS = ("glioma", "notumor")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    write_image_folder(root, per_class=2, size=48, labels=LABELS)
    torch.manual_seed(0)
    return scan_image_folder(root), ResNet50(2).eval()


def test_cache_holds_the_layer3_output_of_each_view(setup, tmp_path: Path) -> None:
    samples, model = setup
    dataset = SliceDataset(samples, LABELS, PreprocessSpec(size=32), Augment(), seed=1)
    cache = build_feature_cache(model, dataset, tmp_path, views=2, batch_size=3)
    assert cache.array.shape == (8, 1024, 2, 2) and cache.array.dtype == np.float16
    with torch.inference_mode():
        expected = model.stem_to_layer3(torch.from_numpy(dataset.load(1, view=1))[None])[0].numpy()
    np.testing.assert_allclose(cache.array[3].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert not np.array_equal(cache.array[2], cache.array[3])  # two different augmented views


def test_cached_dataset_reads_view_epoch_mod_views(setup, tmp_path: Path) -> None:
    samples, model = setup
    dataset = SliceDataset(samples, LABELS, PreprocessSpec(size=32), Augment(), seed=1)
    cached = CachedFeatureDataset(build_feature_cache(model, dataset, tmp_path, views=2))
    cached.set_epoch(3)
    features, target = cached[1]
    np.testing.assert_array_equal(features.numpy(), cached.cache.array[3].astype(np.float32))
    assert target == dataset[1][1]


def test_cache_is_reused_for_the_same_inputs_and_rebuilt_when_the_trunk_changes(setup, tmp_path: Path) -> None:
    samples, model = setup
    dataset = SliceDataset(samples, LABELS, PreprocessSpec(size=32))
    first = build_feature_cache(model, dataset, tmp_path)
    again = build_feature_cache(model, dataset, tmp_path)
    assert again.directory == first.directory and first.views == 1  # no augmentation: one view
    changed = ResNet50(2).eval()
    with torch.no_grad():
        changed.load_state_dict(model.state_dict())
        changed.layer3[0].conv1.weight.mul_(2.0)
    assert build_feature_cache(changed, dataset, tmp_path).directory != first.directory


def test_cache_is_rebuilt_when_an_image_is_rewritten_in_place(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    paths = write_image_folder(root, per_class=2, size=48, labels=LABELS)
    torch.manual_seed(0)
    model = ResNet50(2).eval()
    dataset = SliceDataset(scan_image_folder(root), LABELS, PreprocessSpec(size=32))
    first = build_feature_cache(model, dataset, tmp_path / "cache")
    replacement = write_image_folder(tmp_path / "other", per_class=2, size=48, labels=LABELS, seed=5)[0]
    paths[0].write_bytes(replacement.read_bytes())  # same path, other pixels
    os.utime(paths[0], ns=(1, 1))  # a distinct mtime even on coarse-grained file systems
    rebuilt = build_feature_cache(model, dataset, tmp_path / "cache")
    assert rebuilt.directory != first.directory
    with torch.inference_mode():
        expected = model.stem_to_layer3(dataset[0][0][None])[0].numpy()
    np.testing.assert_allclose(rebuilt.array[0].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
