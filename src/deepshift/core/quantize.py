"""Pure tensor math of DeepShift: power-of-two rounding, fixed point, straight-through estimators.

Nothing here keeps state or modifies its inputs. Every rounded value is *exactly* a signed power
of two (or a fixed-point number): the straight-through estimators are autograd Functions whose
forward returns the rounded tensor itself and whose backward is the paper's gradient (the identity
for Q and for fixed point inside its range).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch
from torch import Tensor

LN2 = math.log(2.0)


def round_(x: Tensor, stochastic: bool = False) -> Tensor:
    """Round to integers (as floats): half to even, or stochastically.

    Stochastic rounding is ``floor(x) + Bernoulli(x - floor(x))``, so its expectation is ``x``.
    It draws from torch's global generator (seed it with ``torch.manual_seed``).
    """
    if not stochastic:
        return torch.round(x)
    floor = torch.floor(x)
    return floor + torch.bernoulli(x - floor)


@functools.cache
def sqrt_half_above(dtype: torch.dtype) -> float:
    """The least value of ``dtype`` above ``sqrt(1/2)`` (which, irrational, is never a float itself)."""
    x = math.sqrt(0.5)
    if Fraction(x) ** 2 < Fraction(1, 2):
        x = math.nextafter(x, 1.0)  # the least double above sqrt(1/2)
    c = torch.tensor(x, dtype=torch.float64).to(dtype).item()
    return c if c >= x else c + torch.finfo(dtype).eps / 2  # rounded down: one step up ([0.5, 1) spacing)


def _log2_nearest(magnitude: Tensor) -> Tensor:
    """``round(log2 m)`` exactly, for positive ``m`` (NaN kept), as ``m``'s dtype.

    With ``m = f * 2**e``, ``f`` in [0.5, 1), it is ``e`` when ``f > sqrt(1/2)`` and ``e - 1`` below
    (never a tie: ``sqrt(1/2)`` is irrational). Unlike ``round(log2(m))`` in floating point, which
    near ``sqrt(2) * 2**k`` can round to the wrong side, and costs a transcendental function.
    """
    mantissa, exponent = torch.frexp(magnitude)
    shift = (exponent - 1).add_(mantissa >= sqrt_half_above(magnitude.dtype)).to(magnitude.dtype)
    return shift.masked_fill_(torch.isnan(magnitude), math.nan)


def q_shift_sign(weight: Tensor, shift_range: tuple[int, int], stochastic: bool = False):
    """DeepShift-Q rounding of float weights to ``(shift, sign)``, both float tensors.

    ``shift = round(log2(clamp(|w|, 2**p_min, 2**p_max)))`` lies in ``[p_min, p_max]``;
    deterministic rounding is exact (the power of two nearest to ``|w|`` in log scale),
    stochastic rounding rounds ``log2`` up with probability its fractional part.
    ``sign`` is -1 for negative weights and +1 otherwise: Q has no zero weight (the paper's
    weight_bits count 2**(b-1) shifts times two signs), so an exact 0 becomes ``+2**p_min``,
    the nearest value Q can represent. No ``log2(0)`` is ever taken; +-inf saturate.
    """
    p_min, p_max = shift_range
    with torch.no_grad():
        magnitude = weight.detach().abs().clamp(2.0**p_min, 2.0**p_max)
        # Clamping the magnitude first keeps both rounding modes inside [p_min, p_max].
        shift = round_(torch.log2(magnitude), True) if stochastic else _log2_nearest(magnitude)
        sign = torch.where(weight.detach() < 0, -1.0, 1.0).to(weight.dtype)
    return shift, sign


class _QWeight(torch.autograd.Function):
    """``sign * 2**shift`` of :func:`q_shift_sign`; backward: the identity (straight through).

    Deterministic rounding is the op ``deepshift::q_round`` (on float32/float64 CPU weights one native
    pass, the same bits as its reference); the autograd graph is a single node either way.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, shift_range: tuple[int, int], stochastic: bool) -> Tensor:
        if not stochastic:
            return torch.ops.deepshift.q_round(weight, *shift_range)
        shift, sign = q_shift_sign(weight, shift_range, stochastic)
        return sign.mul_(torch.exp2(shift))  # exact: a power of two times +-1

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def q_weight(weight: Tensor, shift_range: tuple[int, int], stochastic: bool = False) -> Tensor:
    """DeepShift-Q forward weight ``sign(w) * 2**round(log2|w|)`` with a straight-through gradient."""
    return _QWeight.apply(weight, tuple(shift_range), stochastic)


def ps_shift_sign(
    shift: Tensor, sign: Tensor, shift_range: tuple[int, int], stochastic: bool = False
) -> tuple[Tensor, Tensor]:
    """Integer shift in ``[p_min, p_max]`` and ternary sign of DeepShift-PS parameters (no grad)."""
    p_min, p_max = shift_range
    with torch.no_grad():
        p = round_(shift.detach().clamp(p_min, p_max), stochastic)
        s = torch.sign(round_(sign.detach(), stochastic))
    return p, s


