"""The non-brain image set for the out-of-distribution guard: built from installed packages only."""

from collections import Counter

import pytest

from app.core.decode import decode
from model_export import nonbrain


@pytest.fixture(scope="module")
def images():
    return nonbrain.non_brain_set()


def test_every_source_contributes_and_every_image_decodes(images):
    counts = Counter(image.source for image in images)
    assert {"dicom", "synthetic", "patch"} <= set(counts)
    assert counts["dicom"] >= 20 and counts["synthetic"] >= 30
    for image in images:
        assert decode(image.data, image.media_type).pixels.ndim == 2


def test_names_are_unique_and_the_set_is_reproducible(images):
    names = [image.name for image in images]
    assert len(names) == len(set(names))
    assert names == [image.name for image in nonbrain.non_brain_set()]


def test_tiny_patches_are_tiny(images):
    patches = [image for image in images if image.source == "patch"]
    assert patches
    assert all(max(decode(p.data, p.media_type).pixels.shape) <= 96 for p in patches)


def test_the_readme_dicom_example_is_in_the_set(images):
    assert "dicom/MR_small.dcm" in {image.name for image in images}
