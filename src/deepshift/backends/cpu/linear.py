"""CPU kernels of ``deepshift::shift_linear``: table lookup (AVX-512; any batch, but frozen layers with
8-bit activations only up to ``LUT_MAX_ROWS_INT16`` rows), small-batch GEMV and the batched
1x1-convolution path."""

from __future__ import annotations

import torch
from torch import Tensor

from deepshift.backends.cpu.build import ISA_CODES, load_extension
from deepshift.backends.cpu.cache import _cached, fused_forward, parsed_spec
from deepshift.backends.cpu.conv import (
    _LANE_DTYPES,
    INT16_MAX_GROUP,
    POINTWISE_BLOCK_BYTES,
    _decoded,
    _fused_setup,
    _lanes_for,
    _shifted_bias,
    _valid_codes,
)
from deepshift.ops import reference as ref

# PreparedLinear's modes (csrc/frozen.h): narrow / wide table lookup, small-batch kernel, 1x1 conv.
_LUT, _WIDE, _GEMV, _CONV = 0, 1, 2, 3


GEMV_MAX_ROWS = 4
"""Without the table-lookup kernel, Linear inputs with at most this many rows use the small-batch
(per-weight shift) kernel, more rows the 1x1-convolution path."""

LUT_MAX_ROWS_INT16 = 47
"""Frozen Linear layers whose activations fit the int16 table (8-bit ``act_bits``) use the table-lookup
kernel up to this many input rows and the 1x1-convolution path beyond: the lookup's cost grows with
every row (a permute and an add per 16 outputs), the convolution's per-term work is shared by 16
rows per vector. Linear 4096 x 4096, 5-bit weights, AMD Zen 4, 2 threads, ms lookup / convolution:
16 rows 4.1 / 8.6, 32 rows 9.2 / 14.1, 48 rows 11.5 / 11.4, 64 rows 17.2 / 14.4, 128 rows 31.3 /
27.0 (4-bit weights at 64 rows 15.2 / 11.4)."""


def _linear_native_ok(x, codes, weight_shape, weight_bits, bias, x_dtype=None) -> bool:
    """Whether the native kernel takes the call (``x_dtype``: the integer dtype x stands for)."""
    x_dtype = x.dtype if x_dtype is None else x_dtype
    return not (
        len(weight_shape) != 2
        or x_dtype not in (torch.int32, torch.int64)
        or x.dim() < 1
        or x.shape[-1] != weight_shape[1]
        or not _valid_codes(codes, weight_shape, weight_bits)
        or (bias is not None and (bias.dtype != x_dtype or bias.shape != (weight_shape[0],)))
        or x.numel() == 0
        or min(weight_shape) <= 0
    )


def _gemv_tiles(ext, codes, weight_shape, weight_bits, has_zero, shift_lo):
    """The small-batch Linear kernel's byte tiles (cached)."""
    return _cached(
        codes,
        ("gemv", tuple(weight_shape), weight_bits, has_zero, shift_lo),
        lambda: ext.gemv_layout(_decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, 32)[0]),
    )


def _gemv_lut(ext, codes, weight_shape, weight_bits, has_zero, shift_lo):
    """The table-lookup kernel's layout ``(tiles, values, bits)``, or None where the layer has more
    than 32 distinct weights (cached)."""

    def make():
        scode = _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, 32)[0]
        tiles, values, bits = ext.lut_layout(scode)
        return None if bits == 0 else (tiles, values, bits)

    return _cached(codes, ("lut", tuple(weight_shape), weight_bits, has_zero, shift_lo), make)


def _lut(ext, codes, weight_shape, weight_bits, has_zero, shift_lo):
    """The table-lookup kernel's layout where this call can take it (AVX-512 in use, at most 32
    distinct weights), else None."""
    if ext.current_isa() != ISA_CODES["avx512"]:
        return None
    return _gemv_lut(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)


def _wide_layout(ext, codes, weight_shape, weight_bits, has_zero, shift_lo):
    """The table-lookup layout where the kernel's wide form (int64 outputs) may take the layer: its
    table's decode keeps shift amounts below 32 only, and an entry |x| << amount must fit int32."""
    lut = _lut(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)
    if lut is None or _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, 64)[1] >= 31:
        return None
    return lut


