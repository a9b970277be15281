"""Training loop, checkpoints, metrics, exact resume after SIGKILL, and the CLI's error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepshift.cli import main
from deepshift.training.config import CheckpointError, ConfigError, OutputExistsError, TrainConfig
from deepshift.training.evaluate import evaluate_checkpoint
from deepshift.training.loop import lr_factor, train

SRC = str(Path(__file__).resolve().parents[2] / "src")
# Tiny but real: the paper's FC model on 160 digits, 2 epochs of 10 steps.
# The loop's machinery, not a recipe, is under test: plain SGD without a schedule (so that epochs
# add up: 1 + 1 epochs equal a 2-epoch run).
TINY = dict(data="digits", model="mnist-fc", epochs=2, batch_size=16, limit_train=160, quiet=True,
            optimizer="sgd", lr_schedule="none")


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("float_run")
    metrics = train(TrainConfig(**TINY, out=str(out), lr=0.05))
    return out, metrics


def test_run_writes_every_output(float_run):
    out, metrics = float_run
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.csv", "metrics.json", "last.pt",
                                               "best.pt", "curves.png"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["lr"] == 0.05 and cfg["train"]["momentum"] == 0.0  # recipe filled in
    assert cfg["deepshift_version"] and cfg["zoo_spec"]["name"] == "mnist-fc"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_top1,val_loss,val_top1") and len(rows) == 3
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test_top1", "test_top5", "val_top1", "epochs", "seconds", "parameters"):
        assert key in saved
    assert saved["test_top1"] > 30  # it learned something in 20 steps (chance is 10%)
    ckpt = torch.load(out / "best.pt", weights_only=True)  # only plain types inside
    assert ckpt["config"]["model"] == "mnist-fc" and "model" in ckpt and "optimizer" in ckpt
    assert not list(out.glob("*.tmp"))  # atomic writes left no temporaries


def test_eval_reproduces_test_top1_exactly(float_run, capsys):
    out, metrics = float_run
    assert evaluate_checkpoint(out / "best.pt", device="cpu")["top1"] == metrics["test_top1"]
    assert main(["eval", "--from", str(out / "best.pt"), "--json", "--quiet", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["top1"] == metrics["test_top1"] and printed["top5"] == metrics["test_top5"]


def test_from_pretrained_then_ps_and_q(float_run, tmp_path):
    out, _ = float_run
    for method, opt in (("ps", "radam"), ("q", "sgd")):
        m = train(TrainConfig(**{**TINY, "epochs": 1, "optimizer": opt}, method=method, act_bits=(16, 16),
                              from_checkpoint=str(out / "best.pt"), out=str(tmp_path / method)))
        assert m["shift_weights"] > 0 and m["test_top1"] > 30
        got = evaluate_checkpoint(tmp_path / method / "best.pt", device="cpu")
        assert got["top1"] == m["test_top1"]


def test_lr_schedules_are_pure_functions_of_epoch():
    cfg = TrainConfig(data="cifar10").resolved()
    assert (cfg.lr, cfg.epochs, cfg.lr_milestones) == (0.1, 200, [80, 120, 160, 180])
    assert [round(lr_factor(cfg, e), 6) for e in (0, 79, 80, 120, 199)] == [1, 1, 0.1, 0.01, 0.0001]
    pre = TrainConfig(data="cifar10", from_checkpoint="x.pt").resolved()
    assert (pre.lr, pre.epochs, pre.lr_schedule, pre.lr_step) == (1e-3, 15, "step", 5)
    cos = TrainConfig(data="digits", lr_schedule="cosine", epochs=4).resolved()
    assert lr_factor(cos, 0) == 1.0 and abs(lr_factor(cos, 2) - 0.5) < 1e-12


def test_config_errors():
    with pytest.raises(ConfigError, match="weight_bits"):
        TrainConfig(data="digits", method="ps", weight_bits=9).resolved()
    with pytest.raises(ConfigError, match="unknown dataset"):
        TrainConfig(data="svhn").resolved()
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(data="digits", optimizer="lion").resolved()


# ---------------------------------------------------------------- exact resume after SIGKILL

KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from deepshift.training import TrainConfig, train
    calls = {"n": 0}
    step = torch.optim.SGD.step
    def killing_step(self, *a, **k):
        # SIGKILL the whole process at the KILL_AT-th optimizer step: no cleanup runs.
        calls["n"] += 1
        if calls["n"] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **k)
    torch.optim.SGD.step = killing_step
    train(TrainConfig(**eval(os.environ["CFG"])))
""")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    # Dropout (mnist-fc), momentum and PS stochastic rounding all consume state that must be restored.
    cfg = dict(TINY, method="ps", rounding="stochastic", momentum=0.9, lr=0.02, checkpoint_every=3)
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", KILL_AT="15",
               CFG=repr(dict(cfg, out=str(tmp_path / "killed"))))
    proc = subprocess.run([sys.executable, "-c", KILLER], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # really killed by SIGKILL
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 3)  # 10 steps/epoch: killed inside epoch 2

    resumed = subprocess.run([sys.executable, "-m", "deepshift", "train", "--resume",
                              str(tmp_path / "killed"), "--quiet"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the subprocesses
    try:
        reference = train(TrainConfig(**cfg, out=str(tmp_path / "straight")))
    finally:
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    resumed_metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed_metrics["test_top1"] == reference["test_top1"]
    drop = ("seconds", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b["history"]]


# ---------------------------------------------------------------- bad input: one line, exit 2


def _run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["train", "--model", "resnet21"], "resnet21"),
    (["train", "--data", "svhn"], "svhn"),
    (["train", "--method", "x"], "--method"),
    (["train", "--weight-bits", "9", "--method", "q"], "weight_bits"),
    (["train", "--act-bits", "0", "4", "--method", "q"], "act_bits"),
    (["train", "--lr", "-1"], "learning rates"),
    (["train", "--data", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["train", "--data", "cifar10"], "--data-dir"),
    (["eval", "--from", "/nonexistent/best.pt"], "not found"),
    (["train", "--resume", "/nonexistent/run"], "config.json"),
])
def test_bad_input_one_line_exit_2(capsys, tmp_path, argv, needle):
    code, err = _run_cli(capsys, *argv, *([] if argv[0] == "eval" or "--resume" in argv
                                          else ["--out", str(tmp_path / "o"), "--quiet"]))
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()  # nothing was written