class _PSWeight(torch.autograd.Function):
    """``s * 2**p`` of :func:`ps_shift_sign`, with the paper's gradients (see :func:`ps_weight`).

    Deterministic rounding of float32/float64 CPU parameters is one native pass
    (the op ``deepshift::ps_round``, the same bits as its reference).
    """

    @staticmethod
    def forward(ctx, shift: Tensor, sign: Tensor, shift_range: tuple[int, int], stochastic: bool) -> Tensor:
        if stochastic:
            p, s = ps_shift_sign(shift, sign, shift_range, stochastic)
            w = s.mul_(torch.exp2(p))  # exact: a power of two times -1, 0 or +1
        else:
            w = torch.ops.deepshift.ps_round(shift, sign, *shift_range)
        ctx.save_for_backward(w)
        return w

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        return grad * (w * LN2), grad, None, None


def ps_weight(
    shift: Tensor, sign: Tensor, shift_range: tuple[int, int], stochastic: bool = False
) -> Tensor:
    """DeepShift-PS forward weight ``W = sign(round(sign)) * 2**round(shift)``.

    Gradients follow the paper (straight through both roundings and the range clamp):
    ``dL/dshift = dL/dW * s * 2**p * ln 2`` and ``dL/dsign = dL/dW``.
    """
    return _PSWeight.apply(shift, sign, tuple(shift_range), stochastic)


def ps_from_weight(weight: Tensor, shift_range: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Initial PS parameters from float weights: ``shift = round(log2|w|)`` clamped, ``sign = sign(w)``.

    Zero weights get ``sign = 0`` (so they stay zero) and ``shift = p_min`` (never ``-inf``).
    """
    p_min, p_max = shift_range
    with torch.no_grad():
        w = weight.detach()
        shift = _log2_nearest(w.abs().clamp(2.0**p_min, 2.0**p_max))  # exactly as Q rounds
        sign = torch.sign(w)
    return shift, sign


def fixed_point_limits(act_bits: tuple[int, int]) -> tuple[int, int]:
    """Inclusive integer range ``[-2**(I+F-1), 2**(I+F-1) - 1]`` of ``x * 2**F``."""
    int_bits, frac_bits = act_bits
    total = int_bits + frac_bits
    return -(2 ** (total - 1)), 2 ** (total - 1) - 1


def to_fixed_point_int(x: Tensor, act_bits: tuple[int, int], rounding: str = "nearest") -> Tensor:
    """The integers ``clamp(round(x * 2**F))`` as a float tensor (exact for |values| < 2**24 in fp32)."""
    lo, hi = fixed_point_limits(act_bits)
    scaled = x * 2.0 ** act_bits[1]  # multiplying by a power of two is exact
    rounded = torch.round(scaled) if rounding == "nearest" else torch.floor(scaled)
    return rounded.clamp(lo, hi)


class _FixedPoint(torch.autograd.Function):
    """Fixed-point rounding with a masked straight-through gradient, in few vectorised passes.

    Forward is the op ``deepshift::fake_quantize`` (on float32 CPU tensors one fused native pass),
    which also reports whether any input lies outside the gradient's pass band; when none does
    (the usual case), backward returns the incoming gradient as is, without a pass or a saved
    input. The masked backward is one fused pass computed from the saved input (no mask is stored).
    """

    @staticmethod
    def forward(ctx, x: Tensor, frac_bits: int, lo: int, hi: int, floor: bool) -> Tensor:
        # The gradient passes where clamping did not change the rounded value: x * 2**F in
        # (lo - 1/2, hi + 1/2) for nearest, (lo, hi + 1) for floor (the ends have measure zero).
        lo_x, hi_x = (lo, hi + 1) if floor else (lo - 0.5, hi + 0.5)
        ctx.bounds = (lo_x * 2.0**-frac_bits, hi_x * 2.0**-frac_bits)
        y, outside = torch.ops.deepshift.fake_quantize(x, frac_bits, lo, hi, floor, *ctx.bounds)
        ctx.identity = not bool(outside)
        ctx.save_for_backward(None if ctx.identity else x)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.identity:  # no input was outside the band: the mask below would keep every element
            return grad, None, None, None, None
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        # One fused pass: 0 where x <= lo or x >= hi (bounds as float32; +-inf included), else
        # grad. NaN inputs pass their gradient.
        return torch.ops.aten.hardtanh_backward(grad, x, lo, hi), None, None, None, None


def fixed_point(x: Tensor, act_bits: tuple[int, int], rounding: str = "nearest") -> Tensor:
    """Round ``x`` to signed fixed point with ``I`` integer bits (sign included) and ``F`` fraction bits.

    Values are multiples of ``2**-F`` in ``[-2**(I-1), 2**(I-1) - 2**-F]``; out-of-range values
    (and infinities) saturate; NaN stays NaN. ``rounding`` is ``"nearest"`` (half to even) or
    ``"floor"``. The gradient is straight-through where the value did not saturate and zero
    where it did.
    In float32 with ``I + F > 24`` the saturation bounds themselves are rounded to float32.
    """
    lo, hi = fixed_point_limits(act_bits)
    floor = rounding == "floor"
    if not (x.requires_grad and torch.is_grad_enabled()):
        # No gradient: the rounding alone, without the band check or an autograd node.
        return torch.ops.deepshift.fake_quantize(x, act_bits[1], lo, hi, floor, -math.inf, math.inf)[0]
    return _FixedPoint.apply(x, act_bits[1], lo, hi, floor)
