"""``btd average``: the weight average of fine-tuned checkpoints, scored on val beside its ingredients."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from app.core.contract import PreprocessSpec
from model_export import average
from model_export.checkpoint import read_checkpoint, save_checkpoint
from model_export.cli import main as btd
from model_export.resnet import ResNet50
from tests.export.synthetic_mri import LABELS, write_image_folder, write_split_file

SIZE = 64


def write_checkpoint(path: Path, seed: int, **extra) -> Path:
    torch.manual_seed(seed)
    model = ResNet50(len(LABELS), stride_in_1x1=True)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so their averaging is seen too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(seed + 1)
    payload = {"labels": list(LABELS), "args": {"dropout": 0.0}, "model": model.state_dict(),
               "preprocess": PreprocessSpec(size=SIZE).to_json(), "training_data": {"images": 12},
               "temperature": 0.5, "ood": {"threshold": 1.0}, "best_macro_f1": 0.5, "epoch": 3, **extra}
    save_checkpoint(path, payload)
    return path


@pytest.fixture()
def data(tmp_path: Path) -> dict:
    root = tmp_path / "data"
    paths = write_image_folder(root, per_class=8, size=80)  # 2 val images per class
    return {"data": root, "split_file": write_split_file(root, paths, tmp_path / "splits.csv")}


def test_the_state_is_the_mean_of_float_tensors_and_keeps_the_first_counters(tmp_path: Path) -> None:
    a = read_checkpoint(write_checkpoint(tmp_path / "a.pt", 1))["model"]
    b = read_checkpoint(write_checkpoint(tmp_path / "b.pt", 2))["model"]
    merged = average.average_state([a, b])
    for name in ("fc.weight", "layer4.2.conv3.weight", "layer3.0.bn1.running_var"):
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2)
        assert not torch.equal(merged[name], a[name])
    assert merged["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(merged["bn1.num_batches_tracked"]) == int(a["bn1.num_batches_tracked"]) == 2


def test_checkpoints_of_other_labels_or_shapes_are_refused(tmp_path: Path) -> None:
    a = read_checkpoint(write_checkpoint(tmp_path / "a.pt", 1))
    other = read_checkpoint(write_checkpoint(tmp_path / "b.pt", 2, labels=list(reversed(LABELS))))
    with pytest.raises(ValueError, match="'labels'"):
        average.averaged_checkpoint([a, other], ["a.pt", "b.pt"])
    with pytest.raises(ValueError, match="at least two"):
        average.averaged_checkpoint([a], ["a.pt"])
    bigger = dict(a["model"], **{"fc.weight": torch.zeros(5, 2048)})
    with pytest.raises(ValueError, match="fc.weight has shape"):
        average.average_state([a["model"], bigger])


def test_the_average_is_saved_scored_beside_its_ingredients_without_their_run_state(data: dict,
                                                                                    tmp_path: Path) -> None:
    a, b = write_checkpoint(tmp_path / "a.pt", 1), write_checkpoint(tmp_path / "b.pt", 2)
    out = tmp_path / "soup.pt"
    code = btd(["average", str(a), str(b), "--data", str(data["data"]),
                "--split-file", str(data["split_file"]), "--out", str(out), "--batch-size", "4"])
    assert code == 0
    soup = read_checkpoint(out)
    assert soup["averaged_from"] == [str(a), str(b)]
    assert "ood" not in soup and "epoch" not in soup  # refit and per-run state do not carry over
    assert soup["temperature"] > 0 and soup["temperature"] != 0.5  # fit on val, not an ingredient's
    scores = soup["averaged_scores"]
    assert scores["split"] == "val" and scores["images"] == 8
    assert set(scores["ingredients"]) == {str(a), str(b)}
    assert set(scores["logit_ensemble"]) == {"accuracy", "macro_f1"}
    biases = [read_checkpoint(path)["model"]["fc.bias"] for path in (a, b)]
    torch.testing.assert_close(soup["model"]["fc.bias"], (biases[0] + biases[1]) / 2)


def test_a_model_averaged_with_itself_scores_as_itself(data: dict, tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a.pt", 1)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(a.read_bytes())
    scores = average.main(average.AverageConfig([a, copy], out=tmp_path / "soup.pt", batch_size=4, **data))
    assert scores["average"] == scores["ingredients"][str(a)] == scores["logit_ensemble"]
