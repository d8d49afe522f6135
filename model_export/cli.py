"""The training commands of ``btd`` (train, evaluate, average, fit-ood, export, baseline, quantize, promote,
lock-manifest).

``btd`` itself (app.transports.cli.btd) registers them with :func:`add_training_parsers`. Each
command's parser is generated from its config dataclass in ``model_export.options``, the one place
its options are declared, and the config is built from the parsed arguments by field name. This
module imports neither torch nor FastAPI: each command imports its implementation when it runs, so
``btd --help`` works on a service-only install. ``python -m model_export`` (and ``torchrun -m
model_export.cli``) runs the training commands alone.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from model_export import options

C = TypeVar("C")

log = logging.getLogger("btd")


# --- the parser, generated from the config dataclasses of model_export.options ---------------------

def _comma_list(item: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma list of {item.__name__}"  # argparse names the type in its errors
    return parse


def _show(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _argument(f: dataclasses.Field, hint: Any) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` call for one config field: (names, keywords)."""
    meta = f.metadata
    help_text = (meta.get(options.HELP) or "").replace("%", "%%") or None  # argparse formats help with %
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    required = default is dataclasses.MISSING
    flag = "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {}

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in args:  # X | None
        if default is not None:
            raise TypeError(f"{f.name}: an optional option defaults to None")
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)

    if hint is bool:
        if required or meta.get(options.POSITIONAL):
            raise TypeError(f"{f.name}: a switch needs a default and cannot be positional")
        if default:
            return [flag], {"action": argparse.BooleanOptionalAction, "default": True, "help": help_text}
        return [flag], {"action": "store_true", "help": help_text}
    if origin is Literal:
        kw.update(choices=args, type=type(args[0]))
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        kw.update(type=_comma_list(args[0]), metavar=f.name.upper())
    elif origin in (list, collections.abc.Sequence):
        kw.update(type=args[0], nargs="+" if required else "*")
    elif hint in (str, int, float, Path):
        kw.update(type=hint)
    else:
        raise TypeError(f"{f.name}: no command-line form for {hint!r}")

    if not required and default is not None and not meta.get(options.POSITIONAL):
        shown = "default: " + _show(default).replace("%", "%%")
        help_text = f"{help_text} ({shown})" if help_text else shown
    kw["help"] = help_text
    if meta.get(options.POSITIONAL):
        if not required:
            kw["nargs"] = kw.get("nargs", "?")
            kw["default"] = default
        return [f.name], kw
    if required:
        kw["required"] = True
    else:
        kw["default"] = default
    return [flag], kw


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """Add one argument per field of the ``config`` dataclass (rules in model_export.options); the
    argument's dest is the field's name, so :func:`config_from_args` needs no mapping."""
    hints = typing.get_type_hints(config)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        names, kw = _argument(f, hints[f.name])
        group = f.metadata.get(options.GROUP)
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(group)
        target = parser if group is None else groups[group]
        if names[0].startswith("--"):
            kw["dest"] = f.name
        target.add_argument(*names, **kw)


def config_from_args(config: type[C], args: argparse.Namespace) -> C:
    """The ``config`` dataclass from parsed arguments: every field from the argument of its name."""
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config) if f.init})


@dataclasses.dataclass(frozen=True)
class Command:
    """A training command: its name and help, its config dataclass (its options), and what runs it."""

    name: str
    config: type
    run: Callable[[Any], int | None]
    help: str
    description: str

    def add_parser(self, sub) -> argparse.ArgumentParser:
        parser = sub.add_parser(self.name, help=self.help, description=self.description)
        add_config_arguments(parser, self.config)
        parser.set_defaults(run_training=self)
        return parser

    def __call__(self, args: argparse.Namespace) -> int:
        """``args.run_training(args)``: build the config from the whole args object and run; a command
        may return its exit status (``promote``: 1 when the candidate is refused)."""
        return int(self.run(config_from_args(self.config, args)) or 0)


