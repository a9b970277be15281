"""Integer-only models against the same models frozen with float BatchNorm: accuracy and speed.

For each converted run folder (``deepshift train`` / ``deepshift calibrate`` output) it freezes the
model (float glue between the shift layers: the float-BN frozen model), makes its integer-only form
(:func:`deepshift.integer_only`) with 1, 2 and 3 signed powers of two per BatchNorm scale, and
prints the test top-1 of each on the run's whole test split, and the float multiplies / adds per
image outside the shift layers (deepshift.savings_report). With ``--seconds`` it also times, side
by side in one run (medians after warm-up), the integer-only model against the float-BN frozen
model as deployed (fused: BatchNorm, residual and ReLU inside the conv's native call), batch 1 and
128. With ``--finetune-steps N`` it also fine-tunes a copy of each run with BatchNorm for each
number of terms (:func:`deepshift.finetune_batchnorm_`, as ``deepshift finetune-bn`` does: N steps
on the run's training split, Adam at ``--finetune-lr``) and adds the fine-tuned integer-only
models' top-1.

    .venv/bin/python benchmarks/integer.py runs/r20-q5 runs/r20-q3 [--finetune-steps 1000] [--seconds 2]
        [--out results/integer.md]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

import deepshift
import deepshift.frozen.integer
from deepshift.backends.cpu.machine import describe
from deepshift.training.data.datasets import load_dataset
from deepshift.training.data.loader import BatchLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import measure  # noqa: E402  (the side-by-side timer of the kernel benchmarks)

TERMS = (1, 2, 3)


@torch.no_grad()
def top1(model, loader) -> float:
    correct = n = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        n += len(y)
    return 100.0 * correct / n


def main(argv: list[str] | None = None) -> int:
    from deepshift.cli.commands import load_source

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="evaluate on the run's validation split (to choose settings) or its test split")
    p.add_argument("--terms", type=int, nargs="+", default=list(TERMS),
                   help="signed powers of two per BatchNorm scale to compare (default 1 2 3)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="also the integer-only models after a BatchNorm-aware fine-tune of this many steps")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="its learning rate (default 0.0001)")
    p.add_argument("--seconds", type=float, default=0.0, help="time each model this long per batch size")
    p.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    terms = args.terms
    default = deepshift.frozen.integer.DEFAULT_SCALE_TERMS
    tuned = terms if args.finetune_steps > 0 else []
    acc_rows = [f"| run | model | method | bits | {args.split} top-1: frozen, float BN | "
                + " | ".join(f"integer-only, {k} term{'s' * (k > 1)}" for k in terms)
                + "".join(f" | fine-tuned, integer-only, {k} term{'s' * (k > 1)}" for k in tuned)
                + " | float mults / adds per image outside shift layers (frozen -> integer-only) |",
                "|---|---|---|---:|---:|" + "---:|" * (len(terms) + len(tuned)) + "---|"]
    time_rows = ["| run | batch | fused frozen, float BN (ms) | integer-only, default terms (ms) | "
                 "integer-only / frozen |",
                 "|---|---:|---:|---:|---:|"]
    for run in args.runs:
        model, info = load_source(run)
        cfg = info["config"]
        splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size)
        loader = list(BatchLoader(getattr(splits, args.split), 256, train=False))
        frozen = deepshift.freeze_(copy.deepcopy(model).eval())
        example = loader[0][0][:8]
        integer = {k: deepshift.integer_only(frozen, example, scale_terms=k) for k in {*terms, default}}
        shape = tuple(example.shape[1:])
        before = deepshift.savings_report(frozen, shape)
        after = deepshift.savings_report(integer[default], shape)
        scores = [f"{top1(m, loader):.2f}" for m in [frozen, *(integer[k] for k in terms)]]
        has_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        for k in tuned:
            if not has_norm:
                scores.append("no BatchNorm")
                continue
            torch.manual_seed(cfg.seed)
            tuned_model = copy.deepcopy(model)
            batches = BatchLoader(splits.train, cfg.batch_size or 64, train=True, seed=cfg.seed)
            deepshift.finetune_batchnorm_(tuned_model, batches, k, steps=args.finetune_steps,
                                          lr=args.finetune_lr)
            tuned_frozen = deepshift.freeze_(tuned_model.eval())
            scores.append(f"{top1(deepshift.integer_only(tuned_frozen, example, scale_terms=k), loader):.2f}")
        acc_rows.append(
            f"| {run.name} | {cfg.model} | {cfg.method} | {cfg.weight_bits} | "
            + " | ".join(scores)
            + f" | {before.float_mults_outside:,} / {before.float_adds_outside:,} -> "
              f"{after.float_mults_outside:,} / {after.float_adds_outside:,} |")
        print(acc_rows[-1], flush=True)
        if args.seconds > 0:
            fused = deepshift.fuse_frozen(frozen)
            for batch in (1, 128):
                x = torch.cat([b for b, _ in loader])[:batch]
                with torch.no_grad():
                    t = measure({"fused": lambda x=x, f=fused: f(x),
                                 "integer": lambda x=x, m=integer[default]: m(x)}, args.seconds)
                time_rows.append(f"| {run.name} | {batch} | {1e3 * t['fused'][0]:.2f} | "
                                 f"{1e3 * t['integer'][0]:.2f} | {t['integer'][0] / t['fused'][0]:.2f} |")
                print(time_rows[-1], flush=True)
    text = "\n".join([describe(), "", *acc_rows, ""] + (["", *time_rows, ""] if args.seconds > 0 else []))
    print(text)
    if args.out:
        command = "python benchmarks/integer.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(
            "# Integer-only models vs the same models frozen with float BatchNorm\n\n"
            "Each run is frozen (`deepshift.freeze_`: packed codes, integer shift layers, float between "
            "them) and made integer-only (`deepshift.integer_only`: integers from the input's rounding to "
            "the logits, each BatchNorm scale a sum of 1, 2 or 3 signed powers of two); both are evaluated "
            f"on the run's whole {args.split} split. Timings: the integer-only model with the default "
            f"number of terms ({default}) against the float-BN frozen model as deployed (fuse_frozen), "
            "side by side in one run, medians after warm-up.\n\n"
            f"Produced by `{command}`.\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
