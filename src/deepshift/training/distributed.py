"""Data-parallel training under ``torchrun``: process group, sharding, and cross-rank reductions.

``torchrun --nproc_per_node=N -m deepshift train ...`` starts N processes; each reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment, joins a process group (gloo on CPU, nccl on
CUDA) and trains a :class:`~torch.nn.parallel.DistributedDataParallel` replica on one device.
Without those variables (or with ``WORLD_SIZE=1``) everything here is a no-op and a run is an
ordinary single-process run.

Semantics (the ones :mod:`deepshift.training.loop` commits to):

* ``--batch-size`` is the **global** batch: the training data order is the single-process one (a
  pure function of ``(seed, epoch, batch index)``) and global batch ``b`` is split into ``W``
  contiguous, disjoint pieces, one per rank (sizes differ by at most one). Each rank's loss is the
  *sum* over its piece divided by the global batch size (times ``W``, which DDP's gradient average
  divides out), so a step's gradient is the mean over the whole global batch, exactly as in one
  process: the learning rate means the same at any world size.
* Evaluation sets are split into ``W`` contiguous, disjoint (possibly unequal) slices; correct
  counts and loss sums are all-reduced, so every example is counted exactly once (no padding).
* Only rank 0 prints and writes files. Anything rank 0 reads (``--resume`` folder, ``--from``
  checkpoint) is broadcast to the other ranks, so nodes need not share a filesystem.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any process group exists: see shutdown()
from torch import Tensor, nn

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(device: torch.device | str, backend: str = "auto") -> DistContext:
    """Join the process group torchrun describes (if any) and return this process's context.

    ``device`` is this rank's device (see :func:`rank_device`). ``backend`` ``auto`` picks nccl for
    CUDA tensors (with gloo for CPU tensors) on a CUDA device, and gloo on CPU.
    """
    world = env_world_size()
    if world <= 1:
        return SINGLE
    if backend not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        # CPU tensors (object broadcasts, CPU runs) go through gloo, CUDA tensors through nccl.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend, owns_group=owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it (see :func:`shutdown`).

    Called from ``finally``: while an exception propagates, the other ranks may never reach the
    barrier, so there is none then.
    """
    if ctx.owns_group and dist.is_initialized():
        shutdown(barrier=sys.exc_info()[0] is None)


def shutdown(barrier: bool = True) -> None:
    """Wait for every rank, then destroy the default process group and join its gloo threads.

    gloo's worker threads drop the last reference to a finished collective's tensors, which takes
    the GIL when Python created them. If a worker does so while the interpreter is shutting down
    (a rank exits right after its last collective), CPython ends the thread inside a C++
    destructor and the process aborts: "terminate called without an active exception". So the
    group must really be destroyed, its threads joined, before exit: the barrier lets no rank tear
    down while another still talks to it, and ``destroy_process_group`` then drops the last
    reference to the group. That needs ``torch.distributed.nn`` (which DDP imports, and whose
    functions take ``group=group.WORLD`` as a default argument, evaluated when it is imported) to
    be imported before any group exists, as this module does; otherwise those defaults keep the
    group alive until interpreter shutdown.
    """
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def rank_device(name: str, local_rank: int) -> torch.device | None:
    """The device of local rank ``local_rank`` for ``--device name`` (``None``: not distributed).

    ``auto`` and ``cuda`` mean ``cuda:<local rank>`` when CUDA is available; ``auto`` falls back to
    CPU. An explicit ``cuda:N`` would put every rank on one GPU, so it is refused.
    """
    if env_world_size() <= 1:
        return None
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    device = torch.device(name)
    if device.type == "cuda":
        raise ValueError(f"--device {name}: under torchrun each process uses cuda:<LOCAL_RANK>; "
                         "pass --device cuda or auto")
    return device


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank's contiguous piece of ``n`` items; pieces differ in size by at most one."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class ShardedBatchLoader:
    """Rank ``rank``'s share of every global batch of a training
    :class:`~deepshift.training.data.loader.BatchLoader`.

    ``epoch(e, start)`` plays the role of ``DistributedSampler.set_epoch(e)``: the global order of
    epoch ``e`` is the one a single process sees, and this rank gets a contiguous, disjoint piece of
    each global batch. Yields ``(x, y, global_batch_size)``. In-memory datasets build the whole
    global batch (with the single-process augmentation) and slice it, so results do not depend on
    the world size; lazily decoded datasets (imagefolder) load only this rank's images, with an
    augmentation stream of their own per rank.
    """

    def __init__(self, loader, rank: int, world_size: int):
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0):
        from deepshift.training.data.loader import _mix

        loader = self.loader
        order, bs, ds = loader.order(epoch), loader.batch_size, loader.dataset
        in_memory = getattr(ds, "in_memory", False)
        for b in range(start, len(loader)):
            idx = order[b * bs:(b + 1) * bs]
            lo, hi = shard_bounds(len(idx), self.rank, self.world_size)
            if not loader.train:
                x, y = ds.get_batch(idx[lo:hi], False, None)
            elif in_memory:
                g = torch.Generator().manual_seed(_mix(loader.seed, epoch, b, 1))
                x, y = ds.get_batch(idx, True, g)
                x, y = x[lo:hi], y[lo:hi]
            else:
                g = torch.Generator().manual_seed(_mix(loader.seed, epoch, b, 1, self.rank))
                x, y = ds.get_batch(idx[lo:hi], True, g)
            yield x, y, len(idx)


def shard_eval_loader(loader, ctx: DistContext, batch_size: int | None = None):
    """A non-shuffled loader over this rank's contiguous slice of ``loader.dataset``."""
    from deepshift.training.data.loader import BatchLoader

    if not ctx.enabled:
        return loader
    lo, hi = shard_bounds(len(loader.dataset), ctx.rank, ctx.world_size)
    return BatchLoader(loader.dataset.subset(torch.arange(lo, hi)), batch_size or loader.batch_size,
                       train=False)


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64; identity in one process)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def on_main(ctx: DistContext, fn):
    """Run ``fn()`` on rank 0 only and hand every rank its result, or raise its exception everywhere.

    Keeps ranks in step when rank 0 alone reads files or checks the output folder: a one-line
    error on rank 0 becomes the same error on every rank instead of a hang.
    """
    if not ctx.enabled:
        return fn()
    payload: list = [None]
    if ctx.is_main:
        try:
            payload[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            payload[0] = ("error", exc)
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes (by name): equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t: Tensor = p.detach().to("cpu", copy=True).contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """The training module: ``model`` itself in one process, else a DDP wrapper (SyncBatchNorm first).

    Call it after :func:`deepshift.convert_` (the parametrized parameters must exist) and before
    ``torch.compile``. The wrapper shares ``model``'s parameters; save ``model.state_dict()`` (no
    ``module.`` prefix) so checkpoints load in one process.
    """
    if not ctx.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


__all__ = [
    "BACKENDS", "DistContext", "SINGLE", "ShardedBatchLoader", "all_gather_object", "all_reduce_sum",
    "env_world_size", "on_main", "parameter_digest", "rank_device", "setup", "shard_bounds",
    "shard_eval_loader", "shutdown", "teardown", "wrap_model",
]
