"""What the tumour region costs: fetching the ``tumour_map`` output with every batch, and finding the
region in an image (``app.core.region.tumour_region``).

The release model has no tumour map yet, so a light decoder is grafted onto it here: ``features``
``[N, 2048, 7, 7]`` -> 1x1 Conv -> bilinear x4 -> Sigmoid = ``tumour_map [N, 1, 28, 28]`` (the shape
the trained decoder will have; its compute is a 2048-to-1 projection, far less than the backbone).
Three variants run through ``Runner.run`` in alternating rounds, in one process:

- ``base``: the release model, as served today;
- ``grafted-no-fetch``: the grafted model, the map not fetched (ONNX Runtime still computes it);
- ``grafted-fetch``: the grafted model, the map fetched (what the runner does for a localising model).

Before them, a graph with a cheap output and a costly branch to a second output is timed fetching
the cheap one alone and both: ONNX Runtime (default run options) computes the costly branch either
way, so not fetching a model's tumour map would not save its decoder's compute, only a 3 KB copy.

Figures are medians of the ms of every run of a batch (variants alternate round by round); ratios against ``grafted-no-fetch`` (the
fetch alone) and ``base`` (decoder and fetch). Then ``tumour_region`` on a 28 x 28 map for images of
several sizes (its work is capped at ``MAX_VIEW_SIDE``).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_region.py --rounds 5 --out bench-region.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.core.contract import FEATURES_NAME, TUMOUR_MAP_NAME, Framing, LocalisationSpec
from app.core.model import ModelFile, metadata_of
from app.core.region import tumour_region
from app.engine.runner import Runner, RuntimeOptions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "btd-resnet50.onnx"


def graft_decoder(source: Path, target: Path, upsample: int = 4) -> Path:
    """``source`` with a light ``tumour_map`` head on its features and ``btd.localisation`` metadata."""
    proto = onnx.load(str(source))
    channels = next(o for o in proto.graph.output if o.name == FEATURES_NAME).type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.02, (1, channels, 1, 1)).astype(np.float32)
    proto.graph.initializer.extend([numpy_helper.from_array(weight, "bench_map.weight"),
                                    numpy_helper.from_array(np.zeros(1, np.float32), "bench_map.bias"),
                                    numpy_helper.from_array(np.array([1, 1, upsample, upsample], np.float32),
                                                            "bench_map.scales")])
    proto.graph.node.extend([
        helper.make_node("Conv", [FEATURES_NAME, "bench_map.weight", "bench_map.bias"], ["bench_map.logit"]),
        helper.make_node("Resize", ["bench_map.logit", "", "bench_map.scales"], ["bench_map.up"], mode="linear"),
        helper.make_node("Sigmoid", ["bench_map.up"], [TUMOUR_MAP_NAME]),
    ])
    proto.graph.output.append(helper.make_tensor_value_info(TUMOUR_MAP_NAME, TensorProto.FLOAT, None))
    meta = replace(metadata_of(proto), localisation=LocalisationSpec())
    del proto.metadata_props[:]
    helper.set_model_props(proto, meta.to_props())
    onnx.save(proto, str(target))
    return target


def time_runs(runner: Runner, batch: list[np.ndarray], calls: int) -> list[float]:
    """ms of each of ``calls`` runs of ``batch``."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        runner.run(batch, features=False)
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def bench_fetch(model: Path, rounds: int, calls: int, batches: tuple[int, ...]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        grafted_file = ModelFile.load(graft_decoder(model, Path(tmp) / "grafted.onnx"))
        options = RuntimeOptions(buckets=tuple(sorted(set(batches))))
        base_file = ModelFile.load(model)
        runners = {
            "base": Runner.load(base_file, options),
            "grafted-no-fetch": Runner.load(replace(grafted_file, outputs=tuple(
                o for o in grafted_file.outputs if o != TUMOUR_MAP_NAME)), options),
            "grafted-fetch": Runner.load(grafted_file, options),
        }
        for runner in runners.values():
            runner.warm_up()
        assert runners["grafted-fetch"].run([np.zeros((3, 224, 224), np.float32)], features=False).tumour_map.shape \
            == (1, 28, 28)
        spec = base_file.metadata.preprocess
        rng = np.random.default_rng(1)
        out: dict = {}
        for n in batches:
            batch = list(rng.normal(size=(n, spec.channels, spec.size, spec.size)).astype(np.float32))
            samples: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(rounds):
                for name, runner in runners.items():
                    samples[name] += time_runs(runner, batch, calls)
            ms = {name: statistics.median(values) for name, values in samples.items()}
            out[f"batch{n}"] = {
                "ms_per_batch": {k: round(v, 3) for k, v in ms.items()},
                "fetch_ratio": round(ms["grafted-fetch"] / ms["grafted-no-fetch"], 4),
                "decoder_and_fetch_ratio": round(ms["grafted-fetch"] / ms["base"], 4),
            }
        return out


def bench_unfetched_branch(calls: int = 5) -> dict:
    """ms a run of a graph whose second output ends a 10-MatMul branch, fetching one output or both."""
    import onnxruntime as ort

    weight = numpy_helper.from_array(np.random.default_rng(0).random((512, 512), np.float32), "w")
    nodes, previous = [helper.make_node("Identity", ["x"], ["cheap"])], "x"
    for i in range(10):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"h{i}"]))
        previous = f"h{i}"
    nodes.append(helper.make_node("Identity", [previous], ["costly"]))
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [256, 512])
    graph = helper.make_graph(nodes, "branch", [value("x")], [value("cheap"), value("costly")], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.ones((256, 512), np.float32)
    out: dict[str, list[float]] = {"cheap": [], "cheap+costly": []}
    for _ in range(calls):
        for key, names in (("cheap", ["cheap"]), ("cheap+costly", ["cheap", "costly"])):
            start = time.perf_counter()
            session.run(names, {"x": x})
            out[key].append((time.perf_counter() - start) * 1000.0)
    return {key: round(statistics.median(values), 2) for key, values in out.items()}


def bench_region(sides: tuple[int, ...], calls: int) -> dict:
    rows, cols = np.mgrid[0:28, 0:28]
    tumour_map = np.exp(-((rows - 12) ** 2 + (cols - 15) ** 2) / 18.0).astype(np.float32)
    out = {}
    for side in sides:
        framing = Framing(0.1 * side, 0.05 * side, 0.8 * side)
        tumour_region(tumour_map, LocalisationSpec(), framing, (side, side))
        start = time.perf_counter()
        for _ in range(calls):
            tumour_region(tumour_map, LocalisationSpec(), framing, (side, side))
        out[f"{side}x{side}"] = round((time.perf_counter() - start) * 1000.0 / calls, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="runs of a batch per round and variant")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {
        "model": args.model.name, "rounds": args.rounds, "calls": args.calls,
        "unfetched_branch_ms": bench_unfetched_branch(),
        "fetch": bench_fetch(args.model, args.rounds, args.calls, tuple(args.batches)),
        "region_ms": bench_region((256, 512, 1024, 4096), calls=50),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
