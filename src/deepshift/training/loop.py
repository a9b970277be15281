"""Training and evaluation with the paper's recipes: checkpoints, metrics, exact resume.

Python use::

    from deepshift.training import TrainConfig, evaluate_checkpoint, train
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

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from deepshift._version import __version__
from deepshift.core.convert import convert_
from deepshift.core.optim import clamp_parameters_, param_groups
from deepshift.models import build_model
from deepshift.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    _load_into,
    _rng_state,
    _set_rng_state,
    _state_dict_of,
    load_checkpoint,
    save_checkpoint,
)
from deepshift.training.config import CheckpointError, ConfigError, TrainConfig, TrainError, resolve_device
from deepshift.training.data.datasets import load_dataset
from deepshift.training.data.loader import BatchLoader
from deepshift.training.distributed import (
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
from deepshift.training.distributed import setup as dist_setup
from deepshift.training.evaluate import count_parameters, evaluate, flat_predictions
from deepshift.training.run_dir import _read_run, _write_csv, _write_json, check_output_dir, plot_curves


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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a fresh run described by ``cfg`` into ``cfg.out``; returns the final metrics dict.

    Everything that can fail on bad input (options, data, model, ``from_checkpoint``) is checked
    before the output folder is touched. Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls
    this; they train one DistributedDataParallel model (see :mod:`deepshift.training.distributed`).
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


def _fresh_running() -> dict:
    """The running training sums of the epoch in progress (saved mid-epoch by checkpoints)."""
    return {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0}


class _Run:
    """One training run: built in ``__init__`` (data, model, optimizer, loaders, the state a resume
    restores), then ``train_epoch`` until done, then ``finish`` (test set, metrics). The order of
    every random draw is fixed, so a resumed run continues exactly."""

    def __init__(self, cfg: TrainConfig, out: Path, resume_state: dict | None, ctx: DistContext):
        self.cfg, self.out, self.ctx = cfg, out, ctx
        device = rank_device(cfg.device, ctx.local_rank) if ctx.enabled else resolve_device(cfg.device)
        if cfg.sync_bn and ctx.enabled and device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU "
                              "implementation)")
        self.device = device
        self.main = ctx.is_main
        self.quiet = cfg.quiet or not self.main  # one progress stream: rank 0's
        # Every rank seeds alike: identical initialisation (DDP also broadcasts rank 0's parameters)
        # and identical stochastic-rounding draws while the ranks' batches have equal sizes.
        torch.manual_seed(cfg.seed)
        splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size,
                              cfg.workers)
        self.shift_cfg = cfg.shift_config()
        # Language models keep the checkpoint with the lowest validation loss (perplexity),
        # classifiers the one with the highest validation top-1.
        self.language = splits.task == "language"
        model = build_model(cfg.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        self.zoo_spec = model.zoo_spec
        if cfg.from_checkpoint is not None and not resume_state:
            state = on_main(ctx, lambda: _from_state(cfg.from_checkpoint))
            _load_into(model, state, cfg.from_checkpoint, "--from")
        # The order that works with parametrized weights: convert_, then DDP, then torch.compile.
        if self.shift_cfg is not None:
            # From a float model: its weights converted exactly; otherwise the paper's init from
            # scratch (PS: random shift and sign; see convert_). Resume loads its state over either.
            init = "weights" if cfg.from_checkpoint is not None else "scratch"
            convert_(model, self.shift_cfg, depth=cfg.shift_depth, init=init)
        model.to(device)
        self.model = model
        net = wrap_model(model, ctx, device, sync_bn=cfg.sync_bn)  # shares model's parameters
        self.net = torch.compile(net) if cfg.compile_model else net
        self.optimizer = make_optimizer(cfg, model)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.train_loader = BatchLoader(splits.train, cfg.batch_size, train=True, seed=cfg.seed)
        val_loader = BatchLoader(splits.val, cfg.batch_size, train=False)
        test_loader = BatchLoader(splits.test, cfg.batch_size, train=False)
        self.sharded = (ShardedBatchLoader(self.train_loader, ctx.rank, ctx.world_size) if ctx.enabled
                        else None)
        eval_bs = math.ceil(cfg.batch_size / ctx.world_size)
        self.val_loader = shard_eval_loader(val_loader, ctx, eval_bs)
        self.test_loader = shard_eval_loader(test_loader, ctx, eval_bs)

        self.history: list[dict] = []
        self.epoch, self.step, self.elapsed = 0, 0, 0.0
        self.best_val, self.best_epoch = -math.inf, 0
        self.running = _fresh_running()
        if resume_state:
            self._restore(resume_state)
        elif resume_state is None:
            on_main(ctx, lambda: check_output_dir(out, cfg.overwrite))
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "config.json", {
                "deepshift_version": __version__, "train": cfg.to_dict(),
                "shift_config": self.shift_cfg.to_dict() if self.shift_cfg else None,
                "zoo_spec": self.zoo_spec})

    def _restore(self, state: dict) -> None:
        cfg, ctx, out = self.cfg, self.ctx, self.out
        _load_into(self.model, state["model"], out / "last.pt", "checkpoint")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{out / 'last.pt'}: optimizer state does not fit ({exc})") from None
        rng = state["rng"]
        if ctx.enabled and state.get("world_size") == ctx.world_size and "rng_ranks" in state:
            rng = state["rng_ranks"][ctx.rank]
        _set_rng_state(rng, self.device)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.best_val = float(state.get("best_val_score", state.get("best_val_top1")))
        self.best_epoch = int(state["best_epoch"])
        self.running = dict(state["running"])
        self.elapsed = float(state["elapsed"])
        if self.epoch > cfg.epochs:
            raise ConfigError(f"--epochs {cfg.epochs}: the run in {out} has already done {self.epoch} epochs")

    def checkpoint(self) -> dict:
        """The checkpoint of the run as it stands. Collective when distributed (every rank's RNG
        state is gathered): call it on every rank."""
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "deepshift_version": __version__,
            "config": self.cfg.to_dict(),
            "shift_config": self.shift_cfg.to_dict() if self.shift_cfg else None,
            "zoo_spec": self.zoo_spec, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step": self.step,
            "running": dict(self.running), "rng": _rng_state(self.device), "history": self.history,
            "best_val_score": self.best_val, "best_epoch": self.best_epoch, "elapsed": self.elapsed,
            "world_size": self.ctx.world_size,
        }
        if self.ctx.enabled:
            ckpt["rng_ranks"] = all_gather_object(ckpt["rng"], self.ctx)
        return ckpt

    def save(self, name: str) -> None:
        ckpt = self.checkpoint()  # on every rank (collective)
        if self.main:
            save_checkpoint(ckpt, self.out / name)

    def _train_step(self, x: Tensor, y: Tensor, n_global: int) -> float:
        """One optimizer step on this rank's piece of a global batch; returns the batch's mean loss."""
        ctx, running = self.ctx, self.running
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        # Predictions per example: 1, or a language model's window length (every window has it), so
        # that n_global counts what the loss averages over.
        n_global *= y[0].numel() if y.dim() > 1 and len(y) else 1
        logits, y = flat_predictions(self.net(x), y)
        if ctx.enabled:
            # Sum over this rank's piece / global batch, times W (DDP averages over ranks): the
            # gradient is the mean over the global batch, as in one process.
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            loss = loss_sum * (ctx.world_size / n_global)
        else:
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        clamp_parameters_(self.model)  # on every rank: deterministic, so replicas stay identical
        if ctx.enabled:
            hits = float((logits.argmax(1) == y).sum())
            total, correct = all_reduce_sum([float(loss_sum.detach()), hits], ctx, self.device)
            running["loss"] += total
            running["correct"] += int(correct)
            running["n"] += n_global
            return total / n_global
        loss_value = float(loss.detach())
        running["loss"] += loss_value * len(y)
        running["correct"] += int((logits.argmax(1) == y).sum())
        running["n"] += len(y)
        return loss_value

    def train_epoch(self) -> None:
        """The rest of the current epoch (all of it, unless resumed mid-epoch), validation, the
        checkpoints and the run folder's metrics."""
        cfg, out = self.cfg, self.out
        factor = lr_factor(cfg, self.epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self.net.train()
        steps_per_epoch = len(self.train_loader)
        t0 = time.perf_counter() - self.running["seconds"]
        bar = tqdm(total=steps_per_epoch, initial=self.step, disable=self.quiet, leave=False,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}")
        if self.sharded is not None:
            batches = self.sharded.epoch(self.epoch, start=self.step)
        else:
            batches = ((x, y, len(y)) for x, y in self.train_loader.epoch(self.epoch, start=self.step))
        for x, y, n_global in batches:
            loss_value = self._train_step(x, y, n_global)
            self.step += 1
            bar.update(1)
            if not math.isfinite(loss_value):
                bar.close()
                raise TrainError(f"training diverged at epoch {self.epoch + 1}, step {self.step} "
                                 f"(loss {loss_value}); lower --lr")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < steps_per_epoch:
                self.running["seconds"] = time.perf_counter() - t0
                self.save("last.pt")
        bar.close()
        train_seconds = time.perf_counter() - t0
        val = evaluate(self.model, self.val_loader, self.device, quiet=self.quiet, desc="val", ctx=self.ctx)
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        n = max(self.running["n"], 1)
        row = {"epoch": self.epoch + 1, "train_loss": self.running["loss"] / n,
               "train_top1": 100.0 * self.running["correct"] / n,
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               **({"val_perplexity": val["perplexity"]} if self.language else {}),
               "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds, "train_seconds": train_seconds}
        self.history.append(row)
        self.epoch, self.step = self.epoch + 1, 0
        self.running = _fresh_running()
        # Without a validation split (val_fraction 0) the last epoch counts as the best.
        score = -val["loss"] if self.language else val["top1"]
        if val["n"] == 0 or score > self.best_val:
            self.best_val, self.best_epoch = score, row["epoch"]
            self.save("best.pt")
        self.save("last.pt")
        if self.main:
            _write_csv(out / "metrics.csv", self.history)
            plot_curves(out / "curves.png", self.history)
        if not self.quiet:
            print(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                  f"train top-1 {row['train_top1']:.2f}  val top-1 {row['val_top1']:.2f}  "
                  + (f"val perplexity {row['val_perplexity']:.3f}  " if self.language else "")
                  + f"lr {row['lr']:.3g}  {seconds:.1f}s", flush=True)

    def finish(self) -> dict[str, Any]:
        """Checks the replicas agree, evaluates best.pt on the test set once, writes metrics.json."""
        cfg, ctx, out = self.cfg, self.ctx, self.out
        extra: dict[str, Any] = {"world_size": ctx.world_size}
        if ctx.enabled:
            # Every replica must hold bit-identical parameters (DDP averages gradients, the optimizer
            # step and clamp_parameters_ are deterministic); a mismatch is a bug worth stopping for.
            digests = all_gather_object(parameter_digest(self.model), ctx)
            if len(set(digests)) != 1:
                raise TrainError(f"replicas diverged: parameter digests differ across ranks {digests}")
            extra["replica_digests"] = digests
        # The test set is evaluated once, with the checkpoint chosen on validation.
        best_state = on_main(ctx, lambda: load_checkpoint(out / "best.pt")["model"])
        self.model.load_state_dict(best_state)
        test = evaluate(self.model, self.test_loader, self.device, quiet=self.quiet, desc="test", ctx=ctx)
        best = self.history[self.best_epoch - 1] if self.best_epoch else {}
        if self.language:
            extra.update(test_perplexity=test["perplexity"], val_perplexity=best.get("val_perplexity"))
        metrics = {
            "test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
            "test_examples": test["n"],
            "val_top1": best.get("val_top1"), "best_epoch": self.best_epoch, "epochs": cfg.epochs,
            "seconds": self.elapsed, "seconds_per_epoch": self.elapsed / max(len(self.history), 1),
            "data": cfg.data, "model": cfg.model, "method": cfg.method, "deepshift_version": __version__,
            **count_parameters(self.model), **extra,
        }
        if self.main:
            _write_json(out / "metrics.json", metrics)
        if not self.quiet and self.language:
            print(f"test perplexity {test['perplexity']:.3f}  top-1 {metrics['test_top1']:.2f}  (best val "
                  f"perplexity {best.get('val_perplexity', math.nan):.3f} at epoch {self.best_epoch}); "
                  f"wrote {out}",
                  flush=True)
        elif not self.quiet:
            print(f"test top-1 {metrics['test_top1']:.2f}  top-5 {metrics['test_top5']:.2f}  (best val top-1 "
                  f"{best.get('val_top1', math.nan):.2f} at epoch {self.best_epoch}); wrote {out}",
                  flush=True)
        return metrics


def _run(cfg: TrainConfig, out: Path, resume_state: dict | None, ctx: DistContext = SINGLE) -> dict[str, Any]:
    run = _Run(cfg, out, resume_state, ctx)
    while run.epoch < cfg.epochs:
        run.train_epoch()
    return run.finish()
