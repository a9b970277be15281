"""The ``deepshift`` command line's arguments: ``train``, ``eval``, ``compare``, ``export`` (packed
file / ONNX) and ``report`` (operations, bytes, energy), each with its help and examples."""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on a single line (no usage dump) with exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from deepshift.training.config import METHODS, OPTIMIZERS, SCHEDULES
    from deepshift.training.data.datasets import DATASETS

    d = p.add_argument_group("data")
    d.add_argument("--data", choices=(*DATASETS, "auto"), default="digits",
                   help="dataset (default: digits, scikit-learn's bundled 8x8 digits upsampled to 28x28; "
                        "fashion-mnist reads Debian's dataset-fashion-mnist by default; auto: "
                        "fashion-mnist when that package is installed, else digits)")
    d.add_argument("--data-dir", help="folder with the dataset's files (idx files, cifar-10-batches-py, "
                                      "or an ImageNet-style train/ val/ folder)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training data held out to choose the best checkpoint (default 0.1)")
    d.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training examples")
    d.add_argument("--image-size", type=int, default=224, help="crop size for imagefolder (default 224)")
    d.add_argument("--workers", type=int, default=0, help="image decoding threads (imagefolder)")

    m = p.add_argument_group("model and shift conversion")
    m.add_argument("--model", help="zoo model (default per dataset: mnist-conv, resnet20, "
                                   "imagenet-resnet18); see `deepshift train --list-models`")
    m.add_argument("--method", choices=METHODS, default="none",
                   help="none: float; q: DeepShift-Q; ps: DeepShift-PS (default none)")
    m.add_argument("--weight-bits", type=int, default=5, help="bits per shift weight, 2..8 (default 5)")
    m.add_argument("--act-bits", type=int, nargs=2, metavar=("I", "F"),
                   help="round shift-layer inputs and bias to fixed point, I integer bits (sign included) "
                        "and F fraction bits (paper: 16 16, low-bit example 3 5); default: no rounding")
    m.add_argument("--act-rounding", choices=("nearest", "floor"), default="nearest",
                   help="fixed-point rounding of activations (original code: floor)")
    m.add_argument("--rounding", choices=("deterministic", "stochastic"), default="deterministic",
                   help="weight rounding during training (evaluation is always deterministic)")
    m.add_argument("--shift-depth", type=int, metavar="N",
                   help="convert only the last N conv/linear layers (default: all)")
    m.add_argument("--max-shift", type=_max_shift,
                   help="largest shift p_max: an int in -16..16 (0: |w| <= 1, the paper's fixed window) "
                        "or auto (default: each layer's window placed from its weights)")
    m.add_argument("--freeze-sign", action="store_true", help="PS: keep the sign parameters fixed")

    o = p.add_argument_group("optimisation (defaults: the recipe for --data, --method and --from; "
                                                "config.json records it)")
    o.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="torch.optim optimizer (default per recipe: radam for PS and on mnist-like data, "
                        "the paper's sgd for float and Q on cifar10 / imagefolder)")
    o.add_argument("--lr", type=float, help="learning rate (mnist-like 0.001, cifar10 0.1, imagenet 0.1, "
                                            "PS 0.01; with --from: mnist-like 1e-4 (PS 1e-3), cifar10 1e-3 "
                                            "(PS 1e-2))")
    o.add_argument("--lr-sign", type=float, help="PS: learning rate of the sign parameters (default 5 x lr)")
    o.add_argument("--lr-shift", type=float,
                   help="PS: learning rate of the shift parameters (default 5 x lr: they live in the log "
                        "domain, where a step of lr changes a weight by only a factor 2**lr)")
    o.add_argument("--momentum", type=float, help="SGD/RMSprop momentum (mnist-like 0, else 0.9)")
    o.add_argument("--weight-decay", type=float, help="weight decay, not applied to PS shift/sign "
                                                      "(mnist-like 0, else 1e-4)")
    o.add_argument("--lr-schedule", choices=SCHEDULES,
                   help="mnist-like: cosine; cifar10: multistep 80,120,160,180 (--from: step 5); "
                        "imagefolder: step 30")
    o.add_argument("--lr-step", type=int, help="epochs between x gamma decays for --lr-schedule step")
    o.add_argument("--lr-milestones", type=lambda s: [int(v) for v in s.split(",")], metavar="E1,E2,...",
                   help="epochs of x gamma decays for --lr-schedule multistep")
    o.add_argument("--lr-gamma", type=float, default=0.1, help="decay factor (default 0.1)")
    o.add_argument("--epochs", type=int,
                   help="epochs (mnist-like 10 (--from: 3), cifar10 200 (--from: 15), imagenet 90)")
    o.add_argument("--batch-size", type=int, help="batch size (mnist-like 64, cifar10 128, imagenet 256)")
    o.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")

    r = p.add_argument_group("run")
    r.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                   help="start from a trained float model (best.pt of a --method none run, or a "
                        "state_dict file), convert it, then fine-tune (the paper's 'from pretrained')")
    r.add_argument("--out", default="runs/deepshift", help="output folder (default runs/deepshift)")
    r.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also write last.pt every N steps within an epoch (exact mid-epoch resume)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")

    g = p.add_argument_group("distributed (under torchrun --nproc_per_node=N -m deepshift train ...)")
    g.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="process-group backend (auto: nccl on CUDA, gloo on CPU); --batch-size is the "
                        "global batch, split across the processes")
    g.add_argument("--sync-bn", action="store_true",
                   help="synchronise BatchNorm statistics across processes (SyncBatchNorm)")
    g.add_argument("--compile", dest="compile_model", action="store_true",
                   help="torch.compile the training model (after conversion and DDP wrapping)")


