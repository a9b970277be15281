"""Generation speed of the byte-level language model: float vs frozen (packed codes, integer layers).

Batch 1, one token per step with the key/value cache (``CharTransformer.generate``), greedy decoding
of ``--tokens`` tokens after a fixed prompt. Float and frozen alternate, ``--reps`` times each after
one warm-up, in one process; the table gives median tokens per second and frozen / float.

Rows: the trained run given on the command line (its float checkpoint's architecture converted to
5-bit Q, or a converted run as it is), and wider models of the same architecture with random weights
(the speed of a forward does not depend on the weights' values), where weight bytes rather than
per-layer call overhead set the time.

    .venv/bin/python benchmarks/generate.py runs/lm-q5 [--tokens 200] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import deepshift
from deepshift.backends.cpu.machine import describe
from deepshift.models import build_model


def tokens_per_second(model: torch.nn.Module, tokens: int) -> float:
    prompt = torch.tensor(list(b"The "), dtype=torch.int64)
    start = time.perf_counter()
    model.generate(prompt, tokens, temperature=0)
    return tokens / (time.perf_counter() - start)


def compare(float_model: torch.nn.Module, frozen: torch.nn.Module, tokens: int,
            reps: int) -> tuple[float, float]:
    runs: dict[str, list[float]] = {"float": [], "frozen": []}
    with torch.no_grad():
        for model in (float_model, frozen):
            tokens_per_second(model, tokens // 4)  # warm-up: caches, prepared kernels
        for _ in range(reps):
            runs["float"].append(tokens_per_second(float_model, tokens))
            runs["frozen"].append(tokens_per_second(frozen, tokens))
    return statistics.median(runs["float"]), statistics.median(runs["frozen"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", nargs="?", help="a char-transformer run folder or checkpoint (float or converted)")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    cases = []
    if args.run:
        from deepshift.cli.commands import load_source

        model, info = load_source(args.run)
        if deepshift.shift_layers(model):
            # Speed does not depend on weight values: the float side is the same architecture.
            spec = info["zoo_spec"]
            float_model, converted = build_model(spec["name"], **spec["kwargs"]), model
        else:
            float_model = model
            converted = deepshift.convert_(copy.deepcopy(model), deepshift.QConfig(weight_bits=args.bits))
        size = sum(p.numel() for p in float_model.parameters()) / 1e6
        cases.append((f"{args.run} ({size:.2f}M parameters)", float_model, converted))
    for dim, depth in ((512, 8), (1024, 8)):
        torch.manual_seed(0)
        m = build_model("char-transformer", dim=dim, depth=depth, heads=8, mlp_dim=4 * dim)
        size = sum(p.numel() for p in m.parameters()) / 1e6
        cases.append((f"dim {dim}, depth {depth}, random weights ({size:.1f}M parameters)", m,
                      deepshift.convert_(copy.deepcopy(m), deepshift.QConfig(weight_bits=args.bits))))
    print(f"batch 1, {args.tokens} tokens per run, greedy, key/value cache; median of {args.reps}")
    print(f"| model | float tokens/s | frozen {args.bits}-bit tokens/s | frozen / float |")
    print("|---|---:|---:|---:|")
    for label, float_model, converted in cases:
        frozen = deepshift.freeze_(copy.deepcopy(converted).eval())
        f, z = compare(float_model.eval(), frozen, args.tokens, args.reps)
        print(f"| {label} | {f:.1f} | {z:.1f} | {z / f:.2f} |", flush=True)


if __name__ == "__main__":
    main()
