"""The paper's accuracy experiment on real data: float vs DeepShift-Q vs DeepShift-PS.

Grid: model {mnist-fc, mnist-conv} x method {Q, PS} x weight bits {5, 4, 3, 2} x start {scratch,
from the trained float model}, plus the float baseline and the post-training row (the float model
converted with no training at all). Every run is a normal ``deepshift train`` run (its folder under
``--runs`` holds config.json, metrics.csv/json and checkpoints); the table reports test top-1 of the
checkpoint chosen on the validation split, so nothing is tuned on the test set.

    python benchmarks/accuracy.py                 # full grid -> results/accuracy.md, accuracy.png
    python benchmarks/accuracy.py --quick         # smoke check (< 10 min on 2 cores)

Runs execute ``--jobs`` at a time in separate processes, each with cores/jobs threads. A finished
run (metrics.json present, same settings) is reused and the log and table say so; an interrupted
one is resumed from its last epoch (exactly); ``--fresh`` retrains everything.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BITS = (5, 4, 3, 2)
MODELS = ("mnist-fc", "mnist-conv")
# Every run takes the library's default recipe for its dataset, method and start (see
# deepshift.training.config.RECIPES, PS_RECIPE, RECIPES_FROM_PRETRAINED): no tuning flag is passed, only the
# epoch budget, so each cell is what `deepshift train --method M --weight-bits B` gives a user.
# Options that do not change a run of the given method (ignored when deciding whether a finished
# run can be reused).
_UNUSED = {"none": ("lr_shift", "lr_sign", "freeze_sign", "weight_bits", "rounding", "shift_depth",
                    "max_shift"),
           "q": ("lr_shift", "lr_sign", "freeze_sign"), "ps": ()}


@dataclass
class Run:
    name: str
    options: dict
    needs: list[str] = field(default_factory=list)


def plan(models, bits, epochs, finetune_epochs, runs_dir: Path, common: dict) -> list[Run]:
    runs = []
    for model in models:
        base = {**common, "model": model}
        float_name = f"{model}/float"
        scratch = {"epochs": epochs} if epochs else {}
        finetune = {"epochs": finetune_epochs} if finetune_epochs else {}
        runs.append(Run(float_name, {**base, "method": "none", **scratch}))
        for b in bits:
            for method in ("q", "ps"):
                runs.append(Run(f"{model}/{method}{b}-scratch",
                                {**base, "method": method, "weight_bits": b, **scratch}))
                runs.append(Run(f"{model}/{method}{b}-float",
                                {**base, "method": method, "weight_bits": b, **finetune,
                                 "from_checkpoint": str(runs_dir / float_name / "best.pt")},
                                needs=[float_name]))
    return runs


def _execute(name: str, options: dict, out: str, threads: int, fresh: bool) -> dict:
    import torch

    from deepshift.training.config import TrainConfig
    from deepshift.training.loop import resume, train

    torch.set_num_threads(threads)
    cfg = TrainConfig(**options, out=out, quiet=True, overwrite=True)
    folder = Path(out)
    same = False
    if not fresh and (folder / "config.json").is_file():
        saved = json.loads((folder / "config.json").read_text())["train"]
        same = _relevant(saved) == _relevant(cfg.resolved().to_dict())
    if same and (folder / "metrics.json").is_file():
        return {**json.loads((folder / "metrics.json").read_text()), "reused": True}
    t0 = time.perf_counter()
    if same and (folder / "last.pt").is_file():
        metrics = resume(folder, quiet=True)  # an interrupted run continues exactly where it stopped
    else:
        metrics = train(cfg)
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics


def _relevant(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _UNUSED[config["method"]]}


def post_training(models, bits, runs_dir: Path, common: dict) -> dict:
    """Test/val top-1 of each float model converted at each bit width with no training at all.

    Q and PS convert a float weight identically (round log2|w| to the nearest allowed shift), so
    there is one post-training number per bit width; the window is the default, placed per layer
    (``max_shift="auto"``).
    """
    from deepshift import QConfig, convert_
    from deepshift.training.checkpoint import load_checkpoint
    from deepshift.training.config import DEFAULT_MAX_SHIFT, build_run_model
    from deepshift.training.data.datasets import load_dataset
    from deepshift.training.data.loader import BatchLoader
    from deepshift.training.evaluate import evaluate

    splits = load_dataset(common["data"], common.get("data_dir"), 0.1, common.get("limit_train"))
    val_loader = BatchLoader(splits.val, 64, train=False)
    test_loader = BatchLoader(splits.test, 64, train=False)
    out = {}
    for model in models:
        ckpt = load_checkpoint(runs_dir / model / "float" / "best.pt")
        for b in bits:
            net = build_run_model(model, splits.num_classes, splits.in_channels, None, None)
            net.load_state_dict(ckpt["model"])
            convert_(net, QConfig(weight_bits=b, max_shift=DEFAULT_MAX_SHIFT))
            out[(model, b)] = {"val_top1": evaluate(net, val_loader)["top1"],
                               "test_top1": evaluate(net, test_loader)["top1"]}
    return out


def run_grid(runs: list[Run], runs_dir: Path, jobs: int, fresh: bool) -> dict[str, dict]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results: dict[str, dict] = {}
    pending = list(runs)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        running = {}
        while pending or running:
            for run in list(pending):
                if len(running) >= jobs:
                    break
                if all(n in results for n in run.needs):
                    pending.remove(run)
                    out = str(runs_dir / run.name)
                    fut = pool.submit(_execute, run.name, run.options, out, threads, fresh)
                    running[fut] = run
            if not running:
                raise RuntimeError("unsatisfiable run dependencies")
            done = next(iter(_wait_first(running)))
            run = running.pop(done)
            results[run.name] = done.result()
            m = results[run.name]
            note = " (reused)" if m.get("reused") else f" in {m['wall_seconds']:.0f} s"
            print(f"{run.name:<24} test top-1 {m['test_top1']:6.2f}  val {m['val_top1']:6.2f}{note}",
                  flush=True)
    return results


def _wait_first(running):
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(running, return_when=FIRST_COMPLETED)
    return done


def _trained_rows(model: str):
    """(run name prefix, method label, start label) of each trained row of ``model``, in table order."""
    for method, label in (("q", "Q"), ("ps", "PS")):
        for start, start_label in (("scratch", "scratch"), ("float", "from float")):
            yield f"{model}/{method}{{b}}-{start}", label, start_label


def recipe_note(runs: list[Run]) -> str:
    """The resolved recipe (epochs and optimiser settings) of one run per method and start."""
    from deepshift.training.config import TrainConfig

    keys = ("epochs", "optimizer", "lr", "lr_shift", "lr_sign", "lr_schedule", "batch_size", "max_shift")
    seen, parts = set(), []
    for run in runs:
        start = "from float" if "from_checkpoint" in run.options else "scratch"
        label = {"none": "float", "q": "Q", "ps": "PS"}[run.options["method"]]
        if (label, start) in seen:
            continue
        seen.add((label, start))
        cfg = TrainConfig(**run.options).resolved().to_dict()
        parts.append(f"{label} {start}: " + ", ".join(f"{k} {cfg[k]}" for k in keys
                                                       if cfg[k] is not None and not (
                                                           label == "float" and k == "max_shift")))
    return "; ".join(parts)


def previous_table(path: Path) -> dict[tuple[str, str, str], list[str]]:
    """The test top-1 cells of an earlier accuracy.md, keyed by (model, method, start)."""
    cells = {}
    for line in path.read_text().split("Difference to float")[0].splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) > 3 and parts[0] not in ("model", "") and not parts[0].startswith("---"):
            cells[(parts[0], parts[1], parts[2])] = parts[3:]
    return cells


def write_table(path: Path, results, post, models, bits, header: str, previous: Path | None = None) -> None:
    head = ["| model | method | start | " + " | ".join(f"{b}-bit" for b in bits) + " |",
            "|---|---|---|" + "---:|" * len(bits)]

    def row(model, label, start, cells, fmt):
        return f"| {model} | {label} | {start} | " + " | ".join(format(c, fmt) for c in cells) + " |"

    table, diff = list(head), list(head)
    for model in models:
        f = results[f"{model}/float"]["test_top1"]
        table.append(row(model, "float", "scratch", [f] * len(bits), ".2f"))
        table.append(row(model, "Q = PS", "post-training (no training)",
                         [post[(model, b)]["test_top1"] for b in bits], ".2f"))
        for name, label, start in _trained_rows(model):
            cells = [results[name.format(b=b)]["test_top1"] for b in bits]
            table.append(row(model, label, start, cells, ".2f"))
            diff.append(row(model, label, start, [c - f for c in cells], "+.2f"))
    lines = [header, "", "Test top-1 (%) of the checkpoint with the best validation top-1. "
             "Float is the same at every bit width.", "", *table,
             "", "Difference to float (points, test top-1):", "", *diff]
    if previous is not None and previous.is_file():
        old = previous_table(previous)
        lines += ["", f"Beside the previous grid (`{previous.name}`; each cell: previous -> now, "
                  "test top-1):", "", *head]
        for line in table[2:]:
            parts = [p.strip() for p in line.strip().strip("|").split("|")]
            key = (parts[0], parts[1], parts[2])
            if key in old:
                cells = [f"{a} -> {b}" for a, b in zip(old[key], parts[3:], strict=False)]
                lines.append(f"| {' | '.join(parts[:3])} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per run (training + validation each epoch + one test pass):", "",
             "| run | epochs | best epoch | val top-1 | test top-1 | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['epochs']} | {m['best_epoch']} | {m['val_top1']:.2f} | "
                     f"{m['test_top1']:.2f} | {m['seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, results, post, models, bits) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        f = results[f"{model}/float"]["test_top1"]
        ax.axhline(f, color="black", linestyle="--", label=f"float ({f:.2f})")
        ax.plot(bits, [post[(model, b)]["test_top1"] for b in bits], "x:", color="gray",
                label="post-training")
        trained = []
        for name, label, start in _trained_rows(model):
            cells = [results[name.format(b=b)]["test_top1"] for b in bits]
            trained += cells
            ax.plot(bits, cells, "o-" if start == "scratch" else "s--",
                    color="tab:blue" if label == "Q" else "tab:orange", label=f"{label} {start}")
        ax.set_xticks(list(bits))
        ax.invert_xaxis()
        ax.set_xlabel("weight bits")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(model)
        post_cells = [post[(model, b)]["test_top1"] for b in bits]
        ax.set_ylim(max(min(f - 5, min(trained + post_cells) - 1), 0), min(f + 2, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--bits", nargs="+", type=int, help="weight bits (default 5 4 3 2; --quick: 5 2)")
    p.add_argument("--epochs", type=int,
                   help="epochs from scratch, float, Q and PS alike (default: the recipe's; 10 on MNIST)")
    p.add_argument("--finetune-epochs", type=int,
                   help="epochs from the float model (default: the recipe's, 3 for MNIST-like data)")
    p.add_argument("--limit-train", type=int, help="use only this many training examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (threads = cores / jobs)")
    p.add_argument("--runs", default="runs/accuracy", help="folder for the run folders")
    p.add_argument("--results", default="results", help="folder for accuracy.md and accuracy.png")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: by default bits 5 and 2, 1 epoch each, 6,000 training images; "
                        "writes accuracy-quick.md/png")
    p.add_argument("--fresh", action="store_true", help="retrain runs even when a finished one exists")
    p.add_argument("--previous",
                   help="an earlier accuracy.md whose test top-1 table is shown beside the new one")
    args = p.parse_args(argv)
    stem = "accuracy"
    if args.quick:
        args.bits, args.epochs = args.bits or [5, 2], args.epochs or 1
        args.finetune_epochs, args.limit_train = args.finetune_epochs or 1, args.limit_train or 6000
        args.runs = args.runs + "-quick"
        stem = "accuracy-quick"
    args.bits = args.bits or list(BITS)
    if args.data == "fashion-mnist" and args.data_dir is None:
        from deepshift.training.data.datasets import FASHION_MNIST_DEBIAN_DIR

        if not Path(FASHION_MNIST_DEBIAN_DIR).is_dir():
            print(f"accuracy.py: Fashion-MNIST not found at {FASHION_MNIST_DEBIAN_DIR}; install Debian's "
                  "dataset-fashion-mnist or pass --data-dir", file=sys.stderr)
            return 2
    common = {"data": args.data, "data_dir": args.data_dir, "seed": args.seed,
              "limit_train": args.limit_train}
    runs_dir = Path(args.runs)
    t0 = time.perf_counter()
    runs = plan(args.models, args.bits, args.epochs, args.finetune_epochs, runs_dir, common)
    results = run_grid(runs, runs_dir, args.jobs, args.fresh)
    post = post_training(args.models, args.bits, runs_dir, common)
    wall = time.perf_counter() - t0
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    reused = sum(bool(m.get("reused")) for m in results.values())
    total = sum(m["seconds"] for m in results.values())
    reused_note = (f"; {reused} of {len(results)} runs were reused from an earlier invocation with the "
                   f"same settings; all runs together trained for {total / 60:.0f} min" if reused else "")
    cmd = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Accuracy: float vs DeepShift-Q vs DeepShift-PS on {args.data}\n\n"
              f"Produced by `{cmd.strip()}` in {wall / 60:.1f} min wall time ({args.jobs} runs at a time, "
              f"{os.cpu_count()} cores){reused_note}. Every run uses the default recipe (no tuning flag): "
              f"{recipe_note(runs)}. Seed {args.seed}; validation = 10% of the training set"
              + (f"; training limited to {args.limit_train} images" if args.limit_train else "") + ".")
    write_table(results_dir / f"{stem}.md", results, post, args.models, args.bits, header,
                previous=Path(args.previous) if args.previous else None)
    plot(results_dir / f"{stem}.png", results, post, args.models, args.bits)
    print(f"wrote {results_dir / (stem + '.md')} and {stem}.png in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
