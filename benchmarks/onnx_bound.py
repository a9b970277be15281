"""What an exact shift layer costs under onnxruntime, per layer, against the float layer it replaces.

Issue 21 asks for our ONNX export of a frozen ResNet-20 to run within 1.5x the float model's ONNX.
A frozen layer computes, exactly, ``sum_i q_i * w_i`` with ``q`` the input rounded to (8, 8) fixed
point (16-bit integers) and ``w`` signed powers of two; the float model's layer is one fused
``Conv`` (BatchNorm folded in by onnxruntime) + ``Relu``. This script builds, for ResNet-20's three
layer shapes (Fashion-MNIST, 28x28), the fastest exact formulations in standard ONNX operators
that we found and times each against the float layer, side by side in one process (medians after
warm-up, 2 threads, each graph timed in blocks of its own):

* ``float``: ``Conv`` + ``Relu`` on float32 (the float model's layer, the baseline);
* ``convinteger``: the issue's suggestion: the 16-bit input split into two uint8 planes (high byte
  with zero point 128, low byte), two ``ConvInteger`` (int32 accumulation: exact for 3-bit weights,
  int8 ``+-2**k`` with k <= 3), combined in int32, scaled, BatchNorm, ``Relu``;
* ``2 float32 Convs on byte planes``: the same split as float32, one float ``Conv`` per plane
  (every sum below 2**24, so exact), combined in int32;
* ``matmulinteger``: the same split, im2col as slices + ``Concat`` in NHWC (no transposes: the
  layout stays NHWC from layer to layer, the most favourable case), two ``MatMulInteger``;
* ``matmulinteger, 8-bit input``: the same with an 8-bit input (one plane: a model trained with
  ``--act-bits`` of 8 in total), the least work any exact integer formulation can do;
* ``float64 im2col``: today's export (float64 ``MatMul`` over slices).

Each exact graph's output is checked against the exact result (float64 torch) before timing.

    .venv/bin/python benchmarks/onnx_bound.py [--seconds 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from deepshift.backends.cpu.machine import describe

OPSET = [helper.make_opsetid("", 17)]


class Graph:
    """A tiny builder: nodes, initialisers, fresh names."""

    def __init__(self) -> None:
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, dtype) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, *inputs: str, **attrs) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def session(self, x_shape, x_type, out: str) -> ort.InferenceSession:
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        return ort.InferenceSession(helper.make_model(graph, opset_imports=OPSET).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])


def quantize_split(g: Graph, x: str, bits: int) -> list[str]:
    """x (float32) -> q = clip(round(x * 2**8), lo, hi) as uint8 planes (high byte first, offset by
    128 so its zero point is 128; or one plane, offset by 128, for 8-bit input)."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = g.op("Clip", g.op("Round", g.op("Mul", x, g.const(256.0, np.float32))),
             g.const(lo, np.float32), g.const(hi, np.float32))
    u = g.op("Add", q, g.const(-lo, np.float32))  # 0 .. 2**bits - 1
    if bits == 8:
        return [g.op("Cast", u, to=TensorProto.UINT8)]
    high = g.op("Floor", g.op("Mul", u, g.const(1 / 256, np.float32)))
    low = g.op("Sub", u, g.op("Mul", high, g.const(256.0, np.float32)))
    return [g.op("Cast", high, to=TensorProto.UINT8), g.op("Cast", low, to=TensorProto.UINT8)]


def epilogue(g: Graph, acc: str, scale: float, channel_axis: int, c: int) -> str:
    """int32 accumulator -> float32 (one rounding), the scale, BatchNorm (Mul, Add), Relu."""
    shape = [1] * 4
    shape[channel_axis] = c
    y = g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), g.const(scale, np.float32))
    bn_scale = g.const(np.full(shape, 0.9), np.float32)
    bn_shift = g.const(np.full(shape, 0.1), np.float32)
    return g.op("Relu", g.op("Add", g.op("Mul", y, bn_scale), bn_shift))