def _max_shift(text: str):
    """``--max-shift``: ``auto`` or an integer (range checked with the config)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``deepshift`` parser with every subcommand."""
    parser = _Parser(prog="deepshift", description="DeepShift: multiplication-less neural networks "
                     "(DeepShift-Q / DeepShift-PS). Train, evaluate and compare shift networks.")
    from deepshift._version import __version__

    parser.add_argument("--version", action="version", version=f"deepshift {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (float, Q or PS) and write an output folder",
                       description="Train with the paper's recipes. Writes --out: config.json, "
                       "metrics.csv, metrics.json, last.pt, best.pt, curves.png.",
                       epilog="examples:\n"
                       "  deepshift train --data fashion-mnist --model mnist-conv --method ps --out runs/ps\n"
                       "  deepshift train --data cifar10 --data-dir ~/cifar --model resnet20 --method q "
                       "--from runs/float/best.pt --out runs/q\n"
                       "  deepshift train --resume runs/ps",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--resume", metavar="DIR",
                   help="continue the stopped run in DIR; other options are ignored except --epochs "
                        "(extend the run), --device and --quiet")
    t.add_argument("--list-models", action="store_true", help="print the model names and exit")
    _add_train_options(t)
    t.set_defaults(command="train")

    e = sub.add_parser("eval", help="evaluate a checkpoint (or a packed file) on a test (or val) split")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                     help="best.pt or last.pt of a run, or the run folder (its best.pt)")
    src.add_argument("--packed", metavar="FILE",
                     help="a packed file from `deepshift export --format packed`: runs the frozen, "
                          "multiplication-free model (needs --data)")
    e.add_argument("--data", help="dataset for --packed (digits, mnist, fashion-mnist, cifar10, imagefolder)")
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--data-dir", help="override the data folder stored in the checkpoint")
    e.add_argument("--batch-size", type=int, help="default: the run's batch size")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(command="eval")

    _add_deploy_commands(sub)

    k = _command(sub, "calibrate", "convert a trained float model without training, calibrated on a few "
                 "hundred training images, into a run folder",
                 "SOURCE is a float run folder (its best.pt) or checkpoint. Converts its model (--method, "
                 "--weight-bits, per-layer windows) and calibrates it with deepshift.calibrate_ on "
                 "--calib-size images of the training split (never the validation or test images). Writes "
                 "--out: best.pt, config.json, metrics.json, which `eval`, `export` and `report` accept.",
                 ["deepshift calibrate runs/float --method q --weight-bits 3 --out runs/q3-ptq",
                  "deepshift eval --from runs/q3-ptq/best.pt"])
    k.add_argument("source", metavar="SOURCE")
    k.add_argument("--method", choices=("q", "ps"), default="q")
    k.add_argument("--weight-bits", type=int, default=5, help="bits per shift weight, 2..8 (default 5)")
    k.add_argument("--max-shift", default="auto",
                   help="top of the shift window: 'auto' (per layer, default) or an integer")
    k.add_argument("--act-bits", type=int, nargs=2, metavar=("I", "F"),
                   help="fixed-point activations of the shift layers (default: float)")
    k.add_argument("--calib-size", type=int, default=256,
                   help="calibration images (default 256; 1024 helps ImageNet-size CNNs: results/ptq.md)")
    k.add_argument("--iters", type=int, default=300, help="adaptive-rounding steps per layer (default 300)")
    k.add_argument("--channel-scales", action="store_true",
                   help="fold a per-channel factor into each BatchNorm after a shift layer (calibrate_'s "
                        "channel_scales: helps at 2-3 bits)")
    k.add_argument("--data-dir", help="override the data folder stored in the checkpoint")
    k.add_argument("--out", required=True, help="output run folder")
    k.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    k.add_argument("--quiet", action="store_true")
    k.set_defaults(command="calibrate")

    f = _command(sub, "finetune-bn", "BatchNorm-aware fine-tune of a shift run for its integer-only form",
                 "SOURCE is a converted run folder (deepshift train --method q/ps, or deepshift "
                 "calibrate) or its checkpoint. Trains it --steps steps on its training split with every "
                 "BatchNorm scale rounded to --scale-terms signed powers of two "
                 "(deepshift.finetune_batchnorm_; the running statistics stay fixed) and keeps the "
                 "rounded scales, which `export --integer-only --scale-terms K` then uses as they are. "
                 "Writes --out: best.pt, config.json, metrics.json (validation top-1 before, with the "
                 "scales rounded, and after).",
                 ["deepshift finetune-bn runs/q3 --scale-terms 1 --out runs/q3-bn1",
                  "deepshift export runs/q3-bn1 --integer-only --scale-terms 1 -o q3-int.dshift"])
    f.add_argument("source", metavar="SOURCE")
    f.add_argument("--scale-terms", type=int, default=3,
                   help="signed powers of two per BatchNorm scale, 1..8 (default 3, as export's)")
    f.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    f.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 0.0001)")
    f.add_argument("--batch-size", type=int, help="default: the run's batch size")
    f.add_argument("--data-dir", help="override the data folder stored in the checkpoint")
    f.add_argument("--out", required=True, help="output run folder")
    f.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(command="finetune-bn")

    c = sub.add_parser("compare", help="train float, Q and PS with one recipe and print a table",
                       description="Runs `train` three times (--method none, q, ps) with the same options "
                       "into OUT/float, OUT/q, OUT/ps, then prints test top-1, top-5 (language models: "
                       "perplexity) and seconds per epoch.")
    _add_train_options(c)
    c.set_defaults(command="compare")
    return parser


