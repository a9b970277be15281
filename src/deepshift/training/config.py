"""The training configuration (``TrainConfig``), its recipes and the errors training raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from deepshift.core.config import PSConfig, QConfig
from deepshift.core.convert import convert_
from deepshift.models import LANGUAGE_MODELS, build_model
from deepshift.training.data.datasets import DATASETS
from deepshift.training.distributed import (
    BACKENDS,
)

METHODS = ("none", "q", "ps")


OPTIMIZERS = ("sgd", "adam", "adagrad", "adadelta", "rmsprop", "radam")


SCHEDULES = ("none", "step", "multistep", "cosine")


# MNIST-like data: the paper's batch 64 and 10 epochs. Its plain SGD (lr 0.01, no momentum)
# underfits Fashion-MNIST (83% validation after 5 epochs on 20,000 images, 88% with RAdam; see
# results/lowbit.md), so float and Q take RAdam at lr 1e-3 with cosine decay; PS takes the
# paper's RAdam at lr 0.01 (PS_RECIPE).
_MNIST_RECIPE = {"model": "mnist-conv", "epochs": 10, "batch_size": 64, "optimizer": "radam", "lr": 1e-3,
                 "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "cosine"}


# The paper's training recipes; options left at None take these.
RECIPES: dict[str, dict[str, Any]] = {
    # 1.3k training images: 10 epochs are 200 steps, where float and Q still underfit (train top-1
    # 95.7%, 2 points under PS's faster rate). 30 epochs, and lr 3e-3 for float and Q: validation
    # top-1 over seeds 0-2, mnist-conv, float 97.69 / Q 97.69 / PS 97.69, where lr 1e-3 gave float
    # 96.99 / Q 97.22 (train 99.9%: the slower rate generalised less, not underfit).
    "digits": {**_MNIST_RECIPE, "epochs": 30, "lr": 3e-3},
    "mnist": _MNIST_RECIPE,
    "fashion-mnist": _MNIST_RECIPE,
    "cifar10": {"model": "resnet20", "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                "weight_decay": 1e-4, "lr_schedule": "multistep", "lr_milestones": [80, 120, 160, 180]},
    "imagefolder": {"model": "imagenet-resnet18", "epochs": 90, "batch_size": 256, "lr": 0.1,
                    "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "step", "lr_step": 30},
}


# Byte-level language models (char-transformer, 0.9M parameters, context 128): Adam-style RAdam at
# 1e-3 with cosine decay, 32 windows of 128 bytes per step.
_TEXT_RECIPE = {"model": "char-transformer", "epochs": 8, "batch_size": 32, "optimizer": "radam",
                "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "cosine"}
RECIPES["fortunes"] = RECIPES["text"] = _TEXT_RECIPE


# From a trained float model (--from). CIFAR: the paper's lr 1e-3, x0.1 every 5 epochs, 15 epochs.
# MNIST-like data (no published recipe): a tenth of the float rate for 3 epochs, cosine decay.
_MNIST_FROM_PRETRAINED = {"epochs": 3, "lr": 1e-4, "lr_schedule": "cosine"}


RECIPES_FROM_PRETRAINED = {"cifar10": {"epochs": 15, "lr": 1e-3, "lr_schedule": "step", "lr_step": 5},
                           "digits": _MNIST_FROM_PRETRAINED, "mnist": _MNIST_FROM_PRETRAINED,
                           "fashion-mnist": _MNIST_FROM_PRETRAINED,
                           "fortunes": _MNIST_FROM_PRETRAINED, "text": _MNIST_FROM_PRETRAINED}


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
        text_data, text_model = self.data in ("fortunes", "text"), self.model in LANGUAGE_MODELS
        if text_data != text_model:
            raise ConfigError(
                f"--model {self.model} does not fit --data {self.data}: the text datasets train the language "
                f"models ({', '.join(LANGUAGE_MODELS)}) and those need a text dataset (fortunes, text)")
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


def build_run_model(model_name: str, num_classes: int, in_channels: int,
                    shift_cfg: QConfig | PSConfig | None, shift_depth: int | None) -> nn.Module:
    """Build a zoo model and convert it the way a run does (needed before ``load_state_dict``)."""
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels)
    if shift_cfg is not None:
        convert_(model, shift_cfg, depth=shift_depth)
    return model
