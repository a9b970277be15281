"""CPU kernel benchmark: frozen shift layers / models vs torch float32 and torch int8 dynamic quantization.

Run: ``.venv/bin/python benchmarks/kernels.py [--threads 2] [--seconds 1.5] [--quick]``

Everything is measured in one process with ``torch.set_num_threads`` fixed; each time is the median
of repeated runs after warm-up, the candidates of a case run interleaved (round-robin) so that they
see the same load on a shared machine; the fastest run of each is printed too. Ratios are
ours / baseline (< 1 means we are faster).

* "frozen": the frozen module's forward as a user calls it (float in, float out): one op per layer,
  ``deepshift::frozen_conv`` / ``frozen_linear``, whose CPU kernel is one fused native call (input
  rounding inside the kernel's table build, output scaling per image while in cache);
* "via op": the same module with the fused call switched off, so each layer's op composes the
  smaller ops as its reference does (a native rounding pass, ``shift_conv``/``shift_linear`` with
  its per-call range check, a native scaling pass); results identical to "frozen" (asserted);
* "op": the raw ``torch.ops.deepshift.*`` calls on pre-quantized integer inputs (for a whole model,
  every shift layer's op on its input captured from one forward).

Whole models (CIFAR ResNet-20 at batch 128 and 1, ImageNet ResNet-50 at batch 1 and 32; random
weights: the time does not depend on them): the "fused" rows time, as "frozen", the frozen model's
``deepshift.fuse_frozen`` copy (each BatchNorm, and the residual add and ReLU after it, applied
inside the conv before them while its output is in cache; same numbers, asserted), against the
float model as is, with its BatchNorms folded into the conv weights
(``torch.fx.experimental.optimization.fuse``, which shift weights cannot do: they must stay powers
of two), and against onnxruntime running the float model's ONNX export with as many threads
("ort fp32", where onnxruntime is installed; timed after the others, not interleaved: its threads
spin after each run). Each twice: with 8-bit activations and with
``freeze_``'s default (8, 8) fixed point (what a model trained without ``--act-bits`` gets).

Weights: 5-bit DeepShift-Q; activations: 8-bit fixed point (act_bits = (4, 4)) unless a row says.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import deepshift
from deepshift.backends.cpu import build as native
from deepshift.backends.cpu.machine import describe
from deepshift.ops.reference import ACCUMULATORS

ACT_BITS = (4, 4)
WEIGHT_BITS = 5


def measure(fns: dict, seconds: float, min_reps: int = 5, warmup: int = 2) -> dict:
    """{name: (median, min) seconds} of each ``fns[name]()``, the calls interleaved round-robin so that
    every candidate sees the same machine load (this machine is shared); ~``seconds`` per candidate."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start < seconds * len(fns) and rounds < 1000):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: (statistics.median(v), min(v)) for name, v in times.items()}


def ratios(t: dict, base: float, which: int) -> str:
    """"frozen / via op / op" over ``base`` (``which``: 0 medians, 1 fastest runs); "-" where not timed."""
    return " / ".join(f"{t[k][which] / base:.3f}" if k in t else "-" for k in ("frozen", "via op", "op"))


def frozen_copy(model: nn.Module, weight_bits: int = WEIGHT_BITS, act_bits: tuple | None = ACT_BITS
                ) -> nn.Module:
    m = copy.deepcopy(model)
    deepshift.convert_(m, deepshift.QConfig(weight_bits=weight_bits, act_bits=act_bits))
    return deepshift.freeze_(m).eval()


def op_callable(frozen: nn.Module, x: torch.Tensor):
    """A function running the raw op of every frozen shift layer on that layer's quantized input
    (captured from one forward): the model's time inside the shift ops."""
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0])))
             for m in frozen.modules() if deepshift.is_frozen_layer(m)]
    with torch.no_grad():
        frozen(x)
    for h in hooks:
        h.remove()
    calls = []
    for mod, inp in captured:
        acc = ACCUMULATORS[mod.accumulator]
        q = torch.ops.deepshift.quantize_input(inp, list(mod.act_bits), mod.act_rounding, acc)
        b = None if mod.bias_int is None else mod.bias_int.to(acc)
        if mod.kind == "linear":
            args = (q, mod.codes, list(mod.weight_shape), mod.weight_bits, mod.has_zero, mod.shift_lo, b)
            calls.append((torch.ops.deepshift.shift_linear, args))
            continue
        if mod._pad_outside:
            q = torch.nn.functional.pad(q, mod._pads)
            pad = [0] * len(mod.kernel_size)
        else:
            pad = list(mod.padding)
        if q.dim() == len(mod.kernel_size) + 1:
            q = q.unsqueeze(0)
        calls.append((torch.ops.deepshift.shift_conv,
                      (q, mod.codes, list(mod.weight_shape), mod.weight_bits, mod.has_zero, mod.shift_lo, b,
                       list(mod.stride), pad, list(mod.dilation), mod.groups, mod.transposed,
                       list(mod.output_padding))))

    def run():
        for op, args in calls:
            op(*args)

    return run


