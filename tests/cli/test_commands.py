"""`deepshift export`, `deepshift report` and `deepshift eval --packed` on a real (tiny) run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import deepshift
from deepshift.cli import main
from deepshift.training.config import TrainConfig
from deepshift.training.loop import train

TINY = dict(data="digits", model="mnist-fc", epochs=1, batch_size=16, limit_train=160, quiet=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ps = train(TrainConfig(**TINY, method="ps", optimizer="radam", lr=0.01, out=str(root / "ps")))
    train(TrainConfig(**TINY, method="none", lr=0.05, out=str(root / "float")))
    return root, ps


def cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_export_packed_then_eval_packed_matches_the_run(capsys, runs, tmp_path):
    root, metrics = runs
    code, out, _ = cli(capsys, "export", root / "ps", "--format", "packed", "-o", tmp_path / "m.dshift",
                       "--act-bits", "16", "16")
    assert code == 0 and "6.40x" in out  # 5-bit codes vs float32
    code, out, _ = cli(capsys, "eval", "--packed", tmp_path / "m.dshift", "--data", "digits", "--json",
                       "--quiet")
    assert code == 0
    frozen = json.loads(out)
    # The frozen, integer-only model with 16.16 inputs classifies the test set like the run did.
    assert frozen["n"] > 0 and abs(frozen["top1"] - metrics["test_top1"]) <= 1.0


def test_export_integer_only_then_eval_and_report_it(capsys, runs, tmp_path):
    root, _ = runs
    frozen_file, int_file = tmp_path / "m.dshift", tmp_path / "int.dshift"
    assert cli(capsys, "export", root / "ps", "-o", frozen_file)[0] == 0
    code, out, _ = cli(capsys, "export", root / "ps", "--integer-only", "-o", int_file)
    assert code == 0 and "int.dshift" in out
    results = {}
    for name, path in (("frozen", frozen_file), ("integer", int_file)):
        code, out, _ = cli(capsys, "eval", "--packed", path, "--data", "digits", "--json", "--quiet")
        assert code == 0
        results[name] = json.loads(out)
    # mnist-fc has no BatchNorm: the integer-only model classifies exactly as the frozen one
    assert results["integer"]["n"] == results["frozen"]["n"] > 0
    assert abs(results["integer"]["top1"] - results["frozen"]["top1"]) <= 0.5
    code, out, _ = cli(capsys, "report", int_file, "--json")
    data = json.loads(out)
    assert code == 0 and data["float_mults_outside"] == 0 and data["float_adds_outside"] == 0
    assert data["shift_macs"] == 784 * 512 + 512 * 512 + 512 * 10
    code, _, err = cli(capsys, "export", root / "ps", "--integer-only", "--format", "onnx", "--onnx-mode",
                       "weights", "-o", tmp_path / "m.onnx")
    assert code == 2 and "--onnx-mode does not apply" in err and "\n" not in err
    if importlib.util.find_spec("onnxruntime") is not None:  # the int64 graph gives the same logits
        import onnxruntime

        code, out, _ = cli(capsys, "export", root / "ps", "--integer-only", "--format", "onnx", "-o",
                           tmp_path / "int.onnx")
        assert code == 0 and "int.onnx" in out
        x = torch.rand(5, 1, 28, 28)
        session = onnxruntime.InferenceSession(str(tmp_path / "int.onnx"), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = deepshift.load_packed(int_file)(x)
        assert torch.equal(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected)
    code, _, err = cli(capsys, "export", int_file, "-o", tmp_path / "again.dshift")
    assert code == 2 and "integer-only packed file already" in err


def test_export_onnx_and_report(capsys, runs, tmp_path):
    pytest.importorskip("onnx", reason="onnx is an optional extra")
    root, _ = runs
    code, out, _ = cli(capsys, "export", root / "ps" / "best.pt", "--format", "onnx",
                       "-o", tmp_path / "m.onnx")
    assert code == 0 and (tmp_path / "m.onnx").stat().st_size > 0 and "m.onnx" in out
    code, out, _ = cli(capsys, "report", root / "ps", "--json", "--plot", tmp_path / "h.png")
    assert code == 0
    data = json.loads(out)
    assert data["version"] == 2 and data["shift_macs"] == 784 * 512 + 512 * 512 + 512 * 10
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = cli(capsys, "report", root / "ps")
    assert code == 0 and "shift-adds" in out and "Horowitz" in out


@pytest.mark.parametrize("case", ["missing", "float_run", "corrupt", "no_data"])
def test_deploy_errors_are_one_line_exit_2(capsys, runs, tmp_path, case):
    root, _ = runs
    if case == "missing":
        argv, needle = ["export", tmp_path / "nope", "-o", tmp_path / "x.dshift"], "no such run"
    elif case == "float_run":
        argv, needle = ["report", root / "float"], "no shift layers"
    elif case == "corrupt":
        good = tmp_path / "good.dshift"
        assert cli(capsys, "export", root / "ps", "-o", good)[0] == 0
        bad = tmp_path / "bad.dshift"
        blob = bytearray(good.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        bad.write_bytes(bytes(blob))
        argv, needle = ["eval", "--packed", bad, "--data", "digits"], "checksum"
    else:
        argv, needle = ["eval", "--packed", tmp_path / "x.dshift"], "--data"
    code, _, err = cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_calibrate_writes_a_run_that_eval_export_and_report_accept(capsys, runs, tmp_path):
    root, _ = runs
    out = tmp_path / "q3"
    code, stdout, err = cli(capsys, "calibrate", root / "float", "--method", "q", "--weight-bits", "3",
                            "--calib-size", "48", "--iters", "20", "--channel-scales", "--out", out,
                            "--quiet")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calib_size"] == 48 and 0 <= metrics["val_top1"] <= 100
    assert metrics["channel_scales"] is True and metrics["iters"] == 20  # what made the run
    code, stdout, _ = cli(capsys, "eval", "--from", out / "best.pt", "--split", "val", "--json", "--quiet")
    assert code == 0 and abs(json.loads(stdout)["top1"] - metrics["val_top1"]) < 1e-9  # the same model
    code, folder, _ = cli(capsys, "eval", "--from", out, "--split", "val", "--json", "--quiet")  # run folder
    assert code == 0 and folder == stdout
    assert cli(capsys, "export", out, "-o", tmp_path / "m.dshift")[0] == 0
    code, stdout, _ = cli(capsys, "report", out)
    assert code == 0 and "shift-adds" in stdout
    assert json.loads((out / "config.json").read_text())["weight_bits"] == 3


@pytest.mark.parametrize("case", ["converted", "not_empty", "bad_size", "bad_shift"])
def test_calibrate_errors_are_one_line_exit_2(capsys, runs, tmp_path, case):
    root, _ = runs
    argv = ["calibrate", root / "float", "--out", tmp_path / "out", "--quiet"]
    if case == "converted":
        argv[1], needle = root / "ps", "not a float training run"
    elif case == "not_empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        needle = "not empty"
    elif case == "bad_size":
        argv += ["--calib-size", "0"]
        needle = "--calib-size"
    else:
        argv += ["--max-shift", "high"]
        needle = "--max-shift"
    code, _, err = cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    if case == "not_empty":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_finetune_bn_writes_a_run_whose_integer_only_form_has_nothing_left_to_round(capsys, tmp_path):
    run, out = tmp_path / "r20", tmp_path / "r20-bn1"
    train(TrainConfig(**{**TINY, "model": "resnet20", "limit_train": 64}, method="q", out=str(run)))
    code, _, err = cli(capsys, "finetune-bn", run, "--scale-terms", "1", "--steps", "6", "--out", out,
                       "--quiet")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["scale_terms"] == 1
    assert all(0 <= metrics[k] <= 100 for k in ("val_top1_before", "val_top1_rounded", "val_top1"))
    code, stdout, _ = cli(capsys, "eval", "--from", out / "best.pt", "--split", "val", "--json", "--quiet")
    assert code == 0 and abs(json.loads(stdout)["top1"] - metrics["val_top1"]) < 1e-9  # the same model
    files = {k: tmp_path / f"int{k}.dshift" for k in (1, 3)}
    for k, path in files.items():
        assert cli(capsys, "export", out, "--integer-only", "--scale-terms", k, "-o", path)[0] == 0
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(deepshift.load_packed(files[1])(x), deepshift.load_packed(files[3])(x))


@pytest.mark.parametrize("case", ["float_run", "no_batchnorm", "bad_steps", "bad_terms"])
def test_finetune_bn_errors_are_one_line_exit_2(capsys, runs, tmp_path, case):
    root, _ = runs
    argv = ["finetune-bn", root / "ps", "--out", tmp_path / "out", "--quiet"]
    needle = "no BatchNorm"
    if case == "float_run":
        argv[1], needle = root / "float", "not a converted training run"
    elif case == "bad_steps":
        argv, needle = argv + ["--steps", "0"], "--steps: steps must be"
    elif case == "bad_terms":
        argv, needle = argv + ["--scale-terms", "9"], "--scale-terms: scale_terms must be"
    code, _, err = cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()
