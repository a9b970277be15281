"""Generation speed of the byte-level language model: float vs frozen (packed codes, integer layers).

Batch 1, one token per step with the key/value cache (``CharTransformer.generate``), greedy decoding
of ``--tokens`` tokens after a fixed prompt. The float model runs its modules (torch eager, as a user
runs it); the frozen one both ways: its modules (``generate(native=False)``) and its one-call native
step (the default; the same tokens, ``deepshift.frozen.decoder``). The three alternate, ``--reps``
times each after one warm-up, in one process; the table gives median tokens per second.

Rows: the zoo's default architecture (0.88M parameters), the trained run given on the command line
if any (its float checkpoint's architecture converted to 5-bit Q, or a converted run as it is), and
wider models of the same architecture, all but the run with random weights (the speed of a forward
does not depend on the weights' values), where weight bytes rather than per-layer call overhead set
the time.

    .venv/bin/python benchmarks/generate.py [runs/lm-q5] [--tokens 200] [--reps 5] [--threads 2]
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


def tokens_per_second(model: torch.nn.Module, tokens: int, native: bool = True) -> float:
    prompt = torch.tensor(list(b"The "), dtype=torch.int64)
    start = time.perf_counter()
    model.generate(prompt, tokens, temperature=0, native=native)
    return tokens / (time.perf_counter() - start)


def compare(float_model: torch.nn.Module, frozen: torch.nn.Module, tokens: int,
            reps: int) -> dict[str, float]:
    """Median tokens per second of the float model, the frozen one's modules and its native step."""
    runs = {"float": (float_model, True), "modules": (frozen, False), "native": (frozen, True)}
    times: dict[str, list[float]] = {key: [] for key in runs}
    with torch.no_grad():
        for model, native in runs.values():
            tokens_per_second(model, tokens // 4, native)  # warm-up: caches, prepared kernels
        for _ in range(reps):
            for key, (model, native) in runs.items():
                times[key].append(tokens_per_second(model, tokens, native))
    return {key: statistics.median(t) for key, t in times.items()}


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
    torch.manual_seed(0)
    m = build_model("char-transformer")
    size = sum(p.numel() for p in m.parameters()) / 1e6
    cases = [(f"char-transformer (zoo default), random weights ({size:.2f}M parameters)", m,
              deepshift.convert_(copy.deepcopy(m), deepshift.QConfig(weight_bits=args.bits)))]
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
    print(f"| model | float tokens/s | frozen {args.bits}-bit, modules | frozen, native step | "
          "modules / float | native / float |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, float_model, converted in cases:
        frozen = deepshift.freeze_(copy.deepcopy(converted).eval())
        r = compare(float_model.eval(), frozen, args.tokens, args.reps)
        print(f"| {label} | {r['float']:.1f} | {r['modules']:.1f} | {r['native']:.1f} | "
              f"{r['modules'] / r['float']:.2f} | {r['native'] / r['float']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
