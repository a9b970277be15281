"""GPU speed of the Triton shift kernels, side by side with torch (cuBLAS / cuDNN) in one run.

Cases (CUDA events, medians of repeated timings after warm-up, warm L2: the same weights each call).
Linear cases report two times: eager (as called from Python, launch overhead included) and CUDA
graph replay (GPU time only; a batch-1 kernel can be shorter than its Python launch); ratios use
the graph times when both sides have one. Every Triton result is checked against the reference.

* Linear 4096x4096 at batch 1 and 64: the shift kernel (5-bit PS codes, int32 and int64
  accumulation) vs torch fp16 / fp32 ``F.linear`` (cuBLAS), and vs the same Triton kernel
  compiled with ``MULTIPLY=True`` (codes decoded to ``+-2**p`` and multiplied: the paper's
  "unoptimized multiplication kernel of the same structure"). Each Triton kernel takes the best of
  a few tile configurations (``--no-tune``: the wrappers' default tiles only).
* ImageNet ResNet-18 (224x224) at batch 1 and 64: float fp32 / fp16 (cuDNN) vs converted
  (DeepShift-PS, 5 bits) + frozen, as users run it (the ops dispatch to the registered Triton
  kernels; includes the frozen layers' input quantization and output scaling), and the frozen
  model with every shift op routed to the shift or the multiply variant of the kernels.

Targets (from the issue): shift Linear batch 1 / cuBLAS fp16 <= 0.5; shift / same-structure
multiply <= 0.75; ResNet-18 batch 64 frozen / cuDNN fp32: reported.

Usage::

    python benchmarks/gpu.py            # needs a CUDA device and triton; about 1-3 minutes
    python benchmarks/gpu.py --dry-run  # no GPU: every case once on tiny CPU shapes through
                                        # Triton's interpreter, outputs checked bit for bit
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every case once on tiny CPU shapes with TRITON_INTERPRET=1 (no GPU needed)",
    )
    p.add_argument("--no-tune", action="store_true", help="time only the default tile configuration")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 cases")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    return p.parse_args(argv)


class Timer:
    """Median milliseconds per call: CUDA events on a GPU, perf_counter in a dry run."""

    def __init__(self, cuda: bool, warmup: int, reps: int):
        self.cuda, self.warmup, self.reps = cuda, warmup, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        import torch

        if not self.cuda:  # dry run: one call, its time is meaningless
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once = time.perf_counter() - start
        inner = max(1, min(100, int(2e-3 / max(once, 1e-6))))  # >= ~2 ms per timed sample
        reps = self.reps if once < 0.5 else max(3, self.reps // 3)
        times = []
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / inner)
        return statistics.median(times)

    def graph(self, fn: Callable[[], object], calls: int = 20) -> float | None:
        """Median ms per call replaying a CUDA graph of ``calls`` calls: the GPU time without the
        Python / launch overhead (which can exceed a batch-1 kernel). None in a dry run or when
        ``fn`` cannot be captured."""
        import torch

        if not self.cuda:
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(1, self.warmup)):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        except Exception as exc:  # not capturable: report eager times only
            print(f"  CUDA graph capture failed ({type(exc).__name__}: {exc})", file=sys.stderr)
            return None
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / calls)
        del graph
        return statistics.median(times)


class Table:
    """Rows of (eager ms, CUDA-graph ms or None); ratios use graph times when both sides have one."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float | None, str]] = []
        self.times: dict[str, tuple[float, float | None]] = {}

    def add(self, key: str, label: str, ms: float, note: str = "", graph_ms: float | None = None) -> None:
        self.times[key] = (ms, graph_ms)
        self.rows.append((label, ms, graph_ms, note))

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print(f"\n{'case':<{width}}  {'eager ms':>10}  {'graph ms':>10}  note")
        for label, ms, graph_ms, note in self.rows:
            g = "-" if graph_ms is None else f"{graph_ms:.4f}"
            print(f"{label:<{width}}  {ms:>10.4f}  {g:>10}  {note}")

    def ratio(self, num: str, den: str) -> tuple[float, str] | None:
        if num not in self.times or den not in self.times:
            return None
        (a, ga), (b, gb) = self.times[num], self.times[den]
        if ga is not None and gb is not None and gb > 0:
            return ga / gb, "graph"
        return (a / b, "eager") if b > 0 else None


