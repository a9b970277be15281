"""Training and evaluation with the paper's recipes: checkpoints, metrics, exact resume.

Python use::

    from deepshift.train import TrainConfig, train, evaluate_checkpoint
    metrics = train(TrainConfig(data="digits", model="mnist-conv", method="ps", epochs=2,
                                optimizer="radam", out="runs/ps"))
    evaluate_checkpoint("runs/ps/best.pt")["top1"] == metrics["test_top1"]

Every run writes its output folder:

* ``config.json``: every option (after defaults are filled in), the shift config, the model spec and
  the library version;
* ``metrics.csv``: one row per epoch (train loss / top-1, validation top-1 / top-5, lr, seconds);
* ``metrics.json``: final ``test_top1`` / ``test_top5`` (of the best checkpoint), ``val_top1``,
  epochs, seconds and parameter counts;
* ``last.pt`` / ``best.pt``: checkpoints holding only tensors, dicts, lists, numbers and strings
  (``torch.load(path, weights_only=True)`` reads them), written atomically (temp file + ``os.replace``);
* ``curves.png``: loss and accuracy curves (when matplotlib is installed).

The best checkpoint is chosen on a validation split held out from the training data; the test set
is evaluated once, at the end. Data order and augmentation are pure functions of
``(seed, epoch, batch index)`` and the checkpoint stores the step index and torch's RNG state, so a
run killed mid-epoch (``checkpoint_every``) and resumed ends with the same weights as an
uninterrupted run (same device and thread count).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import PSConfig, QConfig
from .convert import convert_, shift_layers
from .data import DATASETS, BatchLoader, load_dataset
from .distributed import (
    BACKENDS,
    SINGLE,
    DistContext,
    ShardedBatchLoader,
    all_gather_object,
    all_reduce_sum,
    on_main,
    parameter_digest,
    rank_device,
    shard_eval_loader,
    teardown,
    wrap_model,
)
from .distributed import setup as dist_setup
from .files import atomic_path
from .models import build_model
from .optim import clamp_parameters_, param_groups

METHODS = ("none", "q", "ps")
OPTIMIZERS = ("sgd", "adam", "adagrad", "adadelta", "rmsprop", "radam")
SCHEDULES = ("none", "step", "multistep", "cosine")
CHECKPOINT_FORMAT = "deepshift-train-checkpoint"
CHECKPOINT_VERSION = 1
# Files a run owns in its output folder (the only ones --overwrite replaces).
RUN_FILES = ("config.json", "metrics.csv", "metrics.json", "last.pt", "best.pt", "curves.png")

# MNIST-like data: the paper's batch 64 and 10 epochs. Its plain SGD (lr 0.01, no momentum)
# underfits Fashion-MNIST (83% validation after 5 epochs on 20,000 images, 88% with RAdam; see
# results/lowbit.md), so float and Q take RAdam at lr 1e-3 with cosine decay; PS takes the
# paper's RAdam at lr 0.01 (PS_RECIPE).
_MNIST_RECIPE = {"model": "mnist-conv", "epochs": 10, "batch_size": 64, "optimizer": "radam", "lr": 1e-3,
                 "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "cosine"}
# The paper's recipes (PAPER.md, "Original training recipes"); options left at None take these.
RECIPES: dict[str, dict[str, Any]] = {
    "digits": _MNIST_RECIPE,
    "mnist": _MNIST_RECIPE,
    "fashion-mnist": _MNIST_RECIPE,
    "cifar10": {"model": "resnet20", "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                "weight_decay": 1e-4, "lr_schedule": "multistep", "lr_milestones": [80, 120, 160, 180]},
    "imagefolder": {"model": "imagenet-resnet18", "epochs": 90, "batch_size": 256, "lr": 0.1,
                    "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "step", "lr_step": 30},
}
# From a trained float model (--from). CIFAR: the paper's lr 1e-3, x0.1 every 5 epochs, 15 epochs.
# MNIST-like data (no published recipe): a tenth of the float rate for 3 epochs, cosine decay.
_MNIST_FROM_PRETRAINED = {"epochs": 3, "lr": 1e-4, "lr_schedule": "cosine"}
RECIPES_FROM_PRETRAINED = {"cifar10": {"epochs": 15, "lr": 1e-3, "lr_schedule": "step", "lr_step": 5},
                           "digits": _MNIST_FROM_PRETRAINED, "mnist": _MNIST_FROM_PRETRAINED,
                           "fashion-mnist": _MNIST_FROM_PRETRAINED}
# DeepShift-PS from scratch: the paper's RAdam at lr 0.01 (SGD trains PS poorly). From a float
# model PS takes the dataset's fine-tuning rate times PS_FINETUNE_LR_FACTOR, with RAdam.
PS_RECIPE = {"optimizer": "radam", "lr": 0.01}
PS_FINETUNE_LR_FACTOR = 10.0
# PS's shift and sign live in the log / sign domain: a step of lr changes a weight by a factor
# 2**lr (0.7% at lr 0.01), where the same step moves a float weight of size ~0.03 by 30%. Their
# rate defaults to this multiple of lr (validation, results/lowbit.md: 1x far behind, 3x and 5x
# tied, 10x 1.3-1.4 points behind on Fashion-MNIST).
PS_PARAM_LR_FACTOR = 5.0
# The window of shifts per layer, placed from its weights (see deepshift.convert_): the paper's
# fixed window [-R, 0] cannot hold the scale of a layer without BatchNorm at 2-3 bits.
DEFAULT_MAX_SHIFT = "auto"


class TrainError(Exception):
    """A problem with the user's request (bad option, checkpoint or output folder); one-line message."""


