"""Pairing figshare originals with their re-encoded 224x224 copies (model_export.agreement)."""

import cv2
import numpy as np

from model_export.agreement import find_pairs
from tests.export.synthetic_mri import synthetic_slice


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def test_each_original_is_paired_with_its_own_squashed_copy_not_a_neighbour(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    originals = [synthetic_slice("glioma", rng, 512) for _ in range(2)]
    neighbour = synthetic_slice("glioma", np.random.default_rng(7), 512)
    # group 1: the copy of original 0 and an unrelated slice; group 2: nothing that matches original 1.
    _write(data / "brain-mri-4class/test/glioma/copy0.jpg",
           cv2.resize(cv2.resize(originals[0], (400, 512)), (224, 224), interpolation=cv2.INTER_AREA))
    _write(data / "brain-mri-4class/test/glioma/other.jpg", cv2.resize(neighbour, (224, 224)))
    _write(data / "brain-mri-4class/test/glioma/far.jpg", np.full((224, 224), 30, np.uint8))
    (data / "brain-mri-4class/splits.csv").write_text(
        "path,label,split,group,source_split\n"
        "test/glioma/copy0.jpg,glioma,test,1,test\ntest/glioma/other.jpg,glioma,test,1,test\n"
        "test/glioma/far.jpg,glioma,test,2,test\n")
    for i, img in enumerate(originals):
        _write(data / f"figshare-cheng/images/glioma/{i}.jpg", img)
    (data / "figshare-cheng/index.csv").write_text(
        "image,label,box,group,in_4class_splits\n"
        "images/glioma/0.jpg,glioma,b,1,test\nimages/glioma/1.jpg,glioma,b,2,test\n")
    pairs, unmatched = find_pairs(data, "test")
    assert unmatched == 1
    assert len(pairs) == 1 and pairs[0].copy.name == "copy0.jpg" and pairs[0].match > 0.97
