"""Distributed training: 2 gloo processes on CPU under torchrun equal one process with the same global batch.

One torchrun launch (2 processes) runs the real CLI (``deepshift.cli.commands.main``) several times in a row:
float, PS and Q training, and a resume of a single-process run. The single-process references run in
this process. A second, plain ``torchrun -m deepshift train`` launch checks the user-facing command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepshift.training.checkpoint import load_checkpoint
from deepshift.training.config import TrainConfig, build_run_model
from deepshift.training.data.datasets import load_dataset
from deepshift.training.data.loader import BatchLoader
from deepshift.training.distributed import (
    DistContext,
    ShardedBatchLoader,
    parameter_digest,
    shard_bounds,
    shard_eval_loader,
)
from deepshift.training.evaluate import evaluate_checkpoint
from deepshift.training.loop import resume, train

SRC = str(Path(__file__).resolve().parents[2] / "src")
# No dropout or BatchNorm (mnist-conv), 85 training examples: global batches 32, 32, 21 (the last one
# splits unevenly, 11 + 10, which checks the global-mean weighting of the loss).
BASE = dict(data="digits", model="mnist-conv", limit_train=95, batch_size=32, epochs=1, quiet=True,
            device="cpu")
RUNS = {"none": dict(optimizer="sgd", lr=0.05), "ps": dict(method="ps", optimizer="radam", lr=0.01),
        "q": dict(method="q", optimizer="sgd", lr=0.05, momentum=0.9)}
RUN_FILES = {"config.json", "metrics.csv", "metrics.json", "last.pt", "best.pt", "curves.png"}

# Runs several CLI commands in one pair of processes (saves the start-up of torch per launch). The
# process group is created once here: train() then uses it as it finds it (and leaves it alone).
# deepshift is imported before init_process_group, and the group is shut down with
# deepshift's shutdown (barrier, then destroy), also after a failing command: a group left to
# interpreter shutdown aborts a rank now and then ("terminate called without an active exception").
DRIVER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from deepshift.cli import main
    from deepshift.training.distributed import shutdown
    dist.init_process_group("gloo")
    code = 0
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            break
    shutdown()
    sys.exit(code)
""")


