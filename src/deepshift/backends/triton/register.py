"""Triton (GPU) kernels for ``deepshift::shift_linear`` and ``deepshift::shift_conv``.

This module imports without triton; the kernels themselves
(:mod:`deepshift.backends.triton.kernels`) are imported on first use. :func:`register_cuda_kernels`
registers them as the ops' CUDA implementation when triton is installed and CUDA is available, so
frozen models on a CUDA device use them automatically; set ``DEEPSHIFT_NO_NATIVE=1`` to keep the
pure-torch reference everywhere.

The launch wrappers :func:`shift_linear_triton` and :func:`shift_conv_triton` take the ops'
arguments and return exactly what the reference functions in :mod:`deepshift.ops.reference` return (bit for
bit; see its docstring for the integer semantics). They run on CUDA tensors, or on CPU tensors
through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were first
imported (how the tests check them on a machine without a GPU).

What the kernels cover: Linear with any leading dims; Conv 1d/2d/3d, plain and transposed, with
stride, padding (symmetric zeros), dilation, groups/depthwise and output_padding, all by index
arithmetic in one implicit-GEMM kernel (transposed convolutions as the stride-1 convolution over
the zero-dilated input, without materialising it); weight_bits 2..8, Q and PS codes, int32 and
int64, with or without bias. Cases the kernels do not take (an empty tensor, an index beyond
int32, a shape the op rejects) go to the reference implementation, which computes or raises.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from deepshift.ops.codes import packed_numel
from deepshift.ops.reference import (
    ShiftConvArgs,
    conv_output_size,
    shift_conv_reference,
    shift_linear_reference,
)
from deepshift.ops.schemas import register_backend

__all__ = [
    "compile_for_cuda",
    "decode_codes_triton",
    "interpreted",
    "register_cuda_kernels",
    "shift_conv_triton",
    "shift_linear_triton",
    "triton_available",
]

# Kernels index with int32; larger tensors go to the reference.
_INDEX_LIMIT = 2**31 - 1
_INT_DTYPES = (torch.int32, torch.int64)
_kernels: ModuleType | None = None
_import_error: Exception | None = None
_registered = False
_warned = False


def _load() -> ModuleType:
    """The kernel module (imports triton once); ImportError with the reason when it cannot."""
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            from deepshift.backends.triton import kernels as _triton_kernels
        except Exception as exc:  # ImportError, or a broken triton install
            _import_error = exc
        else:
            _kernels = _triton_kernels
    if _kernels is None:
        raise ImportError(f"the Triton kernels are unavailable: {_import_error}") from _import_error
    return _kernels


def triton_available() -> bool:
    """True when triton imports and the kernel module loads (no GPU needed)."""
    try:
        _load()
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_load().shift_linear_kernel, InterpretedFunction)


def _pow2(n: int, cap: int) -> int:
    return max(1, min(cap, 1 << max(0, int(n) - 1).bit_length()))


def _interpreter_tiles(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """Few, large tiles (up to 2**16 terms each): the interpreter pays per operation."""
    bm = _pow2(m, 64)
    bn = _pow2(n, 128)
    return bm, bn, _pow2(k, max(32, 2**16 // (bm * bn))), 1


def _linear_config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a (m, k) x (n, k)^T shift GEMM.

    Heuristics, not tuned on hardware yet (benchmarks/gpu.py sweeps alternatives). Interpreted
    runs take big tiles: the interpreter's cost is per operation, not per element.
    """
    if interpreted():
        return _interpreter_tiles(m, n, k)
    if m == 1:  # GEMV: many narrow programs so every SM streams codes
        return 1, _pow2(n, 16), _pow2(k, 128), 4
    if m <= 16:
        return _pow2(m, 16), _pow2(n, 32), _pow2(k, 32), 4
    return 32, _pow2(n, 32), _pow2(k, 8), 4


def _conv_config(m: int, cout_g: int, fan_in: int) -> tuple[int, int, int, int]:
    if interpreted():
        return _interpreter_tiles(m, cout_g, fan_in)
    if cout_g <= 4:  # depthwise-like: few outputs per group, long rows
        return 128, _pow2(cout_g, 4), _pow2(fan_in, 16), 4
    return 32, _pow2(cout_g, 32), _pow2(fan_in, 8), 4


