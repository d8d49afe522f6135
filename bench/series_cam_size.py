"""What ``cam=png`` adds to a series answer (``POST /v1/predict/series``), per slice: the figure behind
``BTD_MAX_SERIES_CAM_SLICES`` (README "Series"). The web page's slice viewer asks for it.

One pass of a real volume (the MNI152 template from nilearn, a healthy brain: 189 axial slices of
182x218) through the shipped model with ``cam=png``, as ``btd predict --series`` reads it; the answer's
JSON is measured with and without each slice's ``cam`` (the same answer, so the ratio is exact).

    nice .venv/bin/python bench/series_cam_size.py --json runs/series-cam-size.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from app.engine.engine import Engine, EngineOptions
from app.engine.series import SeriesLimits, predict_volume_sync

MODEL = Path(__file__).resolve().parents[1] / "models" / "btd-resnet50.onnx"


def answer_bytes(body: dict) -> int:
    return len(json.dumps(body, separators=(",", ":")).encode())  # as the route serialises it


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--variant", default="int8", help="the model variant the CPU serves (int8) or fp32")
    parser.add_argument("--volume", type=Path, default=None, help="a NIfTI volume (default: nilearn's MNI152)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.volume is None:
        from nilearn import datasets

        args.volume = Path(datasets.MNI152_FILE_PATH)
    engine = Engine.load_single(args.model, EngineOptions(variant=args.variant))
    started = time.perf_counter()
    result = predict_volume_sync(engine, args.volume.read_bytes(), SeriesLimits(), cam="png")
    seconds = time.perf_counter() - started
    body = result.to_dict()
    with_cam = answer_bytes(body)
    for item in body["slices"]:
        item["result"]["cam"] = None
    without_cam = answer_bytes(body)
    slices = len(result.slices)
    cams = [s.result.cam for s in result.slices if s.result.cam is not None]
    figures = {
        "volume": args.volume.name, "model": f"{engine.model_identity.name} {engine.model_identity.version}",
        "variant": args.variant, "slices": slices, "slice_size": [cams[0].width, cams[0].height] if cams else None,
        "answer_bytes_cam_png": with_cam, "answer_bytes_cam_none": without_cam,
        "cam_bytes_per_slice": round((with_cam - without_cam) / slices),
        "ratio_cam_png_to_none": round(with_cam / without_cam, 1),
        "answer_bytes_at_default_limit": round((with_cam - without_cam) / slices * SeriesLimits().max_cam_slices),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
