"""Training loop pieces on tiny synthetic data: the GPU-path switches (mixed precision,
channels_last) exercised on CPU, early stopping on validation macro-F1, and seeded reproducibility."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from model_export import train
from model_export.checkpoint import read_checkpoint, save_checkpoint
from tests.export.synthetic_mri import write_image_folder, write_split_file

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("imgs")
    paths = write_image_folder(root, per_class=4, size=48)
    return {"data": str(root), "split_file": str(write_split_file(root, paths, root.parent / "splits.csv"))}


@pytest.fixture(autouse=True)
def restore_determinism():
    """``--deterministic`` switches a process-wide torch flag: put it back for the other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def tiny_config(tiny_data: dict[str, str], out: Path, **overrides) -> train.TrainConfig:
    settings = dict(out=str(out), pretrained=False, image_size=32, epochs=1, batch_size=4, threads=2,
                    views=1, cache_dir=str(out.parent / "cache"), device="cpu")
    return train.TrainConfig(**tiny_data, **{**settings, **overrides})


def test_runtime_turns_on_bf16_autocast_and_channels_last_on_cpu_only_when_asked(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    asked = train.setup_runtime(train.TrainConfig(data="x", device="cpu", amp="on", channels_last="on"))
    assert asked.amp_dtype == torch.bfloat16 and asked.channels_last
    auto = train.setup_runtime(train.TrainConfig(data="x", device="cpu"))
    assert auto.amp_dtype is None and not auto.channels_last


@pytest.mark.slow
def test_training_on_images_with_mixed_precision_and_channels_last_updates_finite_weights(
        tiny_data, tmp_path: Path) -> None:
    config = tiny_config(tiny_data, tmp_path / "run", amp="on", channels_last="on", feature_cache="off",
                         lr=0.01)
    best = train.main(config)
    state = read_checkpoint(best)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.dtype.is_floating_point)
    torch.manual_seed(0)
    initial = train.ResNet50(4, dropout=0.2).state_dict()
    assert not torch.equal(state["layer4.0.conv1.weight"], initial["layer4.0.conv1.weight"])
    assert read_checkpoint(best)["args"]["amp"] == "on"


@pytest.mark.slow
def test_training_stops_early_when_validation_macro_f1_stops_improving(tiny_data, tmp_path: Path) -> None:
    # lr 0: the weights never change, so val macro-F1 improves once (from nothing) and then stalls.
    config = tiny_config(tiny_data, tmp_path / "run", epochs=5, patience=2, lr=0.0, schedule="constant",
                         augment=False)
    train.main(config)
    history = read_checkpoint(tmp_path / "run" / "last.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.slow
def test_same_seed_gives_the_same_weights_with_a_cold_or_warm_feature_cache(tiny_data, tmp_path: Path) -> None:
    def trained(name: str, seed: int) -> dict:
        config = tiny_config(tiny_data, tmp_path / name, seed=seed, deterministic=True, lr=0.01)
        return read_checkpoint(train.main(config))["model"]

    first, again, other = trained("a", 0), trained("b", 0), trained("c", 1)  # "b" reuses "a"'s cache
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_data, tmp_path: Path) -> None:
    settings = dict(deterministic=True, lr=0.01, schedule="constant", patience=5)
    train.main(tiny_config(tiny_data, tmp_path / "straight", epochs=2, **settings))
    train.main(tiny_config(tiny_data, tmp_path / "split", epochs=1, **settings))
    train.main(tiny_config(tiny_data, tmp_path / "split", epochs=2, resume=str(tmp_path / "split" / "last.pt"),
                           **settings))
    straight = read_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    resumed = read_checkpoint(tmp_path / "split" / "last.pt")
    assert resumed["epoch"] == 1
    assert all(torch.equal(straight[k], resumed["model"][k]) for k in straight)


@pytest.mark.slow
def test_training_without_a_split_file_writes_the_split_it_made(tmp_path: Path) -> None:
    from model_export.data import load_samples, read_split_file

    root = tmp_path / "imgs"
    write_image_folder(root, per_class=8, size=48)
    fractions = {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 3}
    train.main(tiny_config({"data": str(root)}, tmp_path / "run", **fractions))
    written = read_split_file(tmp_path / "run" / "splits.csv", root)
    made = load_samples(root, None, **fractions)
    assert [(s.path, s.label, s.split, s.group) for s in written] == [(s.path, s.label, s.split, s.group)
                                                                      for s in made]
    assert {s.split for s in written} == {"train", "val", "test"}


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tiny_data, tmp_path: Path) -> None:
    first = read_checkpoint(train.main(tiny_config(tiny_data, tmp_path / "stage1", freeze="head", lr=0.01)))
    # lr 0: stage 2 cannot move the weights, so its parameters must be stage 1's, not a fresh network's.
    second_best = train.main(tiny_config(tiny_data, tmp_path / "stage2", freeze="none", lr=0.0,
                                         schedule="constant", augment=False, feature_cache="off",
                                         init_from=str(tmp_path / "stage1" / "best.pt")))
    second = read_checkpoint(second_best)
    for name in ("conv1.weight", "layer3.0.conv2.weight", "fc.weight", "fc.bias"):
        assert torch.equal(second["model"][name], first["model"][name]), name
    assert [h["epoch"] for h in second["history"]] == [1]  # a new run: its own epochs, optimizer, schedule
    assert second["args"]["freeze"] == "none"


@pytest.mark.slow
def test_init_from_refuses_a_checkpoint_trained_on_other_labels(tiny_data, tmp_path: Path) -> None:
    first = train.main(tiny_config(tiny_data, tmp_path / "stage1", freeze="head", epochs=1))
    ckpt = read_checkpoint(first)
    ckpt["labels"] = ["a", "b", "c", "d"]
    save_checkpoint(tmp_path / "other.pt", ckpt)
    with pytest.raises(ValueError, match="was trained on"):
        train.main(tiny_config(tiny_data, tmp_path / "stage2", init_from=str(tmp_path / "other.pt")))


def _main_value_worker(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        runtime = train.Runtime(torch.device("cpu"), rank=rank, world_size=2)
        results[rank] = runtime.main_value(0.5 + rank)  # each rank scored val differently
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_take_rank_zeros_validation_score_so_early_stopping_agrees(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_main_value_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
        assert dict(results) == {0: 0.5, 1: 0.5}


def test_sequence_augment_sets_the_share_of_contrast_remapped_images() -> None:
    from model_export.augment import AugmentConfig
    from model_export.cli import build_parser, config_from_args

    def augment_of(*flags: str):
        args = build_parser().parse_args(["train", "--data", "d", *flags])
        return train.training_augment(config_from_args(train.TrainConfig, args))

    assert augment_of().config.sequence_probability == AugmentConfig().sequence_probability
    assert augment_of("--sequence-augment", "0.2").config == AugmentConfig(sequence_probability=0.2)
    assert augment_of("--no-augment", "--sequence-augment", "0.2") is None
    with pytest.raises(ValueError, match="0 to 1"):
        augment_of("--sequence-augment", "40")
