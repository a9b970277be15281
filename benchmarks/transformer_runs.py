"""The transformer table: float vs Q vs PS runs, and their frozen models checked on the whole test split.

For each run folder (``deepshift train`` output of ``vit`` or ``char-transformer``) it prints the test
metric of the run (top-1 for the ViT, perplexity per byte for the language model; best checkpoint
chosen on validation), and for converted runs the frozen model (packed codes, integer layers, the
default 8.8 fixed-point activations for layers trained without ``--act-bits``) evaluated on the
whole test split, plus whether its float64 outputs equal, bit for bit, the float64 simulation of
the converted model with the same activation rounding (each shift layer's input and bias rounded
to the fixed point ``freeze_`` uses).

    .venv/bin/python benchmarks/transformer_runs.py runs/vit-float runs/vit-q5 ... [--out FILE.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

import deepshift
from deepshift.backends.cpu.machine import describe
from deepshift.core.quantize import fixed_point
from deepshift.training.data.datasets import load_dataset
from deepshift.training.data.loader import BatchLoader
from deepshift.training.evaluate import flat_predictions


def with_act_rounding(converted: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``converted`` whose shift layers trained without act_bits round their input
    and bias to freeze_'s default fixed point, as the frozen layers do."""
    sim = copy.deepcopy(converted).double().eval()
    for _, layer, cfg in deepshift.shift_layers(sim):
        if cfg.act_bits is None:
            bits = deepshift.DEFAULT_ACT_BITS
            layer.register_forward_pre_hook(lambda m, a, bits=bits: (fixed_point(a[0], bits), *a[1:]))
            if layer.bias is not None:
                layer.bias.data = fixed_point(layer.bias.data, bits)
    return sim


@torch.no_grad()
def check_frozen(run: Path, batch_size: int = 64) -> dict:
    from deepshift.cli.commands import load_source

    model, info = load_source(run)
    cfg = info["config"]
    splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size)
    frozen = deepshift.freeze_(copy.deepcopy(model).eval())
    frozen64, sim64 = copy.deepcopy(frozen).double(), with_act_rounding(model)
    loss = correct = n = differing = 0
    for x, y in BatchLoader(splits.test, batch_size, train=False):
        logits, yy = flat_predictions(frozen(x), y)
        loss += float(torch.nn.functional.cross_entropy(logits, yy, reduction="sum"))
        correct += int((logits.argmax(1) == yy).sum())
        n += len(yy)
        xd = x.double() if x.is_floating_point() else x
        differing += int((frozen64(xd) != sim64(xd)).sum())
    return {"top1": 100.0 * correct / n, "perplexity": math.exp(loss / n), "outputs_differing": differing,
            "positions": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args()
    lines = [describe(), "",
             "| run | model | method | bits | start | test (run) | test (frozen) | "
             "frozen = simulated (float64) |", "|---|---|---|---:|---|---:|---:|---|"]
    for run in args.runs:
        m = json.loads((run / "metrics.json").read_text())
        cfg = json.loads((run / "config.json").read_text())["train"]
        language = "test_perplexity" in m
        metric = (lambda d: f"{d['perplexity']:.3f} ppl") if language else (lambda d: f"{d['top1']:.2f}%")
        own = metric({"perplexity": m.get("test_perplexity"), "top1": m["test_top1"]})
        frozen, exact = "-", "-"
        if cfg["method"] != "none":
            f = check_frozen(run)
            frozen = metric(f)
            exact = ("yes, every output" if f["outputs_differing"] == 0
                     else f"no: {f['outputs_differing']} outputs differ")
        start = "float" if cfg["from_checkpoint"] else "scratch"
        bits = "-" if cfg["method"] == "none" else cfg["weight_bits"]
        lines.append(f"| {run.name} | {cfg['model']} | {cfg['method']} | {bits} | {start} | {own} | "
                     f"{frozen} | {exact} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
