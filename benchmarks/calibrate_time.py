"""How long ``calibrate_`` takes on a 25M-parameter model: ResNet-50 (25.6M parameters) at
224x224, converted to DeepShift-Q (4 bits, per-layer windows), on this machine's threads.

The weights are the untrained zoo model's (no pretrained ResNet-50 ships offline); the time does
not depend on their values: every step's cost is set by the shapes. Prints the CPU, the threads
and the seconds, split into the capture passes and the adaptive-rounding steps.

    python benchmarks/calibrate_time.py --images 16 --iters 300
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import deepshift
from deepshift.backends.cpu.machine import cpu_model
from deepshift.core import calibrate as calibrate_module
from deepshift.models.imagenet import resnet50


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="calibration images (default 16)")
    p.add_argument("--iters", type=int, default=300, help="adaptive-rounding steps per layer (default 300)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    reference = resnet50().eval()
    model = deepshift.convert_(copy.deepcopy(reference), deepshift.QConfig(weight_bits=4, max_shift="auto"))
    batches = list(torch.randn(args.images, 3, 224, 224).split(16))
    spent = {"capture": 0.0, "adaptive rounding": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    calibrate_module._capture = timed("capture", calibrate_module._capture)
    calibrate_module._adaptive_round = timed("adaptive rounding", calibrate_module._adaptive_round)
    params = sum(q.numel() for q in reference.parameters())
    t0 = time.perf_counter()
    deepshift.calibrate_(model, batches, reference=reference, iters=args.iters, max_samples=args.images,
                         progress=False)
    total = time.perf_counter() - t0
    print(f"ResNet-50 ({params / 1e6:.1f}M parameters), {args.images} images 224x224, {args.iters} steps per "
          f"layer; {cpu_model()}, {torch.get_num_threads()} threads")
    print(f"calibrate_: {total:.1f} s ({total / 60:.1f} min); "
          + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
