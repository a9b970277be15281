"""Whole models under onnxruntime: our exports against the float model's ONNX.

For each converted run folder it exports the frozen model (``deepshift.export_onnx``) in the
default mode (float32 calls proved exact) and in ``fixed_point_float64`` mode, and the integer-only
model (``deepshift.integer_only``); ``--float RUN`` gives the float model they were converted from,
exported with ``torch.onnx.export``. Each graph runs under onnxruntime (2 intra-op threads) at
batch 1 and 128, timed in blocks of its own (an idle session's threads spin after each run and
would slow the next one), blocks alternating over three rounds; medians. Before timing, each of our
graphs' logits on the batch are compared with the torch model's (frozen or integer-only): equal bit
for bit, or the script stops.

    .venv/bin/python benchmarks/onnx_models.py --float runs/r20-float runs/r20-q3 runs/r20-q5 [--seconds 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import deepshift
from deepshift.backends.cpu.machine import describe
from deepshift.formats.onnx import OnnxShiftLayer, exportable
from deepshift.training.data.datasets import load_dataset
from deepshift.training.data.loader import BatchLoader

BATCHES = (1, 128)


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_float(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"], output_names=["output"],
                          opset_version=17, dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          dynamo=False)


def timed(sessions: dict, x: np.ndarray, seconds: float, rounds: int = 3) -> dict:
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(2):
                s.run(None, {"input": x})
            end = time.perf_counter() + seconds / rounds
            while time.perf_counter() < end or len(times[name]) < 3:
                t = time.perf_counter()
                s.run(None, {"input": x})
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    from deepshift.cli.commands import load_source

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--float", dest="float_run", type=Path, required=True,
                   help="the float run the converted runs were made from")
    p.add_argument("--seconds", type=float, default=2.0, help="time each graph this long per batch size")
    args = p.parse_args(argv)
    print(describe().replace("ISA path", "our kernels' ISA path (not used by onnxruntime)"))
    print(f"onnxruntime {ort.__version__}, 2 intra-op threads, medians\n")
    print("| run | batch | float model's ONNX (ms) | ours, default (float32 calls) | "
          "ours, fixed_point_float64 | integer-only (int64) |")
    print("|---|---:|---:|---:|---:|---:|")
    calls_rows = []
    float_model, info = load_source(args.float_run)
    cfg = info["config"]
    splits = load_dataset(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.limit_train, cfg.image_size)
    x_all = next(iter(BatchLoader(splits.test, max(BATCHES), train=False)))[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_float(float_model, x_all[:1], tmp / "float.onnx")
        for run in args.runs:
            model, _ = load_source(run)
            frozen = deepshift.freeze_(copy.deepcopy(model).eval())
            integer = deepshift.integer_only(frozen, x_all[:8])
            # float32 calls per shift layer in the default mode (0: the layer takes the float64 form)
            calls = [len(m.groups) * (1 + m.plane_split) for m in exportable(frozen).modules()
                     if isinstance(m, OnnxShiftLayer)]
            calls_rows.append(f"| {run.name} | {len(calls)} | "
                              + ", ".join(f"{k}: {calls.count(k)}" for k in sorted(set(calls))) + " |")
            paths = {"float": tmp / "float.onnx"}
            for mode in ("fixed_point", "fixed_point_float64"):
                path = tmp / f"{run.name}-{mode}.onnx"
                paths[mode] = Path(deepshift.export_onnx(frozen, x_all[:1], path, mode=mode))
            paths["integer"] = Path(deepshift.export_onnx(integer, x_all[:1], tmp / f"{run.name}-int.onnx"))
            sessions = {name: session(path) for name, path in paths.items()}
            with torch.no_grad():
                logits = frozen(x_all)
                want = {"fixed_point": logits, "fixed_point_float64": logits, "integer": integer(x_all)}
            for name, expected in want.items():
                got = torch.from_numpy(sessions[name].run(None, {"input": x_all.numpy()})[0])
                if not torch.equal(got, expected):
                    raise SystemExit(f"{run.name} {name}: onnxruntime's logits differ from torch's "
                                     f"(max {(got - expected).abs().max():.3g})")
            for batch in BATCHES:
                t = timed(sessions, x_all[:batch].numpy(), args.seconds)
                f = t["float"]
                print(f"| {run.name} | {batch} | {1e3 * f:.2f} | {t['fixed_point'] / f:.2f}x | "
                      f"{t['fixed_point_float64'] / f:.2f}x | {t['integer'] / f:.2f}x |", flush=True)
    print("\n| run | shift layers | float32 calls per layer in the default mode (calls: layers) |")
    print("|---|---:|---|")
    print("\n".join(calls_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