def _prepare_linear_wide(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, act_bits, rounding):
    """``_prepare_linear_fused`` for a layer with an int64 accumulator: inputs rounded to int32 fixed
    point (act_bits of at most 32 bits), the wide table-lookup kernel, int64 scaling; its ``run``
    returns no output for an input the wide kernel refuses (the caller runs the reference
    composition). None where it does not apply. Like every prepared forward it holds no reference to
    the codes (the cache entry goes with them)."""
    ext = load_extension()
    if ext is None or sum(act_bits) > 32:
        return None
    setup = _fused_setup(ext, x, act_bits, rounding, "int32", shift_lo, bias)
    lut = None if setup is None else _wide_layout(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)
    if lut is None or not _linear_native_ok(x, codes, weight_shape, weight_bits, bias, torch.int32):
        return None
    _, lo, hi, exponent, _ = setup
    b = _shifted_bias(None if bias is None else bias.to(torch.int64), min(shift_lo, 0))
    out_f, in_f = weight_shape
    tiles, values, bits = lut
    return ext.PreparedLinear(_WIDE, tiles, values, bits, [], b, out_f, in_f, x.numel() // in_f, act_bits[1],
                              lo, hi, rounding == "floor", 32, exponent, x.dtype == torch.float64,
                              [*x.shape[:-1], out_f])


def _linear_plan(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes, rows):
    """The plan of a Linear over ``rows`` rows run as a 1x1 convolution (cached)."""
    out_f, in_f = weight_shape

    def make_plan():
        scode, _ = _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, max(lanes, 32))
        w5 = scode.reshape(out_f, in_f, 1, 1, 1)
        return ext.conv_plan(
            w5, [1, in_f, 1, 1, rows], 1, [1, 1, 1], [0, 0, 0], [1, 1, 1], lanes // 8, POINTWISE_BLOCK_BYTES,
            INT16_MAX_GROUP if lanes == 16 else 0,
        )

    return _cached(codes, ("plan", tuple(weight_shape), weight_bits, has_zero, shift_lo, lanes, rows, False),
                   make_plan)


class _PreparedLut:
    """A ``shift_linear`` call on int32 inputs of one shape, prepared (the table-lookup layout and the
    shifted int32 bias): what integer-only models call once per Linear layer and batch, where the
    checks and layout lookups of the general path cost several times the kernel at batch 1."""

    def __init__(self, ext, lut, bias, out_f: int, in_f: int, shape):
        self.ext, self.lut, self.bias = ext, lut, bias
        self.out_f, self.in_f, self.shape = out_f, in_f, [*shape[:-1], out_f]

    def __call__(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_f)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        return self.ext.gemv_lut(x2, *self.lut, self.out_f, self.bias, False).reshape(self.shape)

    def remember(self, *args) -> None:  # fused_forward's interface: no C++ kernel looks these up
        pass


def _prepare_lut_call(ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias):
    """A :class:`_PreparedLut` where the general path would take the table lookup on int32 lanes
    (int32 x, AVX-512, at most 32 distinct weights), else None."""
    if x.dtype != torch.int32 or not _linear_native_ok(x, codes, weight_shape, weight_bits, bias):
        return None
    lut = _lut(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)
    if lut is None:
        return None
    b = _shifted_bias(bias, min(shift_lo, 0))
    return _PreparedLut(ext, lut, None if b is None else b.to(torch.int32), weight_shape[0], weight_shape[1],
                        x.shape)


