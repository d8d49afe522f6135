"""Data layer: ImageFolder scanning, split files, near-duplicate grouping, grouped splits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from app.core.contract import PreprocessSpec, preprocess
from app.core.decode import decode_path
from model_export import data, dedup
from model_export.data import Sample
from tests.export.synthetic_mri import LABELS, synthetic_slice, write_image_folder, write_split_file


def test_scan_image_folder_takes_labels_from_folders_and_skips_other_files(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=3)
    (tmp_path / "glioma" / "notes.txt").write_text("not an image")
    samples = data.scan_image_folder(tmp_path)
    assert data.labels_of(samples) == LABELS
    assert len(samples) == 12
    assert all(s.path.suffix in (".png", ".jpg") for s in samples)


def test_scan_image_folder_reports_a_tree_without_images(tmp_path: Path) -> None:
    (tmp_path / "glioma").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.scan_image_folder(tmp_path)


def test_gray_and_rgb_files_decode_to_the_same_slice(tmp_path: Path) -> None:
    img = synthetic_slice("glioma", np.random.default_rng(0), 64)
    cv2.imwrite(str(tmp_path / "gray.png"), img)
    cv2.imwrite(str(tmp_path / "rgb.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    np.testing.assert_allclose(data.read_gray(tmp_path / "gray.png"), data.read_gray(tmp_path / "rgb.png"), atol=0.01)


def test_read_split_file_resolves_paths_against_the_root(tmp_path: Path) -> None:
    paths = write_image_folder(tmp_path / "imgs", per_class=4)
    split_file = write_split_file(tmp_path / "imgs", paths, tmp_path / "splits.csv")
    samples = data.read_split_file(split_file, tmp_path / "imgs")
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert all(s.path.exists() for s in samples)
    assert sum(s.split == "train" for s in samples) == 8


def test_read_split_file_accepts_other_column_names(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=2, labels=("glioma", "pituitary"))
    (tmp_path / "index.csv").write_text("image,label,in_4class_splits\nglioma/0.png,glioma,test\n"
                                        "pituitary/1.png,pituitary,train\n")
    samples = data.read_split_file(tmp_path / "index.csv", path_column="image", split_column="in_4class_splits")
    assert [(s.label, s.split) for s in samples] == [("glioma", "test"), ("pituitary", "train")]


def test_read_split_file_names_a_missing_column(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("file,label\na.png,glioma\n")
    with pytest.raises(ValueError, match="no column 'path'"):
        data.read_split_file(tmp_path / "bad.csv")


def test_limit_per_class_caps_each_split_and_class() -> None:
    samples = [Sample(Path(f"{label}{i}.png"), label, split) for label in ("a", "b") for split in ("train", "val")
               for i in range(5)]
    limited = data.limit_per_class(samples, 2, seed=0)
    assert len(limited) == 8
    assert data.limit_per_class(samples, 0, seed=0) == samples


def _reencoded(img: np.ndarray) -> np.ndarray:
    """The same slice resized, contrast-changed and JPEG re-encoded (what the 4-class copy did)."""
    small = cv2.resize(img, (80, 80), interpolation=cv2.INTER_AREA).astype(np.float32)
    contrast = np.clip((small / 255.0) ** 0.8 * 255 * 0.9 + 10, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", contrast, [cv2.IMWRITE_JPEG_QUALITY, 70])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def test_reencoded_copy_is_grouped_with_its_original_and_different_slices_are_not() -> None:
    rng = np.random.default_rng(3)
    originals = [synthetic_slice(label, rng, 128) for label in LABELS for _ in range(3)]
    images = originals + [_reencoded(originals[0]), _reencoded(originals[7])]
    sigs = [dedup.image_signature(img.astype(np.float32)) for img in images]
    groups = dedup.near_duplicate_groups(np.stack([s[0] for s in sigs]), np.stack([s[1] for s in sigs]))
    assert groups[12] == groups[0] and groups[13] == groups[7]
    assert groups[0] != groups[7]
    assert len(set(groups)) <= len(originals)


def test_plain_noise_images_are_not_near_duplicates() -> None:
    rng = np.random.default_rng(0)
    sigs = [dedup.image_signature(rng.random((64, 64)).astype(np.float32)) for _ in range(20)]
    groups = dedup.near_duplicate_groups(np.stack([s[0] for s in sigs]), np.stack([s[1] for s in sigs]))
    assert len(set(groups)) == 20


def test_union_find_joins_transitively() -> None:
    uf = dedup.UnionFind(4)
    uf.union(0, 1)
    uf.union(1, 2)
    assert uf.find(2) == uf.find(0) != uf.find(3)


def test_stratified_group_split_keeps_groups_whole_and_every_class_in_every_split() -> None:
    samples = [Sample(Path(f"{label}{g}_{k}.png"), label, group=f"{label}{g}")
               for label in LABELS for g in range(20) for k in range(1 + g % 3)]
    split = dedup.stratified_group_split(samples, val_fraction=0.2, test_fraction=0.2, seed=1)
    by_group: dict[str, set[str]] = {}
    for s in split:
        by_group.setdefault(s.group, set()).add(s.split)
    assert all(len(splits) == 1 for splits in by_group.values())
    for label in LABELS:
        counts = {name: sum(s.label == label and s.split == name for s in split) for name in ("train", "val", "test")}
        total = sum(counts.values())
        assert abs(counts["train"] / total - 0.6) < 0.12 and counts["val"] > 0 and counts["test"] > 0


def test_load_samples_without_split_file_makes_a_grouped_split(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=10, size=64)
    samples = data.load_samples(tmp_path, None, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert all(s.group for s in samples)


def test_slice_dataset_without_augmentation_is_exactly_the_contract_preprocess(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from model_export.datasets import SliceDataset

    paths = write_image_folder(tmp_path, per_class=1, labels=("glioma", "notumor"))
    spec = PreprocessSpec(size=48)
    dataset = SliceDataset(data.scan_image_folder(tmp_path), ("glioma", "notumor"), spec)
    tensor, target = dataset[1]
    expected = preprocess(decode_path(paths[1]).pixels, spec)
    assert target == 1
    assert torch.equal(tensor, torch.from_numpy(expected))


def test_image_folder_reads_dicom_slices_through_the_service_decoder(tmp_path: Path) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    import shutil

    write_image_folder(tmp_path, per_class=1, labels=("glioma", "notumor"))
    shutil.copy(pydicom_data.get_testdata_file("MR_small.dcm"), tmp_path / "notumor" / "scan.dcm")
    dicom = next(s for s in data.scan_image_folder(tmp_path) if s.path.suffix == ".dcm")
    assert dicom.label == "notumor"
    gray = data.read_gray(dicom.path)
    assert gray.ndim == 2 and gray.dtype == np.float32 and gray.max() > gray.min()
    assert preprocess(gray, PreprocessSpec(size=32)).shape == (3, 32, 32)