def _argv(cfg: dict, out: Path) -> list[str]:
    argv = ["train", "--out", str(out)]
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = _params(a), _params(b)
    assert sa.keys() == sb.keys()
    assert not any(k.startswith("module.") for k in sa)
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    single, dist = root / "single", root / "dist"
    single.mkdir()
    dist.mkdir()
    for name, extra in RUNS.items():
        train(TrainConfig(**BASE, **extra, out=str(single / name)))
    # A language model: its loss averages over every position of every window of the global batch.
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} tells of item {i * 7 % 13}." for i in range(300)))
    lm = dict(data="text", data_dir=str(text), model="char-transformer", limit_train=21, batch_size=8,
              epochs=1, quiet=True, device="cpu", optimizer="sgd", lr=0.05)  # SGD: loss scale matters
    train(TrainConfig(**lm, out=str(single / "lm")))
    (root / "driver.py").write_text(DRIVER)
    argvs = [_argv({**BASE, **extra, "quiet": False}, dist / name) for name, extra in RUNS.items()]
    argvs.append(_argv(lm, dist / "lm"))
    argvs.append(["train", "--resume", str(root / "s2d"), "--epochs", "2", "--device", "cpu"])
    # A single-process run that 2 processes will resume (single -> distributed).
    shutil.copytree(single / "none", root / "s2d")
    proc = _torchrun(str(root / "driver.py"), json.dumps(argvs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_equal_one_process_and_each_other(runs, name):
    """Criteria 1 and 2: identical replicas, and within 1e-5 of one process with the same global batch."""
    root, _ = runs
    out = root / "dist" / name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    d0, d1 = metrics["replica_digests"]  # each rank hashed its own parameters at the end of training
    assert d0 == d1
    ckpt = load_checkpoint(out / "last.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_run_model(cfg.model, 10, 1, cfg.shift_config(), cfg.shift_depth)
    model.load_state_dict(ckpt["model"])
    assert parameter_digest(model) == d0  # ... and the checkpoint holds exactly those parameters
    if name == "ps":
        assert any(k.endswith("original1") for k in ckpt["model"])  # PS sign parameters were trained
    diff = _max_diff(out / "last.pt", root / "single" / name / "last.pt")
    assert diff < 1e-5, diff


def test_language_model_two_processes_equal_one_process(runs):
    """Per-position loss weighting across ranks (21 windows: global batches 8, 8, 5, split unevenly)."""
    root, _ = runs
    metrics = json.loads((root / "dist" / "lm" / "metrics.json").read_text())
    d0, d1 = metrics["replica_digests"]
    assert d0 == d1 and metrics["world_size"] == 2
    single = json.loads((root / "single" / "lm" / "metrics.json").read_text())
    assert metrics["test_perplexity"] == pytest.approx(single["test_perplexity"], rel=1e-5)
    diff = _max_diff(root / "dist" / "lm" / "last.pt", root / "single" / "lm" / "last.pt")
    assert diff < 1e-5, diff


@pytest.mark.parametrize("name", list(RUNS))
def test_distributed_eval_equals_single_process_eval(runs, name):
    """Criterion 3: the sharded, all-reduced test accuracy is the one-process accuracy of best.pt."""
    root, _ = runs
    out = root / "dist" / name
    metrics = json.loads((out / "metrics.json").read_text())
    got = evaluate_checkpoint(out / "best.pt", device="cpu")
    n_test = len(load_dataset("digits").test)
    assert got["n"] == metrics["test_examples"] == n_test  # every example counted once, none padded
    assert got["top1"] == metrics["test_top1"] and got["top5"] == metrics["test_top5"]
    assert abs(got["loss"] - metrics["test_loss"]) < 1e-5


def test_one_progress_stream_one_output_folder(runs):
    """Criterion 4: rank 0 alone prints and writes."""
    root, proc = runs
    lines = proc.stdout.splitlines()
    # Three fresh runs of 1 epoch: one line each, not two (the resumed run keeps its saved --quiet).
    assert sum(line.startswith("epoch 1/1 ") for line in lines) == 3, proc.stdout
    assert sum(line.startswith("test top-1") for line in lines) == 3, proc.stdout
    assert {p.name for p in (root / "dist").iterdir()} == set(RUNS) | {"lm"}  # lm: a --quiet run
    for name in [*RUNS, "lm"]:
        assert {p.name for p in (root / "dist" / name).iterdir()} == RUN_FILES


def test_resume_across_world_sizes(runs, tmp_path):
    """Checkpoints carry no ``module.`` prefix; --resume works 1 -> 2 and 2 -> 1 processes."""
    root, _ = runs
    reference = train(TrainConfig(**{**BASE, "epochs": 2}, **RUNS["none"], out=str(tmp_path / "ref")))
    # 1 process for epoch 1, 2 processes for epoch 2 (done in the torchrun launch).
    assert _max_diff(root / "s2d" / "last.pt", tmp_path / "ref" / "last.pt") < 1e-5
    s2d = json.loads((root / "s2d" / "metrics.json").read_text())
    assert s2d["world_size"] == 2 and s2d["epochs"] == 2
    # 2 processes for epoch 1, 1 process for epoch 2.
    shutil.copytree(root / "dist" / "none", tmp_path / "d2s")
    resumed = resume(tmp_path / "d2s", epochs=2)
    assert resumed["world_size"] == 1
    assert _max_diff(tmp_path / "d2s" / "last.pt", tmp_path / "ref" / "last.pt") < 1e-5
    assert resumed["epochs"] == reference["epochs"] == 2


def test_torchrun_module_entry_point(tmp_path):
    """The documented command: ``torchrun --nproc_per_node=2 -m deepshift train ...``."""
    proc = _torchrun("-m", "deepshift", "train", *_argv({**BASE, "quiet": False}, tmp_path / "run")[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("test top-1") for line in proc.stdout.splitlines()) == 1, proc.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"run"}
    assert {p.name for p in (tmp_path / "run").iterdir()} == RUN_FILES
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------- sharding, no processes needed


def test_shards_partition_every_global_batch():
    splits = load_dataset("digits", limit_train=95)
    loader = BatchLoader(splits.train, 32, train=True, seed=3)
    for world in (2, 3):
        shards = [list(ShardedBatchLoader(loader, r, world).epoch(1)) for r in range(world)]
        for b, (x, y) in enumerate(loader.epoch(1)):
            pieces = [shards[r][b] for r in range(world)]
            assert all(n == len(y) for _, _, n in pieces)
            assert torch.equal(torch.cat([p[0] for p in pieces]), x)
            assert torch.equal(torch.cat([p[1] for p in pieces]), y)
            assert max(len(p[1]) for p in pieces) - min(len(p[1]) for p in pieces) <= 1
        resumed = list(ShardedBatchLoader(loader, 1, world).epoch(1, start=2))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, shards[1][2:], strict=True))


def test_eval_shards_are_disjoint_and_cover_the_set():
    assert [shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [shard_bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    splits = load_dataset("digits", limit_train=95)
    full = BatchLoader(splits.test, 32, train=False)
    ys = [torch.cat([y for _, y in shard_eval_loader(full, DistContext(rank=r, world_size=3)).epoch(0)])
          for r in range(3)]
    assert sum(len(y) for y in ys) == len(splits.test)
    assert torch.equal(torch.cat(ys), splits.test.labels)


_THREADS = textwrap.dedent("""
    import os, sys, tempfile
    import torch, torch.distributed as dist
    from torch import nn
    from deepshift.training.distributed import shutdown

    def threads():
        return len(os.listdir("/proc/self/task"))

    def train_step():  # as train() does: the DDP model is gone when the group is shut down
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))  # imports torch.distributed.nn
        ddp(torch.ones(1, 3)).sum().backward()
        t = torch.ones(4)
        dist.all_reduce(t)

    before = threads()
    store = tempfile.mktemp()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    train_step()
    assert threads() > before  # gloo's worker threads
    shutdown()
    print(before, threads())
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_shutdown_joins_the_process_groups_threads():
    """The cause of a rare abort at exit ("terminate called without an active exception"): a group
    kept alive by torch.distributed.nn's default arguments still had gloo threads running into
    interpreter shutdown. After shutdown() they are gone."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _THREADS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(int, proc.stdout.split())
    assert after <= before, (before, after)
