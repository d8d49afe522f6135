"""The engine path in process, one thread of calls: bytes -> decode -> preprocess -> ONNX Runtime ->
``Prediction`` (``Engine.predict``), per image: wall latency, CPU time, and the decode / preprocess
phases. No HTTP, no batcher: what the model and the host work cost alone.

Variants run in child processes (the glibc malloc settings are per process and cannot be undone),
one after another in alternating rounds so machine noise hits each alike; figures are medians over
rounds and ratios against the first variant. A variant is ``name=TREE[:MALLOC]``: TREE a checkout
whose ``app`` package is imported (to compare commits: ``git archive <commit> app | tar -x -C DIR``),
MALLOC what the child does about glibc before the first image: ``app`` (what ``python -m app`` does
in that tree: ``app.engine.malloc.return_freed_memory`` where it exists), ``glibc`` (nothing: glibc's defaults) or
``fixed256k`` (the fixed 256 KiB mmap threshold that ``app/engine/malloc.py`` set up to b19439c).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_inprocess.py \\
        --variant base=/tmp/btd-base:app --variant new=.:app --rounds 5 --out bench-inprocess.json

After the images a burst of ``--burst`` large decodes (2048x2048 colour PNGs) runs and the child's
resident memory is read before and after it, once idle (with the trim the tree does after host work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
DEFAULT_MODEL = REPO / "models" / "btd-resnet50-int8.onnx"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """Runs inside the variant's tree (PYTHONPATH); prints one JSON line."""
    import ctypes

    if args.malloc == "fixed256k":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)
        libc.mallopt(-1, 4 * 1024 * 1024)
    elif args.malloc == "app":
        try:  # trees up to b19439c set a fixed mmap threshold at start; later ones keep glibc's defaults
            from app.engine.malloc import return_freed_memory
        except ImportError:
            pass
        else:
            return_freed_memory()
    import cv2
    import numpy as np

    from app.engine.engine import Engine, EngineOptions

    paths = sorted((DATA / "figshare-cheng" / "images" / "glioma").glob("*.jpg"))[: args.images]
    blobs = [p.read_bytes() for p in paths]
    engine = Engine.load(args.model, EngineOptions(variant="fp32"))  # the file named, as given
    for data in blobs[:3]:
        engine.predict(data)
    wall, decode, pre = [], [], []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for data in blobs:
        start = time.perf_counter()
        prediction = engine.predict(data)
        wall.append((time.perf_counter() - start) * 1000.0)
        decode.append(prediction.timings_ms.decode)
        pre.append(prediction.timings_ms.preprocess)
    elapsed = time.perf_counter() - t0
    cpu_ms = (time.process_time() - cpu0) * 1000.0 / len(blobs)
    # A burst of large decodes, then idle: what stays resident.
    rng = np.random.default_rng(0)
    big = cv2.imencode(".png", rng.integers(0, 255, (2048, 2048, 3), dtype=np.uint8))[1].tobytes()
    time.sleep(0.2)
    before = rss_mb()
    for _ in range(args.burst):
        engine.predict(big)
    after_burst = rss_mb()
    trim = None
    try:
        from app.engine.malloc import trim as trim_after_burst  # trees that trim after a burst

        trim = trim_after_burst
    except ImportError:
        pass
    if trim is not None:
        trim()
    time.sleep(0.2)
    print(json.dumps({"images": len(blobs), "cpu_ms_per_image": cpu_ms, "images_per_s": len(blobs) / elapsed,
                      "p50_ms": statistics.median(wall), "p90_ms": float(np.percentile(wall, 90)),
                      "decode_ms": statistics.median(decode), "preprocess_ms": statistics.median(pre),
                      "rss_before_burst_mb": before, "rss_after_burst_mb": after_burst, "rss_idle_mb": rss_mb()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="name=TREE[:app|glibc|fixed256k]")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--burst", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="OMP/ORT threads hint (0: ORT's choice)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", default="app", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    variants = []
    for spec in args.variant or [f"current={REPO}:app"]:
        name, _, rest = spec.partition("=")
        tree, _, malloc = rest.partition(":")
        variants.append((name, str(Path(tree).resolve()), malloc or "app"))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, tree, malloc in order:
            env = {**os.environ, "PYTHONPATH": tree}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--malloc", malloc,
                   "--model", str(args.model), "--images", str(args.images), "--burst", str(args.burst)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree, check=False)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name:<14} " + " ".join(f"{k}={v:.2f}" for k, v in runs[name][-1].items()
                                                          if k != "images"), flush=True)
    keys = [k for k in runs[variants[0][0]][0] if k != "images"]
    medians = {name: {k: statistics.median(run[k] for run in rs) for k in keys} for name, rs in runs.items()}
    first = variants[0][0]
    ratios = {name: {k: m[k] / medians[first][k] for k in keys if medians[first][k]} for name, m in medians.items()}
    print(f"\nmedians over {args.rounds} rounds, {args.images} 512x512 JPEGs (figshare glioma), one thread of calls")
    print(f"{'variant':<14}" + "".join(f"{k:>20}" for k in keys))
    for name in runs:
        print(f"{name:<14}" + "".join(f"{medians[name][k]:>20.2f}" for k in keys))
    for name in runs:
        print(f"{name + '/' + first:<14}" + "".join(f"{ratios[name].get(k, float('nan')):>20.3f}" for k in keys))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "variants": variants, "runs": runs,
                                        "medians": medians, "ratios_to_first": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