def test_corrupt_data_file_exit_2(capsys, tmp_path):
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # says 9 bytes, has 3
    code, err = _run_cli(capsys, "train", "--data", "mnist", "--data-dir", str(tmp_path), "--out",
                         str(tmp_path / "o"))
    assert code == 2 and "truncated" in err and len(err.splitlines()) == 1


def test_checkpoints_are_protected(capsys, float_run, tmp_path):
    out, metrics = float_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A non-empty --out is refused without --resume / --overwrite.
    code, err = _run_cli(capsys, "train", "--data", "digits", "--out", str(out), "--quiet")
    assert code == 2 and "--resume" in err
    # --from with another architecture is refused before anything is written.
    code, err = _run_cli(capsys, "train", "--data", "digits", "--model", "mnist-conv", "--method", "q",
                         "--from", str(out / "best.pt"), "--out", str(tmp_path / "x"))
    assert code == 2 and "does not fit" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    # A truncated checkpoint: for --from, for eval and for --resume.
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "config.json").write_bytes((out / "config.json").read_bytes())
    (broken / "last.pt").write_bytes((out / "last.pt").read_bytes()[:1000])
    for argv in (["train", "--data", "digits", "--method", "q", "--from", str(broken / "last.pt"),
                  "--out", str(tmp_path / "y")],
                 ["eval", "--from", str(broken / "last.pt")],
                 ["train", "--resume", str(broken)]):
        code, err = _run_cli(capsys, *argv)
        assert code == 2 and "truncated" in err and len(err.splitlines()) == 1, err
    assert (broken / "last.pt").stat().st_size == 1000  # resume did not replace it
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OutputExistsError):
        train(TrainConfig(**TINY, out=str(out)))
    with pytest.raises(CheckpointError):
        evaluate_checkpoint(broken / "last.pt")


