"""models/release.py: the release split file and the validation-chosen tumour threshold."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))
from release import threshold_for_sensitivity, threshold_from_predictions, write_release_splits


def _sensitivity(p: np.ndarray, is_tumour: np.ndarray, t: float) -> float:
    return float((p[is_tumour] >= t).mean())


def test_threshold_is_highest_keeping_the_sensitivity():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0.0, 0.45, 1000), rng.uniform(0.0, 0.2, 300)])
    is_tumour = np.arange(1300) < 1000
    t = threshold_for_sensitivity(p, is_tumour, min_sensitivity=0.998, cap=1.0)
    assert _sensitivity(p, is_tumour, t) >= 0.998
    assert _sensitivity(p, is_tumour, np.nextafter(t, 1.0)) < 0.998  # any higher threshold misses more


def test_threshold_is_capped_when_tumours_are_confident():
    p = np.array([0.95, 0.97, 0.99, 0.1, 0.2])
    is_tumour = np.array([True, True, True, False, False])
    assert threshold_for_sensitivity(p, is_tumour, min_sensitivity=0.99, cap=0.5) == 0.5


def test_threshold_needs_tumour_images():
    with pytest.raises(ValueError):
        threshold_for_sensitivity(np.array([0.2]), np.array([False]))


def test_threshold_from_predictions_reads_calibrated_notumor_column(tmp_path):
    path = tmp_path / "predictions.csv"
    rows = [("a", "glioma", 0.30), ("b", "pituitary", 0.60), ("c", "notumor", 0.99), ("d", "meningioma", 0.10)]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", "p_glioma", "p_meningioma", "p_notumor", "p_pituitary"])
        for name, label, p_no in rows:
            w.writerow([name, label, label, 0, 0, p_no, 1 - p_no])
    # tumour probabilities 0.7, 0.4, 0.9: keeping all three needs t <= 0.4.
    assert threshold_from_predictions(path) == pytest.approx(0.4)


def test_release_splits_add_figshare_train_and_val_rows_and_lgg_by_patient(tmp_path):
    data = tmp_path / "data"
    (data / "brain-mri-4class").mkdir(parents=True)
    (data / "figshare-cheng").mkdir()
    (data / "lgg-tcga-flair").mkdir()
    (data / "lgg-tcga-flair" / "index.csv").write_text(
        "path,label,patient,slice,tumour_fraction,split\n"
        "images/glioma/P1_3.png,glioma,P1,3,0.02,train\nimages/notumor/P2_9.png,notumor,P2,9,0.0,test\n")
    (data / "brain-mri-4class" / "splits.csv").write_text(
        "path,label,split,group,source_split\n"
        "train/glioma/a.jpg,glioma,train,1,train\ntest/notumor/b.jpg,notumor,test,2,test\n")
    (data / "figshare-cheng" / "index.csv").write_text(
        "image,label,box,group,in_4class_splits\n"
        "images/glioma/1.jpg,glioma,boxes/glioma/1.txt,1,train\n"
        "images/pituitary/2.jpg,pituitary,boxes/pituitary/2.txt,3,val\n"
        "images/meningioma/3.jpg,meningioma,boxes/meningioma/3.txt,2,test\n")
    counts = write_release_splits(data, tmp_path / "out" / "splits.csv")
    assert counts == {"train": 3, "val": 1, "test": 2}
    with (tmp_path / "out" / "splits.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == ["brain-mri-4class/train/glioma/a.jpg", "brain-mri-4class/test/notumor/b.jpg",
                                         "figshare-cheng/images/glioma/1.jpg", "figshare-cheng/images/pituitary/2.jpg",
                                         "lgg-tcga-flair/images/glioma/P1_3.png", "lgg-tcga-flair/images/notumor/P2_9.png"]
    assert rows[3]["split"] == "val" and rows[3]["group"] == "3"
    # lgg rows keep their patient split; the patient is the group, so no patient straddles splits.
    assert (rows[4]["split"], rows[4]["group"]) == ("train", "lgg-P1")
    assert (rows[5]["split"], rows[5]["group"]) == ("test", "lgg-P2")


def test_threshold_keeps_every_source_at_its_own_sensitivity_floor(tmp_path):
    from release import source_of

    path = tmp_path / "predictions.csv"
    rows = [  # (path, label, p_notumor): 4-class tumours are confident, lgg gliomas less so
        ("../shared/data/brain-mri-4class/a.jpg", "glioma", 0.05),
        ("../shared/data/brain-mri-4class/b.jpg", "pituitary", 0.10),
        ("../shared/data/brain-mri-4class/c.jpg", "notumor", 0.97),
        ("../shared/data/lgg-tcga-flair/images/glioma/d.png", "glioma", 0.60),
        ("../shared/data/lgg-tcga-flair/images/glioma/e.png", "glioma", 0.20),
        ("../shared/data/lgg-tcga-flair/images/notumor/f.png", "notumor", 0.90),
    ]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", "p_glioma", "p_meningioma", "p_notumor", "p_pituitary"])
        for name, label, p_no in rows:
            w.writerow([name, label, label, 1 - p_no, 0, p_no, 0])
    floors = {"lgg-tcga-flair/": 0.99, "": 0.998}
    assert source_of(rows[3][0], floors) == "lgg-tcga-flair/" and source_of(rows[0][0], floors) == ""
    # 4-class alone allows 0.9 (capped at 0.5); lgg needs 0.4 to keep both of its gliomas.
    assert threshold_from_predictions(path, floors) == pytest.approx(0.4)
    assert threshold_from_predictions(path, {"": 0.5}) == pytest.approx(0.5)