def random_linear_codes(out_f: int, in_f: int, max_field: int, device, gen):
    """5-bit PS codes (weight_bits=5, has_zero, shift_lo=-14) with shift fields in [0, max_field]."""
    import torch

    from deepshift import pack_codes

    field = torch.randint(0, max_field + 1, (out_f * in_f,), generator=gen)
    sign = torch.randint(0, 2, (out_f * in_f,), generator=gen)
    return pack_codes(field | (sign << 4), 5).to(device)


LINEAR_CONFIGS = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) candidates per batch regime
    "gemv": [
        (1, 16, 128, 4),
        (1, 8, 256, 4),
        (1, 32, 128, 4),
        (1, 16, 256, 8),
        (1, 64, 64, 4),
        (1, 4, 512, 4),
    ],
    "gemm": [(32, 32, 8, 4), (16, 32, 16, 4), (16, 64, 8, 4), (32, 64, 8, 8), (64, 32, 8, 8), (64, 64, 4, 8)],
}


def bench_linear(table: Table, timer: Timer, device, dry: bool, tune: bool) -> None:
    import torch
    import torch.nn.functional as F

    from deepshift.backends.triton import register as triton_ops
    from deepshift.ops.reference import accumulator_bound, shift_linear_reference

    gen = torch.Generator().manual_seed(0)
    out_f = in_f = 48 if dry else 4096
    for batch in (1, 3) if dry else (1, 64):
        tag = f"linear {out_f}x{in_f} batch {batch}"
        xf = torch.randn(batch, in_f, generator=gen).to(device)
        wf = torch.randn(out_f, in_f, generator=gen).to(device)
        fn = partial(F.linear, xf, wf)
        table.add(f"fp32-b{batch}", f"{tag}: torch fp32 (cuBLAS)", timer(fn), graph_ms=timer.graph(fn))
        if not dry:  # fp16 matmul on CPU is slow and beside the point
            fn = partial(F.linear, xf.half(), wf.half())
            table.add(f"fp16-b{batch}", f"{tag}: torch fp16 (cuBLAS)", timer(fn), graph_ms=timer.graph(fn))
        # int32: 8-bit inputs and used shifts spanning 12 keep every sum below 2**31 (exact);
        # int64: the full 5-bit range.
        for dtype, max_field in ((torch.int32, 12), (torch.int64, 15)):
            dname = str(dtype).removeprefix("torch.")
            codes = random_linear_codes(out_f, in_f, max_field, device, gen)
            x = torch.randint(-127, 128, (batch, in_f), generator=gen).to(dtype).to(device)
            bound = accumulator_bound(in_f, 127, max(max_field - 1, 0), 0, -14)
            assert bound < (2**31 if dtype == torch.int32 else 2**63)
            args = (x, codes, [out_f, in_f], 5, True, -14, None)
            # Rows are independent: the (slow, CPU) reference checks the first two.
            want = shift_linear_reference(x[:2].cpu(), codes.cpu(), *args[2:])
            regime = "gemv" if batch == 1 else "gemm"
            configs = [None] + (LINEAR_CONFIGS[regime] if tune and not dry else [])
            if dry:
                configs = [None, (2, 4, 16, 1)]
            for multiply in (False, True):
                kind = "multiply" if multiply else "shift"
                best = None  # (ms used to choose, eager ms, graph ms, config): chosen by GPU time
                for cfg in configs:
                    try:
                        y = triton_ops.shift_linear_triton(*args, multiply=multiply, config=cfg)
                    except Exception as exc:  # a tile configuration the GPU cannot compile
                        print(
                            f"  config {cfg} failed for {kind}: {type(exc).__name__}: {exc}", file=sys.stderr
                        )
                        continue
                    if not torch.equal(y[:2].cpu(), want):
                        raise SystemExit(f"{tag} {kind} {dname} config {cfg}: differs from the reference")
                    fn = partial(triton_ops.shift_linear_triton, *args, multiply=multiply, config=cfg)
                    eager, graph = timer(fn), timer.graph(fn)
                    chosen = graph if graph is not None else eager
                    if best is None or chosen < best[0]:
                        best = (chosen, eager, graph, cfg)
                if best is None:
                    continue
                _, eager, graph, cfg = best
                note = "default tiles" if cfg is None else f"tiles {cfg}"
                table.add(f"{kind}-{dname}-b{batch}", f"{tag}: Triton {kind} {dname}", eager, note, graph)