class ConfigError(TrainError, ValueError):
    """An option value is invalid."""


class CheckpointError(TrainError):
    """A checkpoint is missing, truncated, not ours, or does not fit the model."""


class OutputExistsError(TrainError, FileExistsError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


@dataclass
class TrainConfig:
    """Every option of a training run. ``None`` means "the paper's default for this dataset".

    See ``deepshift train --help`` for the meaning of each field; :meth:`resolved` fills in the
    defaults and validates.
    """

    data: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    method: str = "none"
    weight_bits: int = 5
    act_bits: tuple[int, int] | None = None
    act_rounding: str = "nearest"
    rounding: str = "deterministic"
    shift_depth: int | None = None
    max_shift: int | str | None = None
    freeze_sign: bool = False
    optimizer: str | None = None
    lr: float | None = None
    lr_sign: float | None = None
    lr_shift: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    lr_schedule: str | None = None
    lr_step: int | None = None
    lr_milestones: list[int] | None = None
    lr_gamma: float = 0.1
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    from_checkpoint: str | None = None
    out: str = "runs/deepshift"
    device: str = "auto"
    workers: int = 0
    quiet: bool = False
    val_fraction: float = 0.1
    limit_train: int | None = None
    image_size: int = 224
    checkpoint_every: int = 0
    overwrite: bool = False
    sync_bn: bool = False
    dist_backend: str = "auto"
    compile_model: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["act_bits"] = list(self.act_bits) if self.act_bits is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        cfg = cls(**data)
        if cfg.act_bits is not None:
            cfg.act_bits = tuple(cfg.act_bits)
        return cfg

    def resolved(self) -> TrainConfig:
        """A copy with the dataset's recipe filled in for ``None`` options, validated (ConfigError)."""
        if self.data not in DATASETS:
            raise ConfigError(f"unknown dataset {self.data!r}; choose one of {', '.join(DATASETS)}")
        recipe = {"optimizer": "sgd", "max_shift": DEFAULT_MAX_SHIFT, **RECIPES[self.data]}
        if self.method == "ps":
            recipe.update(PS_RECIPE)
        if self.from_checkpoint is not None:
            recipe.update(RECIPES_FROM_PRETRAINED.get(self.data, {}))
            if self.method == "ps":
                recipe["lr"] *= PS_FINETUNE_LR_FACTOR
        filled = {k: v for k, v in recipe.items() if getattr(self, k) is None}
        cfg = replace(self, **filled)
        if cfg.method == "ps":
            cfg.lr_shift = cfg.lr_shift if cfg.lr_shift is not None else PS_PARAM_LR_FACTOR * cfg.lr
            cfg.lr_sign = cfg.lr_sign if cfg.lr_sign is not None else PS_PARAM_LR_FACTOR * cfg.lr
        if cfg.lr_schedule == "step" and cfg.lr_step is None:
            cfg.lr_step = recipe.get("lr_step", max(1, cfg.epochs // 3))
        if cfg.lr_schedule == "multistep" and cfg.lr_milestones is None:
            cfg.lr_milestones = recipe.get("lr_milestones", [cfg.epochs // 2, cfg.epochs * 3 // 4])
        if cfg.act_bits is not None:
            cfg.act_bits = tuple(cfg.act_bits)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed; choose one of "
                                  f"{', '.join(allowed)}")

        choice("method", METHODS)
        choice("optimizer", OPTIMIZERS)
        choice("lr_schedule", SCHEDULES)
        choice("dist_backend", BACKENDS)
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0 or any(v is not None and not v > 0 for v in (self.lr_sign, self.lr_shift)):
            raise ConfigError(f"learning rates must be > 0, got lr={self.lr}, lr_sign={self.lr_sign}, "
                              f"lr_shift={self.lr_shift}")
        if self.momentum < 0 or self.weight_decay < 0 or not 0 < self.lr_gamma <= 1:
            raise ConfigError("momentum and weight_decay must be >= 0 and lr_gamma in (0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shift_depth is not None and self.shift_depth < 0:
            raise ConfigError(f"shift_depth must be >= 0, got {self.shift_depth}")
        if self.checkpoint_every < 0 or self.workers < 0:
            raise ConfigError("checkpoint_every and workers must be >= 0")
        if self.limit_train is not None and self.limit_train < 1:
            raise ConfigError(f"limit_train must be >= 1, got {self.limit_train}")
        if self.lr_schedule == "step" and self.lr_step < 1:
            raise ConfigError(f"lr_step must be >= 1, got {self.lr_step}")
        self.shift_config()  # validates weight bits, act bits, rounding, max shift

    def shift_config(self) -> QConfig | PSConfig | None:
        """The :class:`QConfig` / :class:`PSConfig` this run converts with (None for float)."""
        if self.method == "none":
            return None
        kwargs = {"weight_bits": self.weight_bits, "rounding": self.rounding, "act_bits": self.act_bits,
                  "max_shift": self.max_shift, "act_rounding": self.act_rounding}
        try:
            if self.method == "q":
                return QConfig(**kwargs)
            return PSConfig(**kwargs, freeze_sign=self.freeze_sign)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"bad --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    return device


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over :func:`deepshift.param_groups` of ``model``."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.lr_sign, cfg.lr_shift)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
    cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta,
           "radam": torch.optim.RAdam}[cfg.optimizer]
    return cls(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier at (0-based) ``epoch``: a pure function, so resume needs no state."""
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** (epoch // cfg.lr_step)
    if cfg.lr_schedule == "multistep":
        return cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return 1.0


def build_run_model(model_name: str, num_classes: int, in_channels: int,
                    shift_cfg: QConfig | PSConfig | None, shift_depth: int | None) -> nn.Module:
    """Build a zoo model and convert it the way a run does (needed before ``load_state_dict``)."""
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels)
    if shift_cfg is not None:
        convert_(model, shift_cfg, depth=shift_depth)
    return model


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``; any failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, refused globals: all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a checkpoint): "
                              f"{reason[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dict (not a deepshift checkpoint)")
    return obj


def _state_dict_of(ckpt: dict, path) -> dict:
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        return ckpt["model"]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a plain state_dict saved by the user
    raise CheckpointError(f"{path} is neither a deepshift checkpoint nor a state_dict")


def _load_into(model: nn.Module, state: dict, path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{what} {path} does not fit this model: {first}") from None


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total trainable values, weights held as shifts, the rest (float)."""
    shift_ids, shift_weights = set(), 0
    for _, module, _ in shift_layers(model):
        shift_weights += module.weight.numel()
        shift_ids.update(id(p) for p in module.parametrizations.weight.parameters())
    total = sum(p.numel() for p in model.parameters())
    floats = sum(p.numel() for p in model.parameters() if id(p) not in shift_ids)
    return {"parameters": total, "shift_weights": shift_weights, "float_parameters": floats}


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device | str = "cpu",
             quiet: bool = True, desc: str = "eval", ctx: DistContext = SINGLE) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``.

    The model is put in eval mode (deterministic rounding) and left there. In a distributed run
    (``ctx``), ``loader`` is this rank's disjoint slice (:func:`deepshift.distributed.shard_eval_loader`)
    and the counts are summed over ranks, so every example counts once and every rank gets the
    same result.
    """
    from tqdm import tqdm

    model.eval()
    device = torch.device(device)
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    for x, y in tqdm(loader.epoch(0), total=len(loader), disable=quiet, desc=desc, leave=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == y.view(-1, 1)
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        n += len(y)
    if ctx.enabled:
        correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], ctx, device)
        correct1, correct5, n = int(correct1), int(correct5), int(n)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}


def evaluate_checkpoint(path: str | os.PathLike, split: str = "test", data_dir: str | None = None,
                        device: str = "auto", batch_size: int | None = None,
                        quiet: bool = True) -> dict[str, float]:
    """Rebuild the model stored in a training checkpoint and evaluate it on its dataset's ``split``.

    With the defaults this reproduces the ``test_top1`` / ``test_top5`` of the run's metrics.json
    (``best.pt``) exactly: same data, same eval transform, same batch size.
    """
    if split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {split!r}")
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a deepshift training checkpoint")
    cfg = TrainConfig.from_dict(ckpt["config"])
    if data_dir is not None:
        cfg.data_dir = data_dir
    splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size,
                          cfg.workers)
    dev = resolve_device(device)
    model = build_run_model(cfg.model, splits.num_classes, splits.in_channels, cfg.shift_config(),
                            cfg.shift_depth)
    _load_into(model, ckpt["model"], path, "checkpoint")
    model.to(dev)
    loader = BatchLoader(getattr(splits, split), batch_size or cfg.batch_size, train=False)
    return evaluate(model, loader, dev, quiet=quiet, desc=split)


# --------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless ``overwrite`` (then remove only the run's own files)."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output folder {out} is not empty; use --resume {out} to continue it, "
                                    "--overwrite to replace its run, or another --out")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


CSV_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "seconds")


def _write_csv(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def plot_curves(path: Path, history: list[dict]) -> bool:
    """Loss and accuracy per epoch as a PNG (matplotlib Agg); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["train_top1"] for r in history], label="train top-1")
    ax2.plot(epochs, [r["val_top1"] for r in history], label="val top-1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a fresh run described by ``cfg`` into ``cfg.out``; returns the final metrics dict.

    Everything that can fail on bad input (options, data, model, ``from_checkpoint``) is checked
    before the output folder is touched. Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls
    this; they train one DistributedDataParallel model (see :mod:`deepshift.distributed`).
    """
    cfg = cfg.resolved()
    ctx = _dist_start(cfg.device, cfg.dist_backend)
    try:
        return _run(cfg, Path(cfg.out), resume_state=None, ctx=ctx)
    finally:
        teardown(ctx)


def _dist_start(device: str, backend: str) -> DistContext:
    try:
        dev = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    if dev is None:
        return SINGLE
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here")
    return dist_setup(dev, backend)


def _read_run(out: Path) -> tuple[TrainConfig, dict | None]:
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"--resume {out}: no config.json there (not a deepshift run folder)")
    try:
        saved = json.loads(cfg_path.read_text())
        cfg = TrainConfig.from_dict(saved["train"]).resolved()
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--resume {out}: config.json is unreadable ({exc})") from None
    state = load_checkpoint(out / "last.pt") if (out / "last.pt").exists() else None
    if state is not None and state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{out / 'last.pt'} is not a deepshift training checkpoint")
    return cfg, state


def resume(out_dir: str | os.PathLike, quiet: bool | None = None, device: str | None = None,
           epochs: int | None = None, dist_backend: str | None = None) -> dict:
    """Continue the run in ``out_dir`` from its ``last.pt`` (model, optimizer, RNG, epoch, step).

    ``epochs`` extends (or shortens, down to the epochs already done) a run; with a schedule that
    does not depend on the total (none, step, multistep) the result equals a run started with that
    many epochs.
    """
    out = Path(out_dir)
    # Under torchrun, rank 0 reads the folder and hands config and checkpoint to the other ranks;
    # a run saved by any number of processes resumes in any number of processes.
    ctx = _dist_start(device or "auto", dist_backend or "auto")
    try:
        cfg, state = on_main(ctx, lambda: _read_run(out))
        if quiet is not None:
            cfg.quiet = quiet
        if device is not None:
            cfg.device = device
        if dist_backend is not None:
            cfg.dist_backend = dist_backend
        if epochs is not None:
            cfg.epochs = epochs
            cfg._validate()
        return _run(cfg, out, resume_state=state if state is not None else {}, ctx=ctx)
    finally:
        teardown(ctx)


def _from_state(path: str) -> dict:
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == CHECKPOINT_FORMAT and ckpt.get("shift_config") is not None:
        raise CheckpointError(f"--from {path}: a float checkpoint (--method none) is "
                              "needed; this one is already converted")
    return _state_dict_of(ckpt, path)


def _run(cfg: TrainConfig, out: Path, resume_state: dict | None, ctx: DistContext = SINGLE) -> dict[str, Any]:
    from tqdm import tqdm

    from . import __version__

    if ctx.enabled:
        device = rank_device(cfg.device, ctx.local_rank)
    else:
        device = resolve_device(cfg.device)
    if cfg.sync_bn and ctx.enabled and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")
    main = ctx.is_main
    quiet = cfg.quiet or not main  # one progress stream: rank 0's
    # Every rank seeds alike: identical initialisation (DDP also broadcasts rank 0's parameters) and
    # identical stochastic-rounding draws while the ranks' batches have equal sizes.
    torch.manual_seed(cfg.seed)
    splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size,
                          cfg.workers)
    shift_cfg = cfg.shift_config()
    model = build_model(cfg.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    zoo_spec = model.zoo_spec
    if cfg.from_checkpoint is not None and not resume_state:
        state = on_main(ctx, lambda: _from_state(cfg.from_checkpoint))
        _load_into(model, state, cfg.from_checkpoint, "--from")
    # The order that works with parametrized weights: convert_, then DDP, then torch.compile.
    if shift_cfg is not None:
        # From a float model: its weights converted exactly; otherwise the paper's init from
        # scratch (PS: random shift and sign; see convert_). Resume loads its state over either.
        init = "weights" if cfg.from_checkpoint is not None else "scratch"
        convert_(model, shift_cfg, depth=cfg.shift_depth, init=init)
    model.to(device)
    net = wrap_model(model, ctx, device, sync_bn=cfg.sync_bn)  # shares model's parameters
    if cfg.compile_model:
        net = torch.compile(net)
    optimizer = make_optimizer(cfg, model)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    train_loader = BatchLoader(splits.train, cfg.batch_size, train=True, seed=cfg.seed)
    val_loader = BatchLoader(splits.val, cfg.batch_size, train=False)
    test_loader = BatchLoader(splits.test, cfg.batch_size, train=False)
    sharded = ShardedBatchLoader(train_loader, ctx.rank, ctx.world_size) if ctx.enabled else None
    eval_bs = math.ceil(cfg.batch_size / ctx.world_size)
    val_loader = shard_eval_loader(val_loader, ctx, eval_bs)
    test_loader = shard_eval_loader(test_loader, ctx, eval_bs)

    history: list[dict] = []
    epoch, step, elapsed = 0, 0, 0.0
    best_val, best_epoch = -1.0, 0
    running = {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0}
    if resume_state:
        _load_into(model, resume_state["model"], out / "last.pt", "checkpoint")
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{out / 'last.pt'}: optimizer state does not fit ({exc})") from None
        rng = resume_state["rng"]
        if ctx.enabled and resume_state.get("world_size") == ctx.world_size and "rng_ranks" in resume_state:
            rng = resume_state["rng_ranks"][ctx.rank]
        _set_rng_state(rng, device)
        epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
        history = list(resume_state["history"])
        best_val, best_epoch = float(resume_state["best_val_top1"]), int(resume_state["best_epoch"])
        running = dict(resume_state["running"])
        elapsed = float(resume_state["elapsed"])
        if epoch > cfg.epochs:
            raise ConfigError(f"--epochs {cfg.epochs}: the run in {out} has already done {epoch} epochs")
    elif resume_state is None:
        on_main(ctx, lambda: check_output_dir(out, cfg.overwrite))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", {
            "deepshift_version": __version__, "train": cfg.to_dict(),
            "shift_config": shift_cfg.to_dict() if shift_cfg else None, "zoo_spec": zoo_spec})

    def checkpoint(epoch_: int, step_: int, running_: dict, elapsed_: float) -> dict:
        # Collective when distributed (every rank's RNG state is gathered): call it on every rank.
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "deepshift_version": __version__,
            "config": cfg.to_dict(), "shift_config": shift_cfg.to_dict() if shift_cfg else None,
            "zoo_spec": zoo_spec, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch_, "step": step_, "running": dict(running_), "rng": _rng_state(device),
            "history": history, "best_val_top1": best_val, "best_epoch": best_epoch, "elapsed": elapsed_,
            "world_size": ctx.world_size,
        }
        if ctx.enabled:
            ckpt["rng_ranks"] = all_gather_object(ckpt["rng"], ctx)
        return ckpt

    def save(ckpt: dict, path: Path) -> None:
        if main:
            save_checkpoint(ckpt, path)

    steps_per_epoch = len(train_loader)
    while epoch < cfg.epochs:
        factor = lr_factor(cfg, epoch)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
        net.train()
        t0 = time.perf_counter() - running["seconds"]
        bar = tqdm(total=steps_per_epoch, initial=step, disable=quiet, leave=False,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
        if sharded is not None:
            batches = sharded.epoch(epoch, start=step)
        else:
            batches = ((x, y, len(y)) for x, y in train_loader.epoch(epoch, start=step))
        for x, y, n_global in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            if ctx.enabled:
                # Sum over this rank's piece / global batch, times W (DDP averages over ranks):
                # the gradient is the mean over the global batch, as in one process.
                loss_sum = F.cross_entropy(logits, y, reduction="sum")
                loss = loss_sum * (ctx.world_size / n_global)
            else:
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clamp_parameters_(model)  # on every rank: deterministic, so replicas stay identical
            if ctx.enabled:
                hits = float((logits.argmax(1) == y).sum())
                total, correct = all_reduce_sum([float(loss_sum.detach()), hits], ctx, device)
                loss_value = total / n_global
                running["loss"] += total
                running["correct"] += int(correct)
                running["n"] += n_global
            else:
                loss_value = float(loss.detach())
                running["loss"] += loss_value * len(y)
                running["correct"] += int((logits.argmax(1) == y).sum())
                running["n"] += len(y)
            step += 1
            bar.update(1)
            if not math.isfinite(loss_value):
                bar.close()
                raise TrainError(f"training diverged at epoch {epoch + 1}, step {step} (loss {loss_value}); "
                                 "lower --lr")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps_per_epoch:
                running["seconds"] = time.perf_counter() - t0
                save(checkpoint(epoch, step, running, elapsed), out / "last.pt")
        bar.close()
        train_seconds = time.perf_counter() - t0
        val = evaluate(model, val_loader, device, quiet=quiet, desc="val", ctx=ctx)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        n = max(running["n"], 1)
        row = {"epoch": epoch + 1, "train_loss": running["loss"] / n,
               "train_top1": 100.0 * running["correct"] / n,
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": seconds, "train_seconds": train_seconds}
        history.append(row)
        epoch, step = epoch + 1, 0
        running = {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0}
        # Without a validation split (val_fraction 0) the last epoch counts as the best.
        if val["n"] == 0 or val["top1"] > best_val:
            best_val, best_epoch = val["top1"], row["epoch"]
            save(checkpoint(epoch, 0, running, elapsed), out / "best.pt")
        save(checkpoint(epoch, 0, running, elapsed), out / "last.pt")
        if main:
            _write_csv(out / "metrics.csv", history)
            plot_curves(out / "curves.png", history)
        if not quiet:
            print(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                  f"train top-1 {row['train_top1']:.2f}  val top-1 {row['val_top1']:.2f}  "
                  f"lr {row['lr']:.3g}  {seconds:.1f}s", flush=True)

    extra: dict[str, Any] = {"world_size": ctx.world_size}
    if ctx.enabled:
        # Every replica must hold bit-identical parameters (DDP averages gradients, the optimizer
        # step and clamp_parameters_ are deterministic); a mismatch is a bug worth stopping for.
        digests = all_gather_object(parameter_digest(model), ctx)
        if len(set(digests)) != 1:
            raise TrainError(f"replicas diverged: parameter digests differ across ranks {digests}")
        extra["replica_digests"] = digests

    # The test set is evaluated once, with the checkpoint chosen on validation.
    best_state = on_main(ctx, lambda: load_checkpoint(out / "best.pt")["model"])
    model.load_state_dict(best_state)
    test = evaluate(model, test_loader, device, quiet=quiet, desc="test", ctx=ctx)
    metrics = {
        "test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
        "test_examples": test["n"],
        "val_top1": best_val, "best_epoch": best_epoch, "epochs": cfg.epochs, "seconds": elapsed,
        "seconds_per_epoch": elapsed / max(len(history), 1), "data": cfg.data, "model": cfg.model,
        "method": cfg.method, "deepshift_version": __version__, **count_parameters(model), **extra,
    }
    if main:
        _write_json(out / "metrics.json", metrics)
    if not quiet:
        print(f"test top-1 {metrics['test_top1']:.2f}  top-5 {metrics['test_top5']:.2f}  "
              f"(best val top-1 {best_val:.2f} at epoch {best_epoch}); wrote {out}", flush=True)
    return metrics


__all__ = [
    "CheckpointError", "ConfigError", "OutputExistsError", "RECIPES", "TrainConfig", "TrainError",
    "build_run_model", "evaluate", "evaluate_checkpoint", "load_checkpoint", "lr_factor",
    "make_optimizer", "resume", "save_checkpoint", "train",
]
