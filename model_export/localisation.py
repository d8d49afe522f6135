"""Where the model looks: CAM pointing game and energy inside the tumour box.

On figshare-cheng slices (original 512x512 conversions with a tumour bounding box per image), for
the rows whose group lies in the test split: the share of images whose CAM peak falls inside the
box (pointing game) and the mean share of CAM energy inside the box. Beside them, the same
figures for a centre-of-image prior (a Gaussian bump in the middle: what "looking at the middle of
the head" scores) and the box area share (what a flat map scores on energy).

The CAM is the service's own (``app.engine``), computed from the exported ONNX file and placed on
the image through the preprocessing's framing, as the service places it.

    python -m model_export.localisation --model models/btd-resnet50.onnx [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.core.contract import Framing, preprocess_framed
from app.core.postprocess import class_activation_map, place_cam, view_size
from model_export.data import Sample, read_gray

log = logging.getLogger(__name__)

FIGSHARE = "figshare-cheng"
CENTRE_SIGMA = 0.25  # of the image side: the centre prior's spread


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in normalised image coordinates ([0, 1], x to the right, y down)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def from_yolo(cls, line: str) -> Box:
        """``class x_center y_center width height`` (normalised) -> Box."""
        _, xc, yc, w, h = (float(v) for v in line.split()[:5])
        return cls(xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)

    @property
    def area(self) -> float:
        return max(0.0, min(self.x1, 1) - max(self.x0, 0)) * max(0.0, min(self.y1, 1) - max(self.y0, 0))

    def mask(self, height: int, width: int) -> np.ndarray:
        """Pixels of a ``height x width`` map whose centres lie inside the box."""
        ys = (np.arange(height) + 0.5) / height
        xs = (np.arange(width) + 0.5) / width
        return ((ys >= self.y0) & (ys <= self.y1))[:, None] & ((xs >= self.x0) & (xs <= self.x1))[None, :]


def pointing_hit(heatmap: np.ndarray, box: Box) -> bool:
    """Does the map's maximum (centre of its pixel) fall inside the box?"""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(box.mask(*heatmap.shape)[row, col])


def energy_inside(heatmap: np.ndarray, box: Box) -> float:
    """Share of the (non-negative) map's total inside the box; 0 for an all-zero map."""
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    total = heat.sum()
    return float(heat[box.mask(*heat.shape)].sum() / total) if total > 0 else 0.0


def centre_prior(size: int, sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """A centred isotropic Gaussian on a ``size x size`` grid (sigma as a fraction of the side)."""
    axis = (np.arange(size) + 0.5) / size - 0.5
    return np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma**2))


def summarise(heatmaps: Sequence[np.ndarray], boxes: Sequence[Box]) -> dict[str, float]:
    """Pointing-game hit rate and mean energy inside the box over paired maps and boxes."""
    if len(heatmaps) != len(boxes) or not boxes:
        raise ValueError("need one box per heat map, and at least one")
    return {
        "pointing_game": float(np.mean([pointing_hit(h, b) for h, b in zip(heatmaps, boxes)])),
        "energy_in_box": float(np.mean([energy_inside(h, b) for h, b in zip(heatmaps, boxes)])),
    }


def cam_on_image(features: np.ndarray, weights: np.ndarray, class_index: int, framing: Framing,
                 image_size: tuple[int, int], max_side: int) -> np.ndarray:
    """The service's CAM placed on the image as the service places it for display (through the
    framing: a version-2 model's CAM covers its crop of the image, not the whole image), on a
    picture of the image whose long side is ``max_side`` (boxes are in normalised coordinates)."""
    cam = class_activation_map(features, weights, class_index)
    width, height = image_size
    return place_cam(cam, framing, image_size, view_size(height, width, max_side))


def figshare_test_rows(data_dir: Path) -> list[tuple[Sample, Box]]:
    """figshare-cheng rows whose group lies in the test split, with their tumour boxes."""
    import csv

    root = Path(data_dir) / FIGSHARE
    with (root / "index.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["in_4class_splits"] == "test"]
    return [
        (Sample(root / r["image"], r["label"], "test", r["group"]), Box.from_yolo((root / r["box"]).read_text()))
        for r in rows
    ]


def evaluate(model_path: Path, rows: Sequence[tuple[Sample, Box]], batch_size: int = 16) -> dict:
    """CAM of the predicted and of the true class vs the tumour box, beside the centre prior."""
    from app.engine.engine import Engine, EngineOptions
    from app.engine.runner import RuntimeOptions, default_buckets

    engine = Engine.load(model_path, EngineOptions(runtime=RuntimeOptions(buckets=default_buckets(batch_size)),
                                                   variant="fp32"))
    labels, spec, weights = engine.metadata.labels, engine.metadata.preprocess, engine.model.cam_weights
    predicted_maps, true_maps, boxes, correct = [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        grays = [read_gray(sample.path) for sample, _ in chunk]
        framed = [preprocess_framed(gray, spec) for gray in grays]
        outputs = engine.infer([tensor for tensor, _ in framed], [True] * len(chunk))
        for (sample, box), gray, (_, framing), out in zip(chunk, grays, framed, outputs):
            predicted = int(np.argmax(out.logits))
            image_size = (gray.shape[1], gray.shape[0])
            predicted_maps.append(cam_on_image(out.features, weights, predicted, framing, image_size, spec.size))
            true_maps.append(cam_on_image(out.features, weights, labels.index(sample.label), framing, image_size,
                                          spec.size))
            boxes.append(box)
            correct.append(predicted == labels.index(sample.label))
    prior = centre_prior(spec.size)
    return {
        "images": len(boxes),
        "cam_predicted_class": summarise(predicted_maps, boxes),
        "cam_true_class": summarise(true_maps, boxes),
        "cam_predicted_class_correct_only": summarise(
            [m for m, ok in zip(predicted_maps, correct) if ok], [b for b, ok in zip(boxes, correct) if ok]
        ) if any(correct) else None,
        "centre_prior": summarise([prior] * len(boxes), boxes),
        "box_area_share": float(np.mean([b.area for b in boxes])),
    }


def to_markdown(result: dict) -> str:
    rows = [
        ("CAM, predicted class", result["cam_predicted_class"]),
        ("CAM, true class", result["cam_true_class"]),
        ("centre-of-image prior (Gaussian, sigma = 0.25 side)", result["centre_prior"]),
    ]
    lines = [
        (f"figshare-cheng test rows: {result['images']} images; mean box area share "
        f"{result['box_area_share']:.3f} (a flat map's energy in the box)"),
        "",
        "| map | pointing game | energy in box |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {r['pointing_game']:.3f} | {r['energy_in_box']:.3f} |" for name, r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from model_export.data import shared_data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="exported ONNX model")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding figshare-cheng/ "
                        "(default: $BTD_DATA_DIR or ../shared/data)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = figshare_test_rows(args.data_dir or shared_data_dir())
    result = evaluate(args.model, rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