def _check_common(x: Tensor, codes: Tensor, numel: int, weight_bits: int, bias: Tensor | None) -> bool:
    """ValueError for wrong dtypes / code length / devices; RuntimeError when no kernel can run
    on ``x``'s device (CPU without the interpreter)."""
    if x.dtype not in _INT_DTYPES:
        raise ValueError(f"x must be int32 or int64 fixed-point integers, got {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if not 2 <= weight_bits <= 8:
        raise ValueError(f"weight_bits must be in 2..8, got {weight_bits}")
    if codes.dtype != torch.uint8 or codes.numel() != packed_numel(numel, weight_bits):
        raise ValueError(
            f"{numel} codes of {weight_bits} bits need {packed_numel(numel, weight_bits)} "
            f"uint8 bytes, got {codes.numel()} of {codes.dtype}"
        )
    for t in (codes, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"tensors on different devices: {x.device} and {t.device}")
    if x.device.type == "cuda":
        return True
    if x.device.type == "cpu" and interpreted():
        return True
    raise RuntimeError(
        f"the Triton kernels run on CUDA tensors, or on CPU tensors only with "
        f"TRITON_INTERPRET=1 set before they are imported; got {x.device}"
    )


def _launch(kernel, grid, args: tuple, meta: dict, device: torch.device) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def shift_linear_triton(
    x: Tensor,
    codes: Tensor,
    weight_shape: Sequence[int],
    weight_bits: int,
    has_zero: bool,
    shift_lo: int,
    bias: Tensor | None,
    *,
    multiply: bool = False,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Triton ``deepshift::shift_linear``: same arguments and result as ``shift_linear_reference``.

    ``multiply=True`` runs the same kernel with weights decoded to ``+-2**p`` and multiplied (the
    benchmark baseline); ``config`` is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), powers of two.
    """
    weight_shape = [int(d) for d in weight_shape]
    args = (x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias)
    if len(weight_shape) != 2 or x.dim() < 1 or x.shape[-1] != weight_shape[1]:
        return shift_linear_reference(*args)  # raises the reference's error
    out_f, in_f = weight_shape
    numel = out_f * in_f
    _check_common(x, codes, numel, weight_bits, bias)
    x2 = x.reshape(-1, in_f).contiguous()
    m = x2.shape[0]
    if min(m, out_f, in_f) == 0 or max(numel * weight_bits, x2.numel(), m * out_f) > _INDEX_LIMIT:
        return shift_linear_reference(*args)
    if bias is not None and bias.numel() != out_f:
        return shift_linear_reference(*args)
    k = _load()
    y = torch.empty(m, out_f, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = config or _linear_config(m, out_f, in_f)
    u = min(shift_lo, 0)
    grid = (triton_cdiv(m, bm), triton_cdiv(out_f, bn))
    b = bias.contiguous() if bias is not None else x2  # unused pointer when HAS_BIAS is False
    _launch(
        k.shift_linear_kernel,
        grid,
        (x2, codes.contiguous(), b, y, m, out_f, in_f, codes.numel(), shift_lo - u, -u),
        dict(
            BITS=weight_bits,
            HAS_ZERO=bool(has_zero),
            HAS_BIAS=bias is not None,
            MULTIPLY=bool(multiply),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=warps,
        ),
        x.device,
    )
    return y.reshape(*x.shape[:-1], out_f)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def shift_conv_triton(
    x: Tensor, *conv_args, multiply: bool = False, config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Triton ``deepshift::shift_conv``: same arguments (``x`` and :class:`ShiftConvArgs`' fields) and
    result as ``shift_conv_reference``."""
    a = ShiftConvArgs(*conv_args)
    codes, weight_bits, has_zero, shift_lo, bias, groups, transposed = (
        a.codes, a.weight_bits, a.has_zero, a.shift_lo, a.bias, a.groups, a.transposed)
    weight_shape = [int(d) for d in a.weight_shape]
    stride, padding, dilation, output_padding = (
        [int(v) for v in t] for t in (a.stride, a.padding, a.dilation, a.output_padding)
    )
    args = (x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, stride, padding, dilation, groups,
            transposed, output_padding)
    dims = len(weight_shape) - 2
    if (
        not 1 <= dims <= 3
        or x.dim() != dims + 2
        or groups < 1
        or any(len(v) != dims for v in (stride, padding, dilation, output_padding))
        or min(stride + dilation) < 1
    ):
        return shift_conv_reference(*args)
    kernel = weight_shape[2:]
    if transposed:
        c_in, cout_g = weight_shape[0], weight_shape[1]
        if c_in % groups or x.shape[1] != c_in:
            return shift_conv_reference(*args)
        cin_g, c_out = c_in // groups, cout_g * groups
    else:
        c_out, cin_g = weight_shape[0], weight_shape[1]
        if x.shape[1] != cin_g * groups or c_out % groups:
            return shift_conv_reference(*args)
        c_in, cout_g = cin_g * groups, c_out // groups
    numel = math.prod(weight_shape)
    _check_common(x, codes, numel, weight_bits, bias)
    out_sizes = [
        conv_output_size(
            x.shape[2 + d], kernel[d], stride[d], padding[d], dilation[d], transposed, output_padding[d]
        )
        for d in range(dims)
    ]
    n = x.shape[0]
    m = n * math.prod(out_sizes)
    fan_in = cin_g * math.prod(kernel)
    if (
        min([m, c_out, fan_in, x.numel(), *out_sizes]) <= 0
        or max(numel * weight_bits, x.numel(), m * c_out) > _INDEX_LIMIT
        or (bias is not None and bias.numel() != c_out)
    ):
        return shift_conv_reference(*args)
    k = _load()
    y = torch.empty(n, c_out, *out_sizes, dtype=x.dtype, device=x.device)
    lead = [1] * (3 - dims)
    sizes = lead + list(x.shape[2:])
    outs = lead + out_sizes
    ks = lead + kernel
    dil = lead + dilation
    if transposed:
        out_step = [1, 1, 1]
        offset = [0] * (3 - dims) + [
            dl * (kk - 1) - p for dl, kk, p in zip(dilation, kernel, padding, strict=True)
        ]
        in_step = lead + stride
    else:
        out_step = lead + stride
        offset = [0] * (3 - dims) + padding
        in_step = [1, 1, 1]
    bm, bn, bk, warps = config or _conv_config(m, cout_g, fan_in)
    u = min(shift_lo, 0)
    grid = (triton_cdiv(m, bm), triton_cdiv(cout_g, bn), groups)
    xc = x.contiguous()
    b = bias.contiguous() if bias is not None else xc
    _launch(
        k.shift_conv_kernel,
        grid,
        (
            xc,
            codes.contiguous(),
            b,
            y,
            m,
            c_in,
            c_out,
            cin_g,
            cout_g,
            fan_in,
            codes.numel(),
            shift_lo - u,
            -u,
            *sizes,
            *outs,
            *ks,
            *out_step,
            *dil,
            *offset,
            *in_step,
        ),
        dict(
            BITS=weight_bits,
            HAS_ZERO=bool(has_zero),
            HAS_BIAS=bias is not None,
            MULTIPLY=bool(multiply),
            TRANSPOSED=bool(transposed),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=warps,
        ),
        x.device,
    )
    return y


def decode_codes_triton(codes: Tensor, numel: int, weight_bits: int, has_zero: bool) -> tuple[Tensor, Tensor]:
    """Flat ``(rel, sign)`` (int64) decoded by the kernels' in-register decoder; as ``decode_codes``."""
    if codes.dtype != torch.uint8 or codes.numel() != packed_numel(numel, weight_bits):
        raise ValueError("codes do not match numel and weight_bits")
    k = _load()
    rel = torch.empty(numel, dtype=torch.int64, device=codes.device)
    sign = torch.empty(numel, dtype=torch.int64, device=codes.device)
    if numel:
        block = 1024
        _launch(
            k.decode_kernel,
            (triton_cdiv(numel, block),),
            (codes.contiguous(), rel, sign, numel, codes.numel()),
            dict(BITS=weight_bits, HAS_ZERO=bool(has_zero), BLOCK=block),
            codes.device,
        )
    return rel, sign


_CONV_SCALARS = (
    "M C_IN C_OUT CIN_G COUT_G FAN_IN nbytes amount_base bias_shift D H W OD OH OW KD KH KW "
    "SD SH SW DD DH DW PD PH PW ID IH IW"
).split()


def compile_for_cuda(arch: int = 90, num_warps: int = 4) -> list[str]:
    """Compile representative variants of every kernel to a CUDA cubin for ``sm_<arch>``.

    Needs no GPU (triton ships its own ptxas), only kernels imported without
    ``TRITON_INTERPRET``: it catches what the interpreter does not check (typing, layouts,
    tiles of size 1). Returns one line per compiled variant; raises if one fails to compile.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = _load()
    if interpreted():
        raise RuntimeError("compile_for_cuda needs kernels imported without TRITON_INTERPRET=1")

    def ptrs(dt: str) -> dict[str, str]:
        return {"x_ptr": f"*{dt}", "codes_ptr": "*u8", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}"}

    linear_scalars = {n: "i32" for n in ("M", "N", "K", "nbytes", "amount_base", "bias_shift")}
    conv_scalars = {n: "i32" for n in _CONV_SCALARS}
    variants = [  # (kernel, dtype, constexprs); tiles as the wrappers and the benchmark use them
        (k.shift_linear_kernel, "i32", dict(BITS=5, HAS_ZERO=True, HAS_BIAS=True, MULTIPLY=False,
                                            BLOCK_M=1, BLOCK_N=16, BLOCK_K=128)),
        (k.shift_linear_kernel, "i64", dict(BITS=3, HAS_ZERO=False, HAS_BIAS=False, MULTIPLY=True,
                                            BLOCK_M=32, BLOCK_N=32, BLOCK_K=8)),
        (k.shift_conv_kernel, "i32", dict(BITS=5, HAS_ZERO=True, HAS_BIAS=True, MULTIPLY=False,
                                          TRANSPOSED=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=8)),
        (k.shift_conv_kernel, "i64", dict(BITS=7, HAS_ZERO=False, HAS_BIAS=False, MULTIPLY=True,
                                          TRANSPOSED=True, BLOCK_M=128, BLOCK_N=1, BLOCK_K=16)),
    ]  # fmt: skip
    done = []
    for fn, dt, consts in variants:
        types = {**ptrs(dt), **(linear_scalars if fn is k.shift_linear_kernel else conv_scalars)}
        signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=consts),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps},
        )
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{fn.__name__} produced no cubin")
        done.append(f"{fn.__name__} {dt} {consts}: sm_{arch} cubin {len(compiled.asm['cubin'])} bytes")
    return done


def _kernels_or_warn() -> bool:
    """True when the kernels load; otherwise warn once (the reference op then computes)."""
    global _warned
    try:
        _load()
    except ImportError as exc:
        if not _warned:
            _warned = True
            warnings.warn(
                f"deepshift: Triton GPU shift kernels unavailable, using the reference ops ({exc})",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def _linear_cuda(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias):
    args = (x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias)
    return shift_linear_triton(*args) if _kernels_or_warn() else shift_linear_reference(*args)


def _conv_cuda(x, *args):
    return shift_conv_triton(x, *args) if _kernels_or_warn() else shift_conv_reference(x, *args)


def register_cuda_kernels() -> bool:
    """Register the Triton kernels as the ops' CUDA implementation; True when they are registered.

    Cheap enough for package import: triton itself is imported on the first CUDA call (if it then
    fails to load, that call warns once and the reference computes). Does nothing and returns
    False when ``DEEPSHIFT_NO_NATIVE`` is set, CUDA is unavailable or triton is not installed.
    Safe to call more than once.
    """
    global _registered
    if _registered:
        return True
    if os.environ.get("DEEPSHIFT_NO_NATIVE", "") not in ("", "0") or not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    register_backend("shift_linear", "CUDA", _linear_cuda)
    register_backend("shift_conv", "CUDA", _conv_cuda)
    _registered = True
    return True