def via_op(frozen: nn.Module):
    """``frozen``'s forward with its layers forced through the op (see "via op" above)."""

    def run(x):
        # No fused forward (the caches stay): each op composes quantize, shift op, scale.
        native.set_fused(False)
        try:
            return frozen(x)
        finally:
            native.set_fused(True)

    return run


def accumulators(frozen: nn.Module) -> str:
    accs = sorted({m.accumulator for m in frozen.modules() if deepshift.is_frozen_layer(m)})
    return "/".join(accs)


def bench_linear(add, sec: float) -> None:
    """Linear 4096 x 4096 at batch 1, 8 and 64 (and batch 1 with 4-bit weights): vs fp32 and vs int8
    dynamic quantization."""
    lin = nn.Sequential(nn.Linear(4096, 4096)).eval()
    qlin = torch.ao.quantization.quantize_dynamic(lin, {nn.Linear}, dtype=torch.qint8)
    for bits, batches in ((WEIGHT_BITS, (1, 8, 64)), (4, (1,))):
        flin = frozen_copy(lin, bits)
        ulin = via_op(flin)
        for batch in batches:
            x = torch.randn(batch, 4096)
            assert torch.equal(flin(x), ulin(x))
            fns = {"frozen": lambda x=x, f=flin: f(x), "via op": lambda x=x, u=ulin: u(x),
                   "op": op_callable(flin, x), "fp32": lambda x=x: lin(x), "int8-dyn": lambda x=x: qlin(x)}
            t = measure(fns, sec)
            note = f"acc {accumulators(flin)}"
            name = f"Linear 4096x4096 batch {batch}" + ("" if bits == WEIGHT_BITS else f", {bits}-bit")
            add(name, t, "fp32", note)
            add(name, t, "int8-dyn", note)


def bench_conv(add, sec: float) -> None:
    """Conv2d 3x3 64 -> 64, 56 x 56, batch 1, padding 1."""
    conv = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)).eval()
    fconv = frozen_copy(conv)
    uconv = via_op(fconv)
    x = torch.randn(1, 64, 56, 56)
    assert torch.equal(fconv(x), uconv(x))
    t = measure({"frozen": lambda: fconv(x), "via op": lambda: uconv(x), "op": op_callable(fconv, x),
                 "fp32": lambda: conv(x)}, sec)
    add("Conv2d 3x3 64->64 56x56 batch 1", t, "fp32", f"acc {accumulators(fconv)}")


def ort_session(model: nn.Module, example: torch.Tensor, threads: int):
    """onnxruntime (``threads`` intra-op threads) running the float model's ONNX export
    (``onnx_models.py``'s export and session), as a function of a torch input; None where onnx /
    onnxruntime are not installed."""
    try:
        from onnx_models import export_float, session  # this directory: the script's own
    except ImportError:
        return None
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float.onnx"
        export_float(model, example, path)
        sess = session(path, threads)
    return lambda x: sess.run(None, {"input": x.numpy()})