# --- what each command runs (imported when it runs) -------------------------------------------------

def _train(config: options.TrainConfig) -> None:
    from model_export.train import main

    log.info("best checkpoint: %s", main(config))


def _evaluate(config: options.EvalConfig) -> None:
    from model_export.evaluate import main

    report = main(config)
    log.info("accuracy %.4f, macro-F1 %.4f on %d images; report in %s", report["accuracy"], report["macro_f1"],
             report["images"], config.out)


def _average(config: options.AverageConfig) -> None:
    from model_export.average import main

    main(config)


def _fit_ood(config: options.FitOodConfig) -> None:
    from model_export.fit_ood import main

    main(config)


def _fit_localiser(config: options.FitLocaliserConfig) -> None:
    from model_export.localiser import main

    main(config)


def _export(config: options.ExportConfig) -> None:
    from model_export.export import main

    log.info("exported %s", main(config))


def _baseline(config: options.BaselineConfig) -> None:
    from model_export.baseline import main

    log.info("baseline stamped: %s", main(config))


def _quantize(config: options.QuantizeConfig) -> None:
    from model_export.quantize import main

    log.info("quantized model: %s", main(config))


def _promote(config: options.PromoteConfig) -> int:
    from model_export.data import shared_data_dir
    from model_export.promote import ACCEPTED, promote, write_record

    record = promote(config.candidate, config.against, protocol_path=config.protocol, manifest_path=config.manifest,
                     data=config.data or shared_data_dir(), database=config.database, batch_size=config.batch_size,
                     threads=config.threads, providers=config.providers)
    json_path, md_path = write_record(record, config.out)
    log.info("%s: %s%s; change record %s and %s", record["decision"], config.candidate,
             f" (broken: {', '.join(record['broken'])})" if record["broken"] else "", json_path, md_path)
    return 0 if record["decision"] == ACCEPTED else 1


def _lock_manifest(config: options.LockManifestConfig) -> None:
    from model_export.data import shared_data_dir
    from model_export.promote import write_manifest

    sha = write_manifest(config.data or shared_data_dir(), config.out)
    log.info("wrote %s (sha256 %s): put that hash in the change protocol's [manifest] to lock it", config.out, sha)


