"""Training-step and eval-forward time of DeepShift-Q / -PS against float, CIFAR ResNet-20.

Measures, in one process and in alternating order (so drift in machine load hits every variant alike):
  * a training step: zero_grad, forward, cross-entropy, backward, SGD step (+ clamp_parameters_);
  * an eval forward under torch.no_grad() as inside an evaluation loop: the model stays in eval
    mode, so shift layers reuse their rounded weights after the first batch (``eval``);
  * the first eval forward after a training step, which also rounds every weight (``eval 1st``),
at batch 128 for float, Q (5-bit) and PS (5-bit), each without activation rounding and with
act_bits (16, 16). Prints medians and the ratios Q/float and PS/float (target <= 1.05).

The row "float + copy" is the float model with one plain copy (``clone``) of every input of the layers
that the shift variants convert: the least any out-of-place activation rounding can cost in eager
PyTorch, where each layer sees only its own input and may not modify it (forward passes are pure, and
in a ResNet block the first conv's input is also the shortcut). The act 16.16 rows are to be read
against it.

    .venv/bin/python benchmarks/train_step.py [--reps 15] [--threads 2] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import deepshift
from deepshift.backends.cpu.machine import describe
from deepshift.models import build_model


def copy_inputs_(model: torch.nn.Module) -> torch.nn.Module:
    """Make every conv / linear layer of ``model`` work on a fresh copy of its input (the floor row)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_pre_hook(lambda _mod, args: (args[0].clone(), *args[1:]))
    return model


def make_variants() -> dict[str, torch.nn.Module]:
    variants = {}
    for label, cfg in (("float", None),
                       ("float + copy", "copy"),
                       ("Q", deepshift.QConfig(weight_bits=5)),
                       ("PS", deepshift.PSConfig(weight_bits=5)),
                       ("Q act16.16", deepshift.QConfig(weight_bits=5, act_bits=(16, 16))),
                       ("PS act16.16", deepshift.PSConfig(weight_bits=5, act_bits=(16, 16)))):
        torch.manual_seed(0)  # the same initial float weights for every variant
        model = build_model("resnet20")
        if cfg == "copy":
            copy_inputs_(model)
        elif cfg is not None:
            deepshift.convert_(model, cfg)
        variants[label] = model
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per variant (default 15)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    variants = make_variants()
    optims = {k: torch.optim.SGD(deepshift.param_groups(m, lr=0.1, weight_decay=1e-4), lr=0.1, momentum=0.9)
              for k, m in variants.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def train_step(name: str) -> float:
        model, opt = variants[name], optims[name]
        model.train()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        deepshift.clamp_parameters_(model)
        return time.perf_counter() - t0

    @torch.no_grad()
    def eval_forward(name: str) -> float:
        model = variants[name]
        model.eval()  # a no-op after the first call of an evaluation phase: caches stay
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0

    names = list(variants)
    times = {(n, kind): [] for n in names for kind in ("train", "eval", "eval 1st")}

    def rotations():
        for rep in range(args.warmup + args.reps):
            # Rotate the order every repetition so no variant always runs first or last.
            yield rep >= args.warmup, names[rep % len(names):] + names[:rep % len(names)]

    for timed, order in rotations():  # training steps, each followed by the first eval forward
        for n in order:
            t_train, t_first = train_step(n), eval_forward(n)
            if timed:
                times[(n, "train")].append(t_train)
                times[(n, "eval 1st")].append(t_first)
    for timed, order in rotations():  # an evaluation loop: models stay in eval mode
        for n in order:
            t_eval = eval_forward(n)
            if timed:
                times[(n, "eval")].append(t_eval)

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"CIFAR ResNet-20, batch {args.batch}; {describe()}; median of {args.reps} (alternating order)")
    print(f"{'variant':<13}{'train ms':>10}{'eval ms':>10}{'train/float':>13}{'eval/float':>12}"
          f"{'eval 1st/float':>16}")
    for n in names:
        tr, ev, first = med[(n, "train")], med[(n, "eval")], med[(n, "eval 1st")]
        print(f"{n:<13}{tr:>10.1f}{ev:>10.1f}{tr / med[('float', 'train')]:>13.3f}"
              f"{ev / med[('float', 'eval')]:>12.3f}{first / med[('float', 'eval 1st')]:>16.3f}")


if __name__ == "__main__":
    main()
