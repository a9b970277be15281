"""CPU kernels of the element-wise ops: weight rounding, fixed-point rounding, output scaling.

Each is one native pass where torch's path takes several, with the reference's bits; each takes the
op's arguments and hands any call it does not cover (another dtype, no native kernels) to the
op's reference implementation. (``channel_affine`` and ``int_epilogue`` have C++ op kernels:
``csrc/frozen.cpp``.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepshift.backends.cpu.build import load_extension
from deepshift.core.quantize import sqrt_half_above
from deepshift.ops import reference as ref

_FLOAT_DTYPES = (torch.float32, torch.float64)


def fake_quantize_cpu(x: Tensor, frac_bits: int, lo: float, hi: float, floor: bool, band_lo: float,
                      band_hi: float) -> tuple[Tensor, Tensor]:
    """``deepshift::fake_quantize`` on float32: the forward of :func:`deepshift.fixed_point` in one pass
    (torch's path takes four), the band check included."""
    ext = load_extension() if x.dtype == torch.float32 else None
    if ext is None:
        return ref.fake_quantize_reference(x, frac_bits, lo, hi, floor, band_lo, band_hi)
    y, outside = ext.fake_quantize(x.contiguous(), frac_bits, float(lo), float(hi), floor, float(band_lo),
                                   float(band_hi))
    return y, torch.tensor(outside)


def _weight_pass_ok(t: Tensor, p_min: int, p_max: int) -> bool:
    """Whether the native weight-rounding passes apply: a float32/float64 tensor whose dtype holds
    ``2**p_min`` .. ``2**p_max`` as normal numbers (the passes build powers of two from bits)."""
    if t.dtype not in _FLOAT_DTYPES:
        return False
    info = torch.finfo(t.dtype)
    return 2.0**p_min >= info.tiny and 2.0**p_max <= info.max


def q_round_cpu(weight: Tensor, p_min: int, p_max: int) -> Tensor:
    """``deepshift::q_round`` in one pass (torch's path takes about ten over the weight)."""
    ext = load_extension() if _weight_pass_ok(weight, p_min, p_max) else None
    if ext is None:
        return ref.q_round_reference(weight, p_min, p_max)
    # sqrt_half_above: the least value of the dtype above sqrt(1/2), where round(log2 m) steps up.
    return ext.q_round(weight.contiguous(), 2.0**p_min, 2.0**p_max, sqrt_half_above(weight.dtype))


def ps_round_cpu(shift: Tensor, sign: Tensor, p_min: int, p_max: int) -> Tensor:
    """``deepshift::ps_round`` in one pass."""
    ok = _weight_pass_ok(shift, p_min, p_max) and sign.dtype == shift.dtype and sign.shape == shift.shape
    ext = load_extension() if ok else None
    if ext is None:
        return ref.ps_round_reference(shift, sign, p_min, p_max)
    return ext.ps_round(shift.contiguous(), sign.contiguous(), float(p_min), float(p_max))


def quantize_input_cpu(x: Tensor, act_bits: list[int], rounding: str, dtype: torch.dtype) -> Tensor:
    """``deepshift::quantize_input`` in one pass: a power-of-two scale, rounding and clamping are
    exact in float64, so the native pass equals the reference element for element."""
    ok = x.dtype in _FLOAT_DTYPES and dtype in (torch.int32, torch.int64) and rounding in ("nearest", "floor")
    ext = load_extension() if ok else None
    if ext is None:
        return ref.quantize_input_reference(x, act_bits, rounding, dtype)
    total = act_bits[0] + act_bits[1]
    q, has_nan = ext.quantize(
        x, act_bits[1], -(2 ** (total - 1)), 2 ** (total - 1) - 1, rounding == "floor", dtype == torch.int64
    )
    if has_nan:
        raise ref._nan_error()
    return q


def scale_output_cpu(y: Tensor, exponent: int, dtype: torch.dtype) -> Tensor:
    """``deepshift::scale_output`` in one pass, for int32/int64 ``y`` and float32/float64 results."""
    ok = y.dtype in (torch.int32, torch.int64) and dtype in _FLOAT_DTYPES
    ext = load_extension() if ok else None
    if ext is None:
        return ref.scale_output_reference(y, exponent, dtype)
    return ext.scale(y, exponent, dtype == torch.float64)

