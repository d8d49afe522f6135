"""``btd fit-ood`` end to end on a small checkpoint: the fit lands in the checkpoint, and the features
cache makes a refit with other settings reuse the extracted features."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from app.core.contract import PreprocessSpec
from model_export import fit_ood
from model_export.checkpoint import read_checkpoint, save_checkpoint
from model_export.resnet import ResNet50
from tests.export.synthetic_mri import LABELS, write_image_folder

SIZE = 64


@pytest.fixture()
def checkpoint_and_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = tmp_path / "data"
    paths = write_image_folder(data, per_class=4, size=80)
    split_file = tmp_path / "splits.csv"
    with split_file.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "split", "group"))
        for i, path in enumerate(paths):
            writer.writerow((path.relative_to(data).as_posix(), path.parent.name, "val" if i % 4 == 3 else "train", i))
    torch.manual_seed(0)
    model = ResNet50(len(LABELS), stride_in_1x1=True)
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, {"labels": list(LABELS), "args": {"dropout": 0.0}, "model": model.state_dict(),
                           "preprocess": PreprocessSpec(size=SIZE).to_json()})
    return ckpt, data, split_file


def test_fit_is_stored_and_a_refit_reuses_the_cached_features(checkpoint_and_data, monkeypatch) -> None:
    ckpt, data, split_file = checkpoint_and_data
    cache = ckpt.with_name("features.npz")
    first = fit_ood.main(fit_ood.FitOodConfig(ckpt, data=data, split_file=split_file, components=8,
                                              quantile=0.9, features=cache))
    stored = read_checkpoint(ckpt)["ood"]
    assert stored["projection"].shape == (2048, 8) and stored["threshold"] == pytest.approx(first.threshold)
    assert stored["calibration"]["fit_images"] == 12 and stored["calibration"]["val_images"] == 4
    assert set(np.load(cache)) == {"key", "x_train", "y_train", "x_val"}

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(fit_ood, "pooled_features", no_extraction)
    second = fit_ood.main(fit_ood.FitOodConfig(ckpt, data=data, split_file=split_file, components=4,
                                               quantile=0.5, features=cache))
    assert read_checkpoint(ckpt)["ood"]["projection"].shape == (2048, 4)
    assert second.threshold < first.threshold  # a lower quantile of scores in fewer dimensions


def test_a_cache_of_another_split_is_refused(checkpoint_and_data) -> None:
    ckpt, data, split_file = checkpoint_and_data
    cache = ckpt.with_name("features.npz")
    np.savez(cache, key="another checkpoint", x_train=np.zeros((3, 2048), np.float32), y_train=np.zeros(3),
             x_val=np.zeros((1, 2048), np.float32))
    with pytest.raises(ValueError, match="delete it"):
        fit_ood.main(fit_ood.FitOodConfig(ckpt, data=data, split_file=split_file, features=cache))