def combine(g: Graph, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return g.op("Add", g.op("Mul", parts[0], g.const(256, np.int32)), parts[1])


def float_layer(w: np.ndarray) -> tuple[Graph, str]:
    g = Graph()
    return g, g.op("Relu", g.op("Conv", "x", g.const(w, np.float32), pads=[1, 1, 1, 1]))


def convinteger_layer(w_int: np.ndarray, bits: int) -> tuple[Graph, str]:
    g = Graph()
    planes = quantize_split(g, "x", bits)
    wname = g.const(w_int, np.int8)
    accs = []
    for i, p in enumerate(planes):
        zp = 128 if i == 0 else 0
        padded = g.op("Pad", p, g.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64), g.const(zp, np.uint8))
        accs.append(g.op("ConvInteger", padded, wname, g.const(zp, np.uint8)))
    return g, epilogue(g, combine(g, accs), 2.0**-11, 1, w_int.shape[0])


def float_planes_layer(w_int: np.ndarray) -> tuple[Graph, str]:
    """Two float32 Convs, one per byte plane (each sum exact: < 2**24), combined in int32."""
    g = Graph()
    high, low = quantize_split(g, "x", 16)
    wname = g.const(w_int, np.float32)
    high = g.op("Sub", g.op("Cast", high, to=TensorProto.FLOAT), g.const(128.0, np.float32))
    accs = [g.op("Cast", g.op("Conv", g.op("Cast", p, to=TensorProto.FLOAT) if p == low else p, wname,
                              pads=[1, 1, 1, 1]), to=TensorProto.INT32) for p in (high, low)]
    return g, epilogue(g, combine(g, accs), 2.0**-11, 1, w_int.shape[0])


def matmulinteger_layer(w_int: np.ndarray, bits: int, hw: int) -> tuple[Graph, str]:
    """NHWC in, NHWC out."""
    g = Graph()
    planes = quantize_split(g, "x", bits)
    cout, cin = w_int.shape[:2]
    wmat = g.const(w_int.transpose(2, 3, 1, 0).reshape(9 * cin, cout), np.int8)  # (kh, kw, cin) x cout
    accs = []
    for i, p in enumerate(planes):
        zp = 128 if i == 0 else 0
        padded = g.op("Pad", p, g.const([0, 1, 1, 0, 0, 1, 1, 0], np.int64), g.const(zp, np.uint8))
        cols = [g.op("Slice", padded, g.const([dy, dx], np.int64), g.const([dy + hw, dx + hw], np.int64),
                     g.const([1, 2], np.int64)) for dy in range(3) for dx in range(3)]
        col = g.op("Concat", *cols, axis=3)
        accs.append(g.op("MatMulInteger", col, wmat, g.const(zp, np.uint8)))
    return g, epilogue(g, combine(g, accs), 2.0**-11, 3, cout)


def float64_layer(w: np.ndarray, hw: int) -> tuple[Graph, str]:
    """Today's export: quantise, pad, slices + Concat, float64 MatMul (NCHW)."""
    g = Graph()
    q = g.op("Clip", g.op("Round", g.op("Mul", "x", g.const(256.0, np.float32))),
             g.const(-32768, np.float32), g.const(32767, np.float32))
    x = g.op("Cast", g.op("Mul", q, g.const(1 / 256, np.float32)), to=TensorProto.DOUBLE)
    padded = g.op("Pad", x, g.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    cols = [g.op("Slice", padded, g.const([dy, dx], np.int64), g.const([dy + hw, dx + hw], np.int64),
                 g.const([2, 3], np.int64)) for dy in range(3) for dx in range(3)]
    col = g.op("Reshape", g.op("Concat", *cols, axis=1), g.const([0, 9 * w.shape[1], hw * hw], np.int64))
    taps = np.stack([w[:, :, dy, dx] for dy in range(3) for dx in range(3)], 1)  # matches Concat's order
    wmat = g.const(taps.reshape(w.shape[0], -1), np.float64)
    y = g.op("Reshape", g.op("MatMul", wmat, col), g.const([0, w.shape[0], hw, hw], np.int64))
    y = g.op("Cast", y, to=TensorProto.FLOAT)
    shape = [1, w.shape[0], 1, 1]
    return g, g.op("Relu", g.op("Add", g.op("Mul", y, g.const(np.full(shape, 0.9), np.float32)),
                                g.const(np.full(shape, 0.1), np.float32)))


def timed(sessions: dict, feeds: dict, seconds: float, rounds: int = 3) -> dict:
    """Median seconds per run of each session. Each is timed in blocks of its own (an idle
    onnxruntime session's threads spin for a while after each run and would slow the next session
    down), blocks alternating over ``rounds`` rounds so that drift hits every graph alike."""
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(3):
                s.run(None, feeds[name])
            end = time.perf_counter() + seconds / rounds
            while time.perf_counter() < end or len(times[name]) < 5:
                t = time.perf_counter()
                s.run(None, feeds[name])
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t)) for name, t in times.items()}