def bench_resnet(table: Table, timer: Timer, device, dry: bool) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import deepshift
    from deepshift.backends.triton import register as triton_ops
    from deepshift.models import build_model
    from deepshift.ops.reference import (
        frozen_conv_reference,
        frozen_linear_reference,
        shift_conv_reference,
        shift_linear_reference,
    )

    frozen_ops = {torch.ops.deepshift.frozen_conv.default: frozen_conv_reference,
                  torch.ops.deepshift.frozen_linear.default: frozen_linear_reference}

    class RouteToTriton(TorchDispatchMode):
        """Send every shift op to the Triton wrappers (shift or multiply variant).

        With ``check``, each call is also compared bit for bit with the reference op on CPU.
        """

        def __init__(self, multiply: bool, check: bool = False):
            super().__init__()
            self.multiply, self.check, self.calls = multiply, check, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.deepshift.shift_conv.default:
                fn, ref = triton_ops.shift_conv_triton, shift_conv_reference
            elif func is torch.ops.deepshift.shift_linear.default:
                fn, ref = triton_ops.shift_linear_triton, shift_linear_reference
            elif func in frozen_ops:
                # A frozen layer's op, composed as its reference does, with this mode active again
                # (it is off inside __torch_dispatch__), so that its shift op comes back here.
                with self:
                    return frozen_ops[func](*args, **kwargs)
            else:
                return func(*args, **kwargs)
            self.calls += 1
            y = fn(*args, **kwargs, multiply=self.multiply)
            if self.check:
                cpu = [a.cpu() if torch.is_tensor(a) else a for a in args]
                want = ref(*cpu, **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kwargs.items()})
                if not torch.equal(y.cpu(), want):
                    raise SystemExit(
                        f"Triton {'multiply' if self.multiply else 'shift'} op call "
                        f"{self.calls} differs from the reference"
                    )
            return y

    torch.manual_seed(0)
    model = build_model("imagenet-resnet18").eval()
    float32 = copy.deepcopy(model).to(device)
    deepshift.convert_(model, deepshift.PSConfig(weight_bits=5))
    frozen = deepshift.freeze_(model.eval())
    acc = [m.accumulator for m in frozen.modules() if deepshift.is_frozen_layer(m)]
    acc_note = f"{acc.count('int32')} int32 / {acc.count('int64')} int64 layers"
    frozen = frozen.to(device)

    # Correctness first, on a small input: every op call of the routed runs against the reference,
    # and (GPU) the registered kernels give the same model output as the routed shift kernels.
    check_x = torch.randn(1, 3, 32 if dry else 64, 32 if dry else 64, device=device)
    outs, dry_ms = {}, {}
    with torch.no_grad():
        for multiply in (False, True):
            kind = "multiply" if multiply else "shift"
            mode = RouteToTriton(multiply, check=True)
            start = time.perf_counter()
            with mode:
                outs[kind] = frozen(check_x)
            dry_ms[kind] = (time.perf_counter() - start) * 1e3
            if mode.calls != len(acc):
                raise SystemExit(f"expected {len(acc)} shift op calls, routed {mode.calls}")
        if not torch.equal(outs["shift"], outs["multiply"]):
            raise SystemExit("frozen ResNet-18: shift and multiply kernels disagree")
        if not dry and not torch.equal(frozen(check_x), outs["shift"]):
            raise SystemExit("frozen ResNet-18: the registered CUDA kernels differ from the routed ones")
    print(
        f"resnet18: {len(acc)} shift op calls per forward match the reference bit for bit "
        f"(shift and multiply kernels)"
    )

    size = 32 if dry else 224
    for batch in (1,) if dry else (1, 64):
        tag = f"resnet18 {size}x{size} batch {batch}"
        x = torch.randn(batch, 3, size, size, device=device)
        with torch.no_grad():
            table.add(f"r-fp32-b{batch}", f"{tag}: float fp32 (cuDNN)", timer(partial(float32, x)))
            if dry:  # the checked runs above were this case: one interpreted forward each
                for kind, ms in dry_ms.items():
                    table.add(
                        f"r-{kind}-b{batch}", f"{tag}: frozen, ops routed to Triton {kind}", ms, acc_note
                    )
                continue
            table.add(
                f"r-fp16-b{batch}",
                f"{tag}: float fp16 (cuDNN)",
                timer(partial(copy.deepcopy(float32).half(), x.half())),
            )
            # As users run it: the ops dispatch to the registered CUDA (Triton) kernels.
            table.add(
                f"r-frozen-b{batch}",
                f"{tag}: frozen (registered kernels)",
                timer(partial(frozen, x)),
                acc_note,
            )
            for multiply in (False, True):
                kind = "multiply" if multiply else "shift"
                mode = RouteToTriton(multiply)

                def run(mode=mode, x=x):
                    with mode:
                        frozen(x)

                table.add(
                    f"r-{kind}-b{batch}", f"{tag}: frozen, ops routed to Triton {kind}", timer(run), acc_note
                )


