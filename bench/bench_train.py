"""Training throughput of the CPU paths, as ratios measured in one run.

Measures, on random inputs at the chosen size (images/s, median of rounds, rounds interleaved
so machine noise hits every path alike):
- ``full``: one training step of the whole network (``--freeze none``);
- ``frozen``: a step with the trunk frozen through layer3, images through the whole network;
- ``cache``: the forward through layer3 that fills the feature cache (done once per view);
- ``cached``: a step of layer4 + head on cached layer3 features (the fast path, every epoch).
Reported with the ratios cached/frozen and cached/full, and the epoch-time estimate of the fast
path for N images. With ``--bf16``, every path also runs as ``btd train --amp on --channels-last
on`` does (bfloat16 autocast, channels_last), interleaved with the float32 runs, and the
bf16/fp32 ratio of each is reported. Not a test: figures depend on the machine.

    .venv/bin/python bench/bench_train.py                 # 224 px, batch 16, 2 threads
    .venv/bin/python bench/bench_train.py --size 160 --rounds 5
    .venv/bin/python bench/bench_train.py --bf16          # also bf16 autocast + channels_last
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch import nn

from model_export.resnet import ResNet50, apply_freeze, set_train_mode


def step_fn(model: ResNet50, freeze: str, inputs: torch.Tensor, from_layer3: bool, bf16: bool = False):
    apply_freeze(model, freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    targets = torch.zeros(len(inputs), dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:  # the paths share one model: set its freeze state each time
        apply_freeze(model, freeze)
        set_train_mode(model, freeze)
        with autocast(bf16):
            logits = model.forward_from_layer3(inputs)[0] if from_layer3 else model(inputs)[0]
        optimizer.zero_grad(set_to_none=True)
        loss_fn(logits, targets).backward()
        optimizer.step()

    return step


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def make_paths(model: ResNet50, images: torch.Tensor, bf16: bool) -> dict:
    """The four paths on one model; with bf16, in bfloat16 autocast on channels_last tensors."""
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(bf16):  # not inference_mode: the cached path trains on this tensor
        layer3 = model.eval().stem_to_layer3(images)

    def cache_forward() -> None:
        with torch.inference_mode(), autocast(bf16):
            model.eval().stem_to_layer3(images)

    return {
        "full": step_fn(model, "none", images, False, bf16),
        "frozen": step_fn(model, "layer4", images, False, bf16),
        "cache": cache_forward,
        "cached": step_fn(model, "layer4", layer3, True, bf16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=4829, help="training images for the epoch estimate")
    parser.add_argument("--bf16", action="store_true", help="also measure bf16 autocast + channels_last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet50(4)
    images = torch.randn(args.batch, 3, args.size, args.size)
    paths = make_paths(model, images, bf16=False)
    if args.bf16:  # a copy, so the float32 paths keep their own weights and memory format
        paths |= {f"{name}+bf16": fn for name, fn in make_paths(copy.deepcopy(model), images, bf16=True).items()}
    for fn in paths.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            rates[name].append(args.batch / (time.perf_counter() - start))
    med = {name: statistics.median(values) for name, values in rates.items()}
    print(f"size {args.size}, batch {args.batch}, {args.threads} threads, median of {args.rounds} rounds")
    for name, rate in med.items():
        print(f"  {name:12s} {rate:6.1f} img/s")
    print(f"  cached/frozen {med['cached'] / med['frozen']:.2f}x, cached/full {med['cached'] / med['full']:.2f}x")
    print(f"  fast path for {args.images} images: cache {args.images / med['cache'] / 60:.1f} min per view, "
          f"then {args.images / med['cached'] / 60:.1f} min per epoch "
          f"(vs {args.images / med['frozen'] / 60:.1f} min per epoch without the cache)")
    if args.bf16:
        print("  bf16/fp32: " + ", ".join(f"{name} {med[name + '+bf16'] / med[name]:.2f}x"
                                         for name in ("full", "frozen", "cache", "cached")))


if __name__ == "__main__":
    main()
