"""Options declared once: each training command's parser is generated from its config dataclass
(model_export.options), and the parsed arguments become the config with no mapping in between."""

# ruff: noqa: RUF009  (option() returns a dataclasses.field)
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from model_export import cli, options
from model_export.options import option

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def parse(*argv: str):
    """(the config the command would run with, the parsed args)."""
    args = parser().parse_args(list(argv))
    return cli.config_from_args(args.run_training.config, args), args


def release_script():
    spec = importlib.util.spec_from_file_location("release", REPO / "models" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subparsers(root: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", cli.TRAINING_COMMANDS, ids=lambda c: c.name)
def test_every_field_of_the_config_is_an_argument_of_its_command(command) -> None:
    sub = subparsers(parser())[command.name]
    dests = {a.dest for a in sub._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(command.config)}


# The least each command needs; the rest must come out as the dataclass's defaults.
REQUIRED = {
    "train": (["--data", "d"], {"data": Path("d")}),
    "evaluate": (["m.onnx", "--data", "d"], {"model": Path("m.onnx"), "data": Path("d")}),
    "average": (["a.pt", "b.pt", "--data", "d", "--out", "s.pt"],
                {"checkpoints": [Path("a.pt"), Path("b.pt")], "data": Path("d"), "out": Path("s.pt")}),
    "fit-ood": (["best.pt", "--data", "d"], {"checkpoint": Path("best.pt"), "data": Path("d")}),
    "fit-localiser": (["best.pt"], {"checkpoint": Path("best.pt")}),
    "export": (["best.pt"], {"checkpoint": Path("best.pt")}),
    "baseline": (["m.onnx", "--data", "d"], {"model": Path("m.onnx"), "data": Path("d")}),
    "quantize": (["m.onnx", "--data", "d"], {"model": Path("m.onnx"), "data": Path("d")}),
    "promote": (["new.onnx", "--against", "old.onnx"], {"candidate": Path("new.onnx"), "against": Path("old.onnx")}),
    "lock-manifest": ([], {}),
}


@pytest.mark.parametrize("command", cli.TRAINING_COMMANDS, ids=lambda c: c.name)
def test_the_parsed_defaults_are_the_dataclass_defaults(command) -> None:
    argv, required = REQUIRED[command.name]
    config, _ = parse(command.name, *argv)
    assert config == command.config(**required)


def test_the_defaults_and_switches_users_rely_on() -> None:
    config, _ = parse("train", "--data", "d")
    assert (config.freeze, config.epochs, config.batch_size, config.lr, config.out) == \
        ("layer4", 8, 32, 1e-3, Path("runs/btd"))
    assert config.pretrained and config.augment and not config.deterministic
    config, _ = parse("train", "--data", "d", "--no-pretrained", "--no-augment", "--deterministic")
    assert not config.pretrained and not config.augment and config.deterministic
    assert config.columns == {"path_column": "path", "label_column": "label", "split_column": "split",
                              "group_column": "group"}
    export, _ = parse("export", "best.pt")
    assert export.out == Path("models/btd-resnet50.onnx") and not export.fp16 and not export.fp16_weights
    evaluate, _ = parse("evaluate", "m.onnx", "--data", "d", "--providers",
                        "CUDAExecutionProvider, CPUExecutionProvider")
    assert evaluate.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert parse("evaluate", "m.onnx", "--data", "d")[0].providers == ("CPUExecutionProvider",)


def test_a_choice_outside_the_literal_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--data", "d", "--freeze", "layer2"])
    assert "invalid choice: 'layer2'" in capsys.readouterr().err


def test_the_release_recipe_parses_to_the_configs_it_expects(tmp_path: Path) -> None:
    release = release_script()
    data, splits, work = tmp_path / "data", tmp_path / "splits.csv", tmp_path / "work"
    split_args = ["--data", str(data), "--split-file", str(splits)]

    train, _ = parse("train", *split_args, "--out", str(work / "train"), "--cache-dir", str(work / "cache"),
                     *release.TRAIN_ARGS)
    assert train == options.TrainConfig(
        data=data, split_file=splits, out=work / "train", cache_dir=work / "cache", freeze="layer3",
        feature_cache="off", amp="on", channels_last="on", epochs=12, patience=8, lr=5e-4, threads=2, workers=1,
        seed=0)

    best = work / "train" / "best.pt"
    fit, _ = parse("fit-ood", str(best), *split_args, "--threads", "2", "--features", str(tmp_path / "f.npz"))
    assert fit == options.FitOodConfig(checkpoint=best, data=data, split_file=splits, threads=2,
                                       features=tmp_path / "f.npz")

    localiser, _ = parse("fit-localiser", str(best), "--data-dir", str(data), "--threads", "2", "--cache",
                         str(tmp_path / "loc"), "--report", str(work / "localiser.json"))
    assert localiser == options.FitLocaliserConfig(checkpoint=best, data_dir=data, threads=2, cache=tmp_path / "loc",
                                                   report=work / "localiser.json")

    export, _ = parse("export", str(best), "--fp16-weights", "--version", release.VERSION, "--threshold", "0.25",
                      "--validated-sequences", "flair,t1", "--report", str(work / "report.json"),
                      "--out", str(tmp_path / "m.onnx"))
    assert export == options.ExportConfig(checkpoint=best, fp16_weights=True, version=release.VERSION,
                                          threshold=0.25, validated_sequences="flair,t1", report=work / "report.json",
                                          out=tmp_path / "m.onnx")

    figshare = ["--data", str(data / "figshare"), "--split-file", str(data / "figshare" / "index.csv"),
                *release.FIGSHARE_COLUMNS, "--split", "test", "--calibration-split", ""]
    evaluate, _ = parse("evaluate", str(tmp_path / "m-int8.onnx"), *figshare, "--baseline", str(tmp_path / "m.onnx"),
                        "--out", str(work / "eval"))
    assert evaluate == options.EvalConfig(
        model=tmp_path / "m-int8.onnx", data=data / "figshare", split_file=data / "figshare" / "index.csv",
        path_column="image", split_column="in_4class_splits", split="test", calibration_split="",
        baseline=tmp_path / "m.onnx", out=work / "eval")
    assert evaluate.columns["path_column"] == "image" and evaluate.columns["label_column"] == "label"

    quantize, _ = parse("quantize", str(tmp_path / "m.onnx"), *split_args, "--out", str(tmp_path / "m-int8.onnx"))
    assert quantize == options.QuantizeConfig(model=tmp_path / "m.onnx", data=data, split_file=splits,
                                              out=tmp_path / "m-int8.onnx")
    assert quantize.split == "train"


# A config of every form the generator knows, declared here and nowhere else.
@dataclass(kw_only=True)
class Toy:
    source: Path = option(help="what to read", positional=True)
    extras: list[Path] = option(default_factory=list, help="more inputs", positional=True)
    size: int = option(help="a required option")
    mode: Literal["fast", "slow"] = option("fast", help="how")
    scale: float | None = option(None, help="an optional float")
    names: tuple[str, ...] = option(("a", "b"), help="a comma list")
    colour: bool = option(True, help="in colour")
    dry_run: bool = option(False, help="do nothing")
    seed: int = option(7, group="shared", help="in a group")


def toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    cli.add_config_arguments(p, Toy)
    return p


def test_a_new_dataclass_field_is_a_flag_with_nothing_else_to_write(capsys) -> None:
    args = toy_parser().parse_args(["in.png", "x.png", "y.png", "--size", "3", "--mode", "slow", "--scale", "0.5",
                                    "--names", "c,d", "--no-colour", "--dry-run", "--seed", "1"])
    assert cli.config_from_args(Toy, args) == Toy(source=Path("in.png"), extras=[Path("x.png"), Path("y.png")],
                                                  size=3, mode="slow", scale=0.5, names=("c", "d"), colour=False,
                                                  dry_run=True, seed=1)
    defaults = cli.config_from_args(Toy, toy_parser().parse_args(["in.png", "--size", "3"]))
    assert defaults == Toy(source=Path("in.png"), extras=[], size=3)

    toy_parser().print_help()
    out = capsys.readouterr().out
    assert "--mode {fast,slow}" in out and "how (default: fast)" in out and "--no-colour" in out
    assert "shared:" in out and "--dry-run" in out
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["in.png"])  # --size is required
    assert "--size" in capsys.readouterr().err


def test_a_field_added_to_a_command_config_reaches_the_command(monkeypatch) -> None:
    @dataclass(kw_only=True)
    class Extended(options.TrainConfig):
        warmup_epochs: int = option(0, help="epochs of linear warm-up")

    seen = []
    command = cli.Command("train", Extended, seen.append, help="train", description="train")
    monkeypatch.setattr(cli, "TRAINING_COMMANDS", (command,))
    args = cli.build_parser().parse_args(["train", "--data", "d", "--warmup-epochs", "2", "--freeze", "none"])
    assert cli.run(args) == 0
    assert seen == [Extended(data=Path("d"), warmup_epochs=2, freeze="none")]


def test_a_type_without_a_command_line_form_is_refused_when_the_parser_is_built() -> None:
    @dataclass(kw_only=True)
    class Odd:
        table: dict[str, str] = option(default_factory=dict)

    with pytest.raises(TypeError, match="table"):
        cli.add_config_arguments(argparse.ArgumentParser(), Odd)


def test_a_checkpoint_records_the_options_as_plain_values() -> None:
    record = options.record(options.TrainConfig(data=Path("d"), cache_dir=Path("c")))
    assert record["data"] == "d" and record["cache_dir"] == "c" and record["out"] == "runs/btd"
    assert record["split_file"] is None and record["freeze"] == "layer4" and record["dropout"] == 0.2


def test_help_text_is_taken_literally() -> None:
    @dataclass(kw_only=True)
    class Percent:
        share: float = option(0.5, help="share of images, 0-100% as 0-1")

    p = argparse.ArgumentParser(prog="percent")
    cli.add_config_arguments(p, Percent)
    assert "0-100% as 0-1 (default: 0.5)" in p.format_help()


def test_the_release_reports_tumour_sensitivity_and_specificity_per_sequence(tmp_path: Path) -> None:
    release = release_script()
    flair, t1 = tmp_path / "flair.csv", tmp_path / "t1.csv"
    header = "path,label,predicted,p_glioma,p_meningioma,p_notumor,p_pituitary\n"
    flair.write_text(header + "/d/lgg-tcga-flair/images/glioma/a.png,glioma,glioma,0.9,0,0.1,0\n"
                     "/d/lgg-tcga-flair/images/notumor/b.png,notumor,notumor,0.1,0,0.9,0\n")
    t1.write_text(header + "/d/lgg-tcga-t1/images/t1pre/glioma/a.jpg,glioma,notumor,0.2,0,0.8,0\n"
                  "/d/lgg-tcga-t1/images/t1pre/glioma/c.jpg,glioma,glioma,0.7,0,0.3,0\n"
                  "/d/lgg-tcga-t1/images/t1post/notumor/b.jpg,notumor,glioma,0.6,0,0.4,0\n")
    other = tmp_path / "val.csv"  # a validation split mixes sources: only the LGG rows have a known sequence
    other.write_text(header + "/d/brain-mri-4class/glioma/x.jpg,glioma,notumor,0,0,1,0\n")
    figures = release.sequence_figures([flair, t1, other], threshold=0.5)
    assert sorted(figures) == ["flair", "t1post", "t1pre"]
    assert figures["flair"] == {"tumour_slices": 1, "tumour_free_slices": 1, "sensitivity": 1.0, "specificity": 1.0}
    assert figures["t1pre"]["sensitivity"] == 0.5 and figures["t1pre"]["tumour_slices"] == 2
    assert figures["t1post"]["specificity"] == 0.0
    assert release.validated_sequences(figures) == ["flair"]  # t1pre misses tumours, t1post calls tumour-free ones
    meets = {"sensitivity": 0.95, "specificity": 0.90, "tumour_slices": 9, "tumour_free_slices": 9}
    assert release.validated_sequences({"t1pre": meets, "flair": meets, "t1post": {**meets, "specificity": 0.89}}) \
        == ["flair", "t1"]