def test_module_entry_point_help_and_bad_option():
    env = dict(os.environ, PYTHONPATH=SRC)
    ok = subprocess.run([sys.executable, "-m", "deepshift", "train", "--help"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "--act-bits" in ok.stdout and "--resume" in ok.stdout


def test_unknown_option_exit_2(capsys):
    code, err = _run_cli(capsys, "train", "--no-such-option")
    assert code == 2 and len(err.splitlines()) == 1 and "--no-such-option" in err


def test_compare_prints_table(capsys, tmp_path):
    argv = ["compare", "--data", "digits", "--model", "mnist-fc", "--epochs", "1", "--limit-train", "64",
            "--batch-size", "32", "--optimizer", "radam", "--lr", "0.001", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["method", "test", "top-1"]
    assert [line.split()[0] for line in table[2:]] == ["float", "Q", "PS"]
    assert {p.name for p in tmp_path.iterdir()} == {"float", "q", "ps"}


def test_optimizer_groups_and_lr_shift():
    from deepshift.models import build_model
    from deepshift.training.config import build_run_model
    from deepshift.training.loop import make_optimizer

    cfg = TrainConfig(data="digits", method="ps", optimizer="radam", lr=1e-3, lr_shift=1e-2, lr_sign=5e-3,
                      weight_decay=1e-4).resolved()
    model = build_run_model("mnist-fc", 10, 1, cfg.shift_config(), None)
    opt = make_optimizer(cfg, model)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups} == {
        "params": (1e-3, 1e-4), "shift": (1e-2, 0.0), "sign": (5e-3, 0.0)}
    # For float (and Q) models the PS-only learning rates change nothing: one recipe serves all methods.
    float_opt = make_optimizer(cfg, build_model("mnist-fc"))
    assert [(g["name"], g["lr"]) for g in float_opt.param_groups] == [("params", 1e-3)]


def test_resume_can_extend_a_finished_run(float_run, tmp_path):
    from deepshift.training.loop import resume

    out, metrics = float_run
    train(TrainConfig(**{**TINY, "epochs": 1}, out=str(tmp_path), lr=0.05))
    extended = resume(tmp_path, epochs=2)
    # No schedule: 1 epoch + 1 more epoch is the 2-epoch run, bit for bit.
    a = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert extended["test_top1"] == metrics["test_top1"] and extended["epochs"] == 2
    with pytest.raises(ConfigError, match="already done"):
        resume(tmp_path, epochs=1)


def test_default_recipe_per_method_and_start():
    ps = TrainConfig(data="digits", method="ps").resolved()
    assert (ps.optimizer, ps.lr, ps.lr_shift, ps.lr_sign, ps.max_shift) == ("radam", 0.01, 0.05, 0.05, "auto")
    q = TrainConfig(data="fashion-mnist", method="q", weight_bits=2).resolved()
    assert (q.optimizer, q.lr, q.lr_schedule, q.epochs, q.max_shift) == ("radam", 1e-3, "cosine", 10, "auto")
    small = TrainConfig(data="digits", method="q").resolved()
    assert (small.epochs, small.lr) == (30, 3e-3)  # a small set: more epochs, a faster rate
    fine = TrainConfig(data="digits", method="ps", from_checkpoint="x.pt").resolved()
    assert (fine.optimizer, fine.lr, fine.lr_shift, fine.lr_sign, fine.epochs) == (
        "radam", 1e-3, 5e-3, 5e-3, 3)
    # What the user gives wins; the other PS rate still follows lr.
    given = TrainConfig(data="digits", method="ps", optimizer="adam", lr=0.1, lr_sign=0.2,
                        max_shift=0).resolved()
    assert (given.optimizer, given.lr, given.lr_shift, given.lr_sign, given.max_shift) == (
        "adam", 0.1, 0.5, 0.2, 0)
    assert TrainConfig(data="cifar10").resolved().optimizer == "sgd"  # the paper's CIFAR recipe
    assert TrainConfig(data="digits").resolved().lr_shift is None  # float: no PS rates


def test_ps_run_from_scratch_starts_from_the_papers_init(tmp_path):
    # A learning rate too small to move anything: last.pt holds the initial parameters.
    train(TrainConfig(**{**TINY, "epochs": 1}, method="ps", lr=1e-12, out=str(tmp_path)))
    state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    for layer in ("fc1", "fc2", "fc3"):
        shift = state[f"{layer}.parametrizations.weight.original0"]
        sign = state[f"{layer}.parametrizations.weight.original1"]
        top = int(state[f"{layer}.parametrizations.weight.0.max_shift"])
        assert float((shift - shift.round()).abs().mean()) > 0.2  # not the exact conversion
        assert top - 14.5 <= float(shift.min()) and float(shift.max()) <= top + 0.5
        assert 0.45 < float((sign.abs() < 0.5).float().mean()) < 0.55


@pytest.mark.parametrize("value, message", [("sometimes", "must be 'auto' or an integer"),
                                            ("99", "max_shift=99 is out of range")])
def test_cli_rejects_a_bad_max_shift(value, message, capsys, tmp_path):
    argv = ["train", "--data", "digits", "--method", "ps", "--max-shift", value, "--out", str(tmp_path / "r")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own type check
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was written
