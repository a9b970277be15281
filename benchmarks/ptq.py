"""Post-training conversion without training: float vs plain conversion vs ``calibrate_``.

For a float run folder (``deepshift train --method none``), converts its model to Q and PS at
each bit width with ``max_shift="auto"``, then calibrates a copy on ``--calib-size`` training
images (disjoint from the validation and test splits), and prints a Markdown table of top-1 on
``--split`` (choose settings on ``val``; report ``test``).

    python benchmarks/ptq.py RUN --split test --bits 5 4 3 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import deepshift
from deepshift.cli.commands import load_source
from deepshift.training.data.datasets import load_dataset
from deepshift.training.data.loader import BatchLoader
from deepshift.training.evaluate import evaluate


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="float run folder or checkpoint")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--bits", type=int, nargs="+", default=[5, 4, 3, 2])
    p.add_argument("--methods", nargs="+", default=["q", "ps"], choices=["q", "ps"])
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--no-batchnorm", action="store_true", help="keep the BatchNorm variances")
    p.add_argument("--out", help="also write the table, with this command, to a Markdown file")
    args = p.parse_args(argv)
    model, info = load_source(args.run)
    if deepshift.shift_layers(model):
        p.error(f"{args.run} is not a float run")
    splits = load_dataset(info["data"])
    loader = BatchLoader(getattr(splits, args.split), 256, train=False)
    # As `deepshift calibrate` picks them: a fixed random sample of the training split.
    picked = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[: args.calib_size]
    calib = [splits.train.get_batch(picked[i:i + 64], train=False)[0] for i in range(0, len(picked), 64)]
    float_top1 = evaluate(model, loader)["top1"]
    header = (f"{info['model']} on {info['data']} ({args.split} top-1), calibrated on {args.calib_size} "
              f"training images, {args.iters} adaptive-rounding steps per layer; {cpu_model()}, "
              f"{torch.get_num_threads()} threads")
    print(f"# {header}", file=sys.stderr)
    rows = ["| model | method | bits | float | converted | calibrated | calibrate seconds |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for method in args.methods:
        for bits in args.bits:
            cfg_cls = deepshift.QConfig if method == "q" else deepshift.PSConfig
            cfg = cfg_cls(weight_bits=bits, max_shift="auto")
            converted = deepshift.convert_(copy.deepcopy(model), cfg).eval()
            plain = evaluate(converted, loader)["top1"]
            t0 = time.perf_counter()
            deepshift.calibrate_(converted, calib, reference=model, iters=args.iters,
                                 max_samples=args.calib_size, batchnorm=not args.no_batchnorm, progress=False)
            seconds = time.perf_counter() - t0
            calibrated = evaluate(converted.eval(), loader)["top1"]
            rows.append(f"| {info['model']} | {method.upper()} | {bits} | {float_top1:.2f} | {plain:.2f} | "
                        f"{calibrated:.2f} | {seconds:.1f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    if args.out:
        command = "python benchmarks/ptq.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = (f"# Post-training conversion: float vs converted vs calibrated\n\n"
                f"Produced by `{command}`.\n\n{header}. No training; the calibration images come "
                f"from the training split, disjoint from the test split.\n\n" + "\n".join(rows) + "\n")
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