def shift_linear_cpu(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias):
    """CPU kernel of ``deepshift::shift_linear`` (native when available, else the reference)."""
    ext = load_extension()
    if ext is not None and x.dtype == torch.int32 and x.device.type == "cpu":
        # kept per (codes, bias, arguments, x's shape): a hit had these exact arguments checked
        key = f"shift_linear {weight_shape} {weight_bits} {has_zero} {shift_lo} isa {ext.current_isa()}"
        prepared = fused_forward(x, codes, bias, key, lambda: _prepare_lut_call(
            ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias))
        if prepared is not None:
            return prepared(x)
    if ext is None or not _linear_native_ok(x, codes, weight_shape, weight_bits, bias):
        return ref.shift_linear_reference(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias)
    out_f, in_f = weight_shape
    rows = x.numel() // in_f
    u = min(shift_lo, 0)
    bias_s = _shifted_bias(bias, u)
    lut = _lut(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)
    lanes = _lanes_for(ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias_s, in_f,
                       int16=lut is None and rows > GEMV_MAX_ROWS)
    dtype = _LANE_DTYPES[lanes]
    x2 = x.reshape(rows, in_f)
    x2 = (x2 if x2.dtype == dtype else x2.to(dtype)).contiguous()
    b = None if bias_s is None else bias_s.to(torch.int64 if lanes == 64 else torch.int32)
    # int64 lanes: the wide table lookup where it takes the call (None where an |x| << shift leaves int32).
    wide_lut = None if lanes != 64 or lut is None else _wide_layout(ext, codes, weight_shape, weight_bits,
                                                                    has_zero, shift_lo)
    wide = None if wide_lut is None else ext.gemv_lut(x2, *wide_lut, out_f, b, True)
    if lanes == 32 and lut is not None:  # any batch: table lookup beats the 1x1 convolution
        y = ext.gemv_lut(x2, *lut, out_f, b, False)
    elif wide is not None:
        y = wide
    elif lanes == 32 and rows <= GEMV_MAX_ROWS:
        y = ext.gemv(x2, _gemv_tiles(ext, codes, weight_shape, weight_bits, has_zero, shift_lo), out_f, b)
    else:
        xt = x2.t().contiguous().reshape(1, in_f, 1, 1, rows)
        plan = _linear_plan(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes, rows)
        y = ext.conv(xt, [out_f, in_f, 1, 1, 1], plan, b, 1, [1, 1, 1], [0, 0, 0], [1, 1, 1])
        y = y.reshape(out_f, rows).t().contiguous()
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_f)


def _prepare_linear_fused(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, act_bits, rounding,
                          accumulator):
    """What ``conv._prepare_conv_fused`` is for a frozen Linear layer: the extension's ``PreparedLinear``,
    whose ``run(x)`` computes its forward on float CPU inputs shaped and typed like ``x`` with native
    calls only (the table-lookup kernel where the CPU and the layer allow it, up to
    ``LUT_MAX_ROWS_INT16`` rows on int16 tables; else up to ``GEMV_MAX_ROWS`` rows the small-batch
    kernel; both between one rounding pass and one scaling pass; more rows: the fused
    1x1-convolution path) and returns ``(y, x has a NaN)``. Bit
    for bit the op path's result; None where it does not apply."""
    ext = load_extension()
    setup = None if ext is None else _fused_setup(ext, x, act_bits, rounding, accumulator, shift_lo, bias)
    if setup is None or not _linear_native_ok(x, codes, weight_shape, weight_bits, bias, torch.int32):
        return None
    lanes, lo, hi, exponent, b = setup
    out_f, in_f = weight_shape
    rows = x.numel() // in_f
    lut = None if lanes == 16 and rows > LUT_MAX_ROWS_INT16 else _lut(ext, codes, weight_shape, weight_bits,
                                                                        has_zero, shift_lo)
    tiles = values = None
    bits, plan = 0, []
    if lut is not None:
        mode = _LUT
        tiles, values, bits = lut
    elif rows <= GEMV_MAX_ROWS:
        mode = _GEMV
        tiles = _gemv_tiles(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)
    else:
        mode = _CONV
        plan = _linear_plan(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes, rows)
    return ext.PreparedLinear(mode, tiles, values, bits, plan, b, out_f, in_f, rows, act_bits[1], lo, hi,
                              rounding == "floor", lanes, exponent, x.dtype == torch.float64,
                              [*x.shape[:-1], out_f])


def frozen_linear_cpu(x: Tensor, codes: Tensor, bias: Tensor | None, spec: str) -> Tensor:
    """``deepshift::frozen_linear`` on the CPU where the extension's C++ kernel has no prepared
    forward for the call: prepares (and remembers) one where native calls apply and runs it, else
    the reference's composition of the smaller ops."""
    s = parsed_spec(spec)

    def prepare():
        args = (x, codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo, bias, list(s.act_bits),
                s.act_rounding)
        if s.accumulator == "int64":
            return _prepare_linear_wide(*args)
        return _prepare_linear_fused(*args, s.accumulator)

    prepared = fused_forward(x, codes, bias, spec, prepare)
    if prepared is not None:
        y, has_nan = prepared.run(x)
        if has_nan:
            raise ref._nan_error()
        if y is not None:  # None: the wide kernel refuses this input
            return y
    return ref.frozen_linear_reference(x, codes, bias, spec)