def exact(x: np.ndarray, w_int: np.ndarray, bits: int) -> np.ndarray:
    """The frozen layer's exact output (before BatchNorm) in float64, NCHW."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.from_numpy(np.clip(np.round(x.astype(np.float64) * 256), lo, hi))
    acc = F.conv2d(q, torch.from_numpy(w_int.astype(np.float64)), padding=1)
    return (acc.float() * 2.0**-11).numpy()  # float32 of the exact integer (one rounding), scaled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.0)
    args = p.parse_args()
    print(describe().replace("ISA path", "our kernels' ISA path (not used here)"))
    print(f"onnxruntime {ort.__version__}, 2 threads; 3-bit weights (+-2**k, k = 0..3, in units of 2**-3),"
          " (8, 8) fixed-point input unless said\n")
    print("| layer | batch | float Conv+Relu (ms) | ConvInteger | 2 float32 Convs on byte planes | "
          "MatMulInteger NHWC | MatMulInteger NHWC, 8-bit input | float64 im2col (today) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = ("convinteger", "planes", "mmi", "mmi8", "f64")
    totals = {batch: dict.fromkeys(("float", *names), 0.0) for batch in (1, 128)}
    rng = np.random.default_rng(0)
    for c, hw in ((16, 28), (32, 14), (64, 7)):
        w_int = (rng.choice([-1, 1], (c, c, 3, 3)) * 2 ** rng.integers(0, 4, (c, c, 3, 3))).astype(np.int8)
        w = w_int.astype(np.float32) * 2.0**-3
        for batch in (1, 128):
            x = (rng.standard_normal((batch, c, hw, hw)) * 4).astype(np.float32)
            x8 = (rng.standard_normal((batch, c, hw, hw)) * 0.1).astype(np.float32)  # within 8 bits
            nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            nhwc8 = np.ascontiguousarray(x8.transpose(0, 2, 3, 1))
            graphs = {"float": (float_layer(w), x), "convinteger": (convinteger_layer(w_int, 16), x),
                      "planes": (float_planes_layer(w_int), x),
                      "mmi": (matmulinteger_layer(w_int, 16, hw), nhwc),
                      "mmi8": (matmulinteger_layer(w_int, 8, hw), nhwc8), "f64": (float64_layer(w, hw), x)}
            sessions, feeds = {}, {}
            for name, ((g, out), xin) in graphs.items():
                sessions[name] = g.session(list(xin.shape), TensorProto.FLOAT, out)
                feeds[name] = {"x": xin}
            ref = np.maximum(exact(x, w_int, 16) * np.float32(0.9) + np.float32(0.1), 0)
            ref8 = np.maximum(exact(x8, w_int, 8) * np.float32(0.9) + np.float32(0.1), 0)
            checks = {"planes": (sessions["planes"].run(None, feeds["planes"])[0], ref),
                      "convinteger": (sessions["convinteger"].run(None, feeds["convinteger"])[0], ref),
                      "mmi": (sessions["mmi"].run(None, feeds["mmi"])[0].transpose(0, 3, 1, 2), ref),
                      "mmi8": (sessions["mmi8"].run(None, feeds["mmi8"])[0].transpose(0, 3, 1, 2), ref8)}
            for name, (got, want) in checks.items():
                if not np.array_equal(got, want):
                    raise SystemExit(f"{name}: not exact (max diff {np.abs(got - want).max()})")
            t = timed(sessions, feeds, args.seconds)
            f = t["float"]
            for name in totals[batch]:
                totals[batch][name] += t[name]
            print(f"| {c}x{hw}x{hw} 3x3 | {batch} | {1e3 * f:.3f} | "
                  + " | ".join(f"{t[n] / f:.2f}x" for n in names) + " |", flush=True)
    for batch, tot in totals.items():  # ResNet-20's 18 3x3 convs: 6 of each shape
        f = tot["float"]
        print(f"| the three together (ResNet-20's 3x3 convs, 6 of each) | {batch} | {6e3 * f:.3f} | "
              + " | ".join(f"{tot[n] / f:.2f}x" for n in names) + " |")


if __name__ == "__main__":
    main()