def report(table: Table, dry: bool) -> None:
    table.print()
    print("\nratios (targets from the issue)" + (" -- dry run, meaningless:" if dry else ":"))
    lines = [
        ("shift int32 / cuBLAS fp16, Linear batch 1 (target <= 0.5)", "shift-int32-b1", "fp16-b1"),
        ("shift int32 / cuBLAS fp32, Linear batch 1", "shift-int32-b1", "fp32-b1"),
        ("shift int32 / cuBLAS fp16, Linear batch 64", "shift-int32-b64", "fp16-b64"),
        ("shift int32 / cuBLAS fp32, Linear batch 64", "shift-int32-b64", "fp32-b64"),
    ]
    for b in (1, 3, 64):
        for d in ("int32", "int64"):
            lines.append(
                (
                    f"shift / multiply, Linear {d} batch {b} (target <= 0.75)",
                    f"shift-{d}-b{b}",
                    f"multiply-{d}-b{b}",
                )
            )
    for b in (1, 64):
        lines += [
            (f"ResNet-18 batch {b}: frozen / cuDNN fp32 (report)", f"r-frozen-b{b}", f"r-fp32-b{b}"),
            (f"ResNet-18 batch {b}: frozen / cuDNN fp16", f"r-frozen-b{b}", f"r-fp16-b{b}"),
            (
                f"ResNet-18 batch {b}: routed shift / routed multiply (target <= 0.75)",
                f"r-shift-b{b}",
                f"r-multiply-b{b}",
            ),
        ]
    for label, num, den in lines:
        r = table.ratio(num, den)
        if r is not None:
            print(f"  {label}: {r[0]:.3f} ({r[1]} times)")
    if dry:
        print("\ndry run: CPU interpreter, tiny shapes; the times above say nothing about GPU speed.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Must be set before the Triton kernels are imported (triton reads it at import and launch).
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device is available (torch.cuda.is_available() is False), so "
            "there is nothing to time. Run it on a machine with an NVIDIA GPU, a CUDA build of torch "
            "and triton; or use --dry-run to check every case once on CPU through Triton's interpreter.",
            file=sys.stderr,
        )
        return 2
    from deepshift.backends.triton import register as triton_ops

    if not triton_ops.triton_available():
        print(
            f"benchmarks/gpu.py: the Triton kernels do not load ({triton_ops._import_error}); "
            "install triton: pip install -r requirements-triton.txt",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        if not triton_ops.interpreted():
            print(
                "benchmarks/gpu.py --dry-run: the kernels were imported without TRITON_INTERPRET=1",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        if not triton_ops.register_cuda_kernels():
            print(
                "benchmarks/gpu.py: the Triton kernels are not registered (DEEPSHIFT_NO_NATIVE set?)",
                file=sys.stderr,
            )
            return 2
        print(
            f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {__import__('triton').__version__}"
        )
    timer = Timer(cuda=not args.dry_run, warmup=args.warmup, reps=args.reps)
    table = Table()
    start = time.perf_counter()
    bench_linear(table, timer, device, args.dry_run, tune=not args.no_tune)
    if not args.no_resnet:
        bench_resnet(table, timer, device, args.dry_run)
    report(table, args.dry_run)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
