"""Evaluation of a model on a loader, and of a checkpoint on a dataset split."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepshift.core.convert import shift_parameters, shift_tensors
from deepshift.training.checkpoint import CHECKPOINT_FORMAT, _load_into, load_checkpoint
from deepshift.training.config import (
    CheckpointError,
    ConfigError,
    TrainConfig,
    build_run_model,
    resolve_device,
)
from deepshift.training.data.datasets import load_dataset
from deepshift.training.data.loader import BatchLoader
from deepshift.training.distributed import (
    SINGLE,
    DistContext,
    all_reduce_sum,
)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total trainable values, weights held as shifts, the rest (float)."""
    shift_ids, shift_weights = set(), 0
    for _, module, tensor, _ in shift_tensors(model):
        params = shift_parameters(module, tensor)
        shift_weights += next(iter(params.values())).numel()
        shift_ids.update(id(p) for p in getattr(module.parametrizations, tensor).parameters())
    total = sum(p.numel() for p in model.parameters())
    floats = sum(p.numel() for p in model.parameters() if id(p) not in shift_ids)
    return {"parameters": total, "shift_weights": shift_weights, "float_parameters": floats}


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device | str = "cpu",
             quiet: bool = True, desc: str = "eval", ctx: DistContext = SINGLE) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``.

    For a language model (``(B, T, vocab)`` logits for ``(B, T)`` targets) every position counts as
    one prediction, and the result also holds ``perplexity`` = exp(mean cross-entropy per token).
    The model is put in eval mode (deterministic rounding) and left there. In a distributed run
    (``ctx``), ``loader`` is this rank's disjoint slice
    (:func:`deepshift.training.distributed.shard_eval_loader`) and the counts are summed over ranks,
    so every example counts once and every rank gets the same result.
    """
    from tqdm import tqdm

    model.eval()
    device = torch.device(device)
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    sequence = getattr(loader.dataset, "task", "classify") == "language"
    for x, y in tqdm(loader.epoch(0), total=len(loader), disable=quiet, desc=desc, leave=False):
        x, y = x.to(device), y.to(device)
        logits, y = flat_predictions(model(x), y)
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
        out = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    else:
        out = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}
    if sequence:
        out["perplexity"] = math.exp(out["loss"]) if n else float("nan")
    return out


def flat_predictions(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, classes)`` logits and ``(N,)`` targets: a language model's ``(B, T, vocab)`` and
    ``(B, T)`` become one prediction per position; classifiers' pass through."""
    if logits.dim() == 3 and y.dim() == 2:
        return logits.flatten(0, 1), y.flatten()
    return logits, y


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