TRAINING_COMMANDS: Sequence[Command] = (
    Command("train", options.TrainConfig, _train, help="fine-tune ResNet-50 on an ImageFolder tree",
            description="Fine-tune an ImageNet ResNet-50 on brain-MRI slices. On CPU with the trunk frozen "
                        "through layer3 the layer3 features are cached once (fast path). Multi-GPU: torchrun "
                        "--nproc_per_node N -m model_export.cli train ..."),
    Command("evaluate", options.EvalConfig, _evaluate,
            help="metrics report for a checkpoint or an exported ONNX model",
            description="Evaluate a checkpoint (.pt) or ONNX model (.onnx) on a split: accuracy, per-class "
                        "precision/recall/specificity/F1, macro/weighted F1, ROC-AUC, tumour "
                        "sensitivity/specificity, confusion matrix, ECE before/after temperature scaling; "
                        "JSON + Markdown + PNG plots."),
    Command("average", options.AverageConfig, _average,
            help="average the weights of several fine-tuned checkpoints (model soup)",
            description="Average the weights of checkpoints fine-tuned on the same data (other seeds, a second "
                        "stage), score the average and each ingredient on the val split, fit the average's "
                        "temperature there and save it as a new checkpoint. Then 'btd fit-ood' and 'btd "
                        "export' it like a best.pt."),
    Command("fit-ood", options.FitOodConfig, _fit_ood,
            help="fit the out-of-distribution score and store it in a checkpoint",
            description="Fit the Mahalanobis out-of-distribution score on the checkpoint's pooled layer4 "
                        "features of the train split, set its threshold at a quantile of the val split's "
                        "scores, and store both in the checkpoint; 'btd export' then adds the 'ood_score' "
                        "output to the graph and the threshold to the metadata."),
    Command("fit-localiser", options.FitLocaliserConfig, _fit_localiser,
            help="train the tumour-map decoder on a checkpoint's (or an .onnx model's) frozen features",
            description="Train a light decoder from the checkpoint's layer2-4 features to a tumour map, on the "
                        "LGG tumour masks and the figshare-cheng tumour boxes (train splits), pick its threshold "
                        "on the validation patients, report Dice, pointing game and box IoU on the test rows "
                        "beside the CAM, and store it in the checkpoint; 'btd export' then adds the "
                        "'tumour_map' output. Given an exported .onnx model, its maps are read with ONNX "
                        "Runtime and the decoder is grafted into its graph (the 'tumour_map' output)."),
    Command("export", options.ExportConfig, _export,
            help="export a checkpoint to ONNX (with metadata and a parity check)",
            description="Export to ONNX per the model contract (input 'image' [N,3,H,W], outputs 'logits' "
                        "and 'features'), write the metadata, and check torch vs ONNX Runtime parity at "
                        "batch 1 and 5; a failed check fails the export."),
    Command("baseline", options.BaselineConfig, _baseline,
            help="measure the drift baseline on the validation split and stamp it into an ONNX model",
            description="Run the model the service's way over a split (default val) and store the "
                        "distributions of the drift signals (class mix, tumour probability, OOD score, input "
                        "intensity) in its metadata (btd.baseline); the service compares recent answers with "
                        "them. Only the metadata changes: the graph is checked unchanged."),
    Command("quantize", options.QuantizeConfig, _quantize,
            help="INT8 static QDQ variant of an exported ONNX model",
            description="Static QDQ quantization: uint8 activations, int8 per-channel weights, calibrated on "
                        "training images through the contract's preprocess."),
    Command("promote", options.PromoteConfig, _promote,
            help="the change gate: is a candidate model non-inferior to the current one?",
            description="Score both models on the locked validation manifest, compare tumour sensitivity, "
                        "specificity, AUC, calibration (ECE) and each source/sequence with the margins of the "
                        "change protocol (paired bootstrap intervals), write the change record (JSON and "
                        "Markdown); exit status 1 when a margin is broken."),
    Command("lock-manifest", options.LockManifestConfig, _lock_manifest,
            help="write the validation manifest btd promote scores on (the release split's val rows, hashed)",
            description="Write the release split's validation rows (models/release.py's split file) with each "
                        "file's sha256: the locked set btd promote scores models on."),
)


def add_training_parsers(sub) -> None:
    """Register the training commands on an argparse subparsers object; each sets ``run_training``."""
    for command in TRAINING_COMMANDS:
        command.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="btd", description="Brain-MRI tumour classification: train, "
                                     "evaluate, export and quantize a ResNet-50.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_training_parsers(sub)
    return parser


# The pipeline's loggers say what it does at INFO (on the first rank of a torchrun job); everything
# else speaks only at WARNING unless -v.
OWN_LOGGERS = ("btd", "model_export")


def own_log_level(verbose: bool) -> int:
    return logging.DEBUG if verbose else (logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_log_level(verbose))


def run(args: argparse.Namespace) -> int:
    """Run a parsed training command, its expected failures as a message and an exit code."""
    try:
        return int(args.run_training(args) or 0)
    except ModuleNotFoundError as exc:  # e.g. torch on the service-only install of scripts/serve.sh
        log.error("btd %s needs the Python module %s, which comes with the train extra: "
                  ".venv/bin/python -m pip install -e '.[cpu,train]'", args.command, exc.name)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        if args.verbose:  # with -v, show where it came from
            raise
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:
        from model_export.pretrained import PretrainedUnavailable

        if isinstance(exc, PretrainedUnavailable):
            log.error("%s", exc)
            return 3
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