def _command(sub, name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its example command lines, kept as written."""
    return sub.add_parser(name, help=help, description=description,
                          epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_deploy_commands(sub) -> None:
    shape_help = "input shape without batch, e.g. 1 28 28 (default: from the model / dataset)"
    x = _command(sub, "export", "export a trained shift model: packed file or ONNX",
                 "SOURCE is a run folder (its best.pt), a checkpoint, or a packed file.",
                 ["deepshift export runs/ps --format packed -o model.dshift",
                  "deepshift export runs/ps --integer-only -o model-int.dshift",
                  "deepshift export runs/ps --integer-only --format onnx -o model-int.onnx",
                  "deepshift export model.dshift --format onnx -o model.onnx"])
    x.add_argument("source", metavar="SOURCE")
    x.add_argument("--format", choices=("packed", "onnx"), default="packed")
    x.add_argument("-o", "--output", required=True, help="file to write (atomically)")
    x.add_argument("--act-bits", type=int, nargs=2, metavar=("I", "F"),
                   help="fixed point for layers trained without act_bits (default 8 8)")
    x.add_argument("--onnx-mode", choices=("fixed_point", "fixed_point_float64", "weights"),
                   default="fixed_point",
                   help="fixed_point: the frozen model exactly, as float32 calls proved exact; "
                        "fixed_point_float64: the same as float64 MatMuls (slower); weights: the "
                        "float-simulated graph")
    x.add_argument("--input-shape", type=int, nargs="+", metavar="D", help=shape_help)
    x.add_argument("--integer-only", action="store_true",
                   help="the integer-only model (deepshift.integer_only): integers from the input to "
                        "the logits, BatchNorm as shifts and adds; a packed file that runs as it, or "
                        "its int64 ONNX graph")
    x.add_argument("--scale-terms", type=int, default=3,
                   help="signed powers of two per BatchNorm scale with --integer-only (default 3)")
    x.set_defaults(command="export")

    r = sub.add_parser("report", help="per-layer operations, bytes and energy saved by a shift model",
                       description="SOURCE is a run folder (its best.pt), a checkpoint, or a packed file. "
                       "Energies: Horowitz, ISSCC 2014, 45 nm (see deepshift.report.ENERGY_45NM_PJ).")
    r.add_argument("source", metavar="SOURCE")
    r.add_argument("--json", action="store_true", help="print the report as JSON (stable keys, version 2)")
    r.add_argument("--plot", metavar="PNG", help="also draw the histogram of shift values per layer")
    r.add_argument("--input-shape", type=int, nargs="+", metavar="D", help=shape_help)
    r.set_defaults(command="report")

    g = _command(sub, "generate", "sample text from a trained language model (char-transformer)",
                 "SOURCE is a run folder (its best.pt), a checkpoint (float or converted) or a packed file. "
                 "Prints the prompt and its continuation, then the speed.",
                 ["deepshift generate runs/lm-ps --prompt 'The ' --tokens 200",
                  "deepshift generate runs/lm-ps --frozen --prompt 'The ' --tokens 200"])
    g.add_argument("source", metavar="SOURCE")
    g.add_argument("--prompt", required=True, help="text to continue (UTF-8; the model reads bytes)")
    g.add_argument("--tokens", type=int, default=200, help="bytes to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="0 picks the most likely byte (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes only")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--frozen", action="store_true",
                   help="freeze a converted checkpoint first (integer layers, as a packed file runs)")
    g.set_defaults(command="generate")