def bench_model(add, sec: float, label: str, net: nn.Module, shape: tuple, batches: tuple, threads: int,
                act_bits: tuple | None = ACT_BITS, parts: bool = True) -> None:
    """A whole model: frozen, and frozen with BatchNorm, residual add and ReLU fused into the conv
    before them (deepshift.fuse_frozen), against the float model as is, with its BatchNorms folded
    into the conv weights (torch.fx.experimental.optimization.fuse) and under onnxruntime.
    ``act_bits=None``: freeze_'s default activations, (8, 8). ``parts``: also the "via op" and "op"
    columns."""
    from torch.fx.experimental.optimization import fuse as fold_batchnorm

    folded = fold_batchnorm(copy.deepcopy(net))
    fnet = frozen_copy(net, act_bits=act_bits)
    hnet = deepshift.fuse_frozen(fnet)
    unet = via_op(fnet)
    ort_run = ort_session(net, torch.randn(1, *shape), threads)
    acts = f"act_bits {act_bits}" if act_bits is not None else "default act_bits (8, 8)"
    for batch in batches:
        x = torch.randn(batch, *shape)
        assert torch.equal(hnet(x), fnet(x))
        fns = {"frozen": lambda x=x: fnet(x), "fused": lambda x=x: hnet(x)}
        if parts:
            assert torch.equal(fnet(x), unet(x))
            fns.update({"via op": lambda x=x: unet(x), "op": op_callable(fnet, x)})
        fns.update({"fp32": lambda x=x: net(x), "fp32 BN-folded": lambda x=x: folded(x)})
        t = measure(fns, sec)
        if ort_run is not None:
            # On its own: onnxruntime's threads spin for a while after each run (its default, kept
            # so as not to slow it), which took the cores from the candidates timed after it
            # (torch's fp32 ResNet-20 at batch 1 measured 4x slower interleaved with it).
            t.update(measure({"ort fp32": lambda x=x: ort_run(x)}, sec))
        note = f"{acts}, acc {accumulators(fnet)}"
        add(f"{label} batch {batch}", t, "fp32", note)
        # The deployment form: "frozen" is the model's fuse_frozen copy.
        fused = {**t, "frozen": t["fused"]}
        for base in ("fp32", "fp32 BN-folded", "ort fp32"):
            if base in t:
                add(f"{label} batch {batch} fused", fused, base, note)


def bench_resnets(add, sec: float, threads: int, quick: bool) -> None:
    """CIFAR ResNet-20 at batch 128 and 1 and ImageNet ResNet-50 at batch 1 and 32, with 8-bit
    (4.4) activations and with freeze_'s default (8, 8)."""
    from deepshift.models import build_model

    r20 = build_model("resnet20").eval()
    r50 = build_model("imagenet-resnet50").eval()
    for act_bits in (ACT_BITS, None):
        bench_model(add, sec, "ResNet-20 CIFAR", r20, (3, 32, 32), (128, 1), threads, act_bits)
        bench_model(add, sec, "ResNet-50 ImageNet", r50, (3, 224, 224), (1,) if quick else (1, 32), threads,
                    act_bits, parts=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5, help="time budget per measurement")
    parser.add_argument("--quick", action="store_true", help="smaller budgets (smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sec = 0.3 if args.quick else args.seconds
    warnings.simplefilter("ignore", UserWarning)
    if not native.native_available():
        print("WARNING: native kernels unavailable; timing the reference ops", file=sys.stderr)
    print(f"{describe()}, load {os.getloadavg()[0]:.2f}, weights {WEIGHT_BITS}-bit Q, act_bits {ACT_BITS}")
    rows = []

    def add(name, t, base_name, note=""):
        rows.append((name, t, base_name, note))
        base, baseb = t[base_name]
        ms = " ".join(f"{k} {t[k][0] * 1e3:8.3f}" if k in t else f"{k} -" for k in ("frozen", "via op", "op"))
        print(f"  {name:<32} vs {base_name:<14} median ms: {ms} base {base * 1e3:8.3f} | ratios (median) "
              f"{ratios(t, base, 0)}  (best) {ratios(t, baseb, 1)}  {note}", flush=True)

    with torch.no_grad():
        bench_linear(add, sec)
        bench_conv(add, sec)
        bench_resnets(add, sec, args.threads, args.quick)
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("\nRatios are ours / baseline; 'median' from the medians, 'best' from the fastest run of each.")
    print("| case | baseline | baseline ms | frozen ms | via-op ms | op ms | frozen/base | via-op/base "
          "| op/base | best: frozen / via-op / op | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, t, bname, note in rows:
        base, baseb = t[bname]
        ms = " | ".join(f"{t[k][0] * 1e3:.3f}" if k in t else "-" for k in ("frozen", "via op", "op"))
        each = " | ".join(ratios(t, base, 0).split(" / "))
        print(f"| {name} | {bname} | {base * 1e3:.3f} | {ms} | {each} | {ratios(t, baseb, 1)} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
