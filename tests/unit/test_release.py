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


def _minimal_data(root: Path) -> Path:
    """One row per source, and lgg-tcga-t1 with both sequences in train, val and test."""
    for name in ("brain-mri-4class", "figshare-cheng", "lgg-tcga-flair", "lgg-tcga-t1"):
        (root / name).mkdir(parents=True)
    (root / "brain-mri-4class" / "splits.csv").write_text("path,label,split,group\ntrain/glioma/a.jpg,glioma,train,1\n")
    (root / "figshare-cheng" / "index.csv").write_text("image,label,group,in_4class_splits\n")
    (root / "lgg-tcga-flair" / "index.csv").write_text("path,label,patient,split\nimages/glioma/P1_3.png,glioma,P1,train\n")
    lines = ["path,label,sequence,patient,split"]
    for split, patient in (("train", "P1"), ("val", "P2"), ("test", "P3")):
        for sequence in ("t1pre", "t1post"):
            lines.append(f"images/{sequence}/glioma/{patient}_3.jpg,glioma,{sequence},{patient},{split}")
    (root / "lgg-tcga-t1" / "index.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_left_out_sequence_is_neither_trained_nor_validated_on(tmp_path):
    data = _minimal_data(tmp_path / "data")
    write_release_splits(data, tmp_path / "all.csv")
    write_release_splits(data, tmp_path / "loso.csv", leave_out="t1pre")
    with (tmp_path / "all.csv").open() as a, (tmp_path / "loso.csv").open() as b:
        every, kept = list(csv.DictReader(a)), list(csv.DictReader(b))
    dropped = [r for r in every if r not in kept]
    assert sorted((r["path"].split("/")[2], r["split"]) for r in dropped) == [("t1pre", "train"), ("t1pre", "val")]
    assert any("/t1pre/" in r["path"] and r["split"] == "test" for r in kept)
    with pytest.raises(ValueError, match="leave_out"):
        write_release_splits(data, tmp_path / "x.csv", leave_out="t2")


def test_the_leave_one_sequence_out_run_judges_the_left_out_sequence(tmp_path, monkeypatch):
    """The experiment's flow with ``btd`` stood in for: the threshold from validation, the figures per
    sequence from the LGG test predictions, the left-out sequence against 0.90 / 0.85."""
    import release

    header = "path,label,predicted,p_glioma,p_meningioma,p_notumor,p_pituitary\n"
    predictions = {
        "eval-val": ["lgg-tcga-flair/images/glioma/v.png,glioma,0.7", "lgg-tcga-t1/images/t1post/glioma/v.jpg,glioma,0.6",
                     "brain-mri-4class/x/glioma/v.jpg,glioma,0.4"],
        "eval-lgg-test": ["lgg-tcga-flair/images/glioma/a.png,glioma,0.1", "lgg-tcga-flair/images/notumor/b.png,notumor,0.9"],
        "eval-lgg-t1-test": [f"lgg-tcga-t1/images/t1pre/glioma/{i}.jpg,glioma,{p}" for i, p in enumerate((0.2, 0.3, 0.5))]
        + [f"lgg-tcga-t1/images/t1pre/notumor/n{i}.jpg,notumor,{p}" for i, p in enumerate((0.9, 0.8, 0.3))],
    }
    calls = []

    def fake_btd(*args: str) -> None:
        calls.append(args[0])
        if args[0] == "evaluate":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            rows = [f"/d/shared/data/{path},{label},{label},0,0,{p_no},0\n"
                    for path, label, p_no in (line.rsplit(",", 2) for line in predictions[out.name])]
            (out / "predictions.csv").write_text(header + "".join(rows))

    monkeypatch.setattr(release, "btd", fake_btd)
    assert release.leave_one_sequence_out("t1pre", tmp_path / "best.pt", tmp_path, ["--split-file", "s.csv"],
                                          [["--data", "flair"], ["--data", "t1"]]) == 0
    assert calls == ["export", "evaluate", "evaluate", "evaluate"]
    result = __import__("json").loads((tmp_path / "loso.json").read_text())
    # Validation tumour probabilities 0.3 (flair), 0.4 (t1post), 0.6 (other): thresholds 0.3, 0.4, 0.5 (cap).
    assert result["threshold"] == pytest.approx(0.3)
    t1pre = result["per_sequence"]["t1pre"]  # tumour probabilities 0.8, 0.7, 0.5 and 0.1, 0.2, 0.7 at 0.3
    assert (t1pre["sensitivity"], t1pre["specificity"]) == (1.0, pytest.approx(2 / 3))
    assert result["left_out"] == "t1pre" and result["met"] is False


def test_an_interrupted_training_run_goes_on_from_its_last_epoch(tmp_path, monkeypatch):
    """The recipe trains until ``history.json`` (written when training ends) exists, resuming from
    ``last.pt`` when an earlier run saved one; ``--epochs`` and ``--sequence-augment`` reach the trainer."""
    import release

    trains: list[tuple[str, ...]] = []
    monkeypatch.setattr(release, "btd", lambda *args: trains.append(args) if args[0] == "train" else None)
    monkeypatch.setattr(release, "leave_one_sequence_out", lambda *args: 0)
    data, work = _minimal_data(tmp_path / "data"), tmp_path / "work"
    argv = ["--data", str(data), "--work", str(work), "--leave-out-sequence", "t1pre", "--epochs", "8",
            "--sequence-augment", "0.2"]

    assert release.main(argv) == 0
    assert "--resume" not in trains[-1] and trains[-1][-4:] == ("--epochs", "8", "--sequence-augment", "0.2")
    (work / "train").mkdir()
    (work / "train" / "last.pt").write_bytes(b"")
    (work / "train" / "best.pt").write_bytes(b"")  # a best epoch is no finished run
    assert release.main(argv) == 0
    assert trains[-1][-2:] == ("--resume", str(work / "train" / "last.pt"))
    (work / "train" / "history.json").write_text("[]")
    assert release.main(argv) == 0
    assert len(trains) == 2
