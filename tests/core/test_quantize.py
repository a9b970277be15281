"""Hand-worked cases of the pure rounding math (core/quantize.py), and its native passes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshift.backends.cpu import build, elementwise
from deepshift.core.quantize import (
    fixed_point,
    fixed_point_limits,
    ps_from_weight,
    ps_shift_sign,
    ps_weight,
    q_shift_sign,
    q_weight,
    round_,
    sqrt_half_above,
)

R5Q = (-15, 0)  # 5-bit Q
R5PS = (-14, 0)  # 5-bit PS


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_q_rounds_in_the_log_domain_not_the_linear_one():
    # 0.7 and 0.71 straddle the log-domain midpoint 2**-0.5 = 0.7071 between 0.5 and 1;
    # 0.74 is below the linear midpoint 0.75 but above the log one, so it goes up.
    w = t(0.7, 0.71, 0.74, -0.7, -0.71, 0.3, 0.36)
    assert q_weight(w, R5Q).tolist() == [0.5, 1.0, 1.0, -0.5, -1.0, 0.25, 0.5]


def test_log_domain_midpoints_just_above_and_below():
    for k in range(-14, 0):
        mid = 2.0 ** (k + 0.5)
        below, above = math.nextafter(mid, 0) * (1 - 1e-12), mid * (1 + 1e-12)
        assert q_weight(t(below, -above), R5Q).tolist() == [2.0**k, -(2.0 ** (k + 1))]


def test_half_to_even_and_clamping_at_both_ends():
    assert round_(t(0.5, 1.5, 2.5, -0.5, -2.5)).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]
    # above 2**p_max -> 2**p_max; below 2**p_min -> 2**p_min, signs kept
    assert q_weight(t(3.0, -100.0, 1e-9, -1e-30), R5Q).tolist() == [1.0, -1.0, 2**-15, -(2**-15)]
    # left shifts allowed by a raised p_max
    assert q_weight(t(3.0, 5.0, 100.0), (-12, 3)).tolist() == [4.0, 4.0, 8.0]


def test_q_has_no_zero_weight_and_never_takes_log_of_zero():
    w = t(0.0, -0.0, 0.0)
    out = q_weight(w, R5Q)
    assert out.tolist() == [2**-15] * 3
    assert torch.isfinite(out).all()


def test_exact_powers_of_two_are_kept_exactly():
    for p in range(-15, 1):
        w = t(2.0**p, -(2.0**p), dtype=torch.float32)
        assert torch.equal(q_weight(w, R5Q), w)
        shift, sign = ps_from_weight(w, R5Q)
        assert shift.tolist() == [p, p] and sign.tolist() == [1, -1]


def test_ps_forward_rounds_shift_and_ternary_sign():
    shift = t(-1.2, 0.3, -3.5, -2.5, -20.0, 4.0)
    sign = t(0.8, -0.6, 0.4, -0.5, 1.7, -1.0)
    w = ps_weight(shift, sign, R5PS)
    # round(-3.5) = -4 and round(-2.5) = -2 (half to even); |sign| < 0.5 and -0.5 give zero.
    assert w.tolist() == [0.5, -1.0, 0.0, -0.0, 2.0**-14, -1.0]


def test_ps_from_weight_keeps_zeros_and_clamps():
    shift, sign = ps_from_weight(t(0.0, 0.3, -5.0, 1e-12), R5PS)
    assert sign.tolist() == [0, 1, -1, 1]
    assert shift.tolist() == [-14, -2, 0, -14]
    assert torch.isfinite(shift).all()


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(1)
    x = torch.full((40000,), -2.3, dtype=torch.float64)
    r = round_(x, stochastic=True)
    assert set(r.unique().tolist()) == {-3.0, -2.0}
    assert abs(r.mean().item() - (-2.3)) < 0.01
    # Q: the expected shift is log2|w|, and every draw is a neighbour power of two
    w = torch.full((40000,), 0.3, dtype=torch.float64)
    shift, _ = q_shift_sign(w, R5Q, stochastic=True)
    assert set(shift.unique().tolist()) == {-2.0, -1.0}
    assert abs(shift.mean().item() - math.log2(0.3)) < 0.01
    # PS: expectation of the shift parameter, and stays within range at the bounds
    p, _ = ps_shift_sign(torch.full((40000,), -5.75), torch.ones(40000), R5PS, stochastic=True)
    assert abs(p.mean().item() + 5.75) < 0.01
    p, _ = ps_shift_sign(t(0.0, -14.0, 3.0, -30.0), t(1, 1, 1, 1), R5PS, stochastic=True)
    assert p.tolist() == [0, -14, 0, -14]


@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_fixed_point_saturates_at_both_ends(rounding):
    x = t(10.0, -10.0, 3.99, -4.0, -4.01)
    # I=3, F=5: multiples of 1/32 in [-4, 4 - 1/32]
    out = fixed_point(x, (3, 5), rounding)
    assert out.tolist() == [4 - 1 / 32, -4.0, 4 - 1 / 32 if rounding == "nearest" else 3.96875, -4.0, -4.0]
    assert fixed_point_limits((3, 5)) == (-128, 127)


def test_fixed_point_with_one_integer_bit_and_negative_values():
    x = t(0.9, 0.99, -0.3, -1.0, -1.2, 0.0625, 0.1875, -0.0625)
    # I=1, F=3: multiples of 1/8 in [-1, 7/8]; nearest is half to even
    assert fixed_point(x, (1, 3)).tolist() == [0.875, 0.875, -0.25, -1.0, -1.0, 0.0, 0.25, -0.0]
    # floor (the original code's rounding) goes down, also for negatives
    assert fixed_point(x, (1, 3), "floor").tolist() == [0.875, 0.875, -0.375, -1.0, -1.0, 0.0, 0.125,
                                                        -0.125]
    # I=1, F=0: the only values are -1 and 0
    assert fixed_point(t(0.7, -0.7, 3.0), (1, 0)).tolist() == [0.0, -1.0, 0.0]


def test_fixed_point_keeps_nan_saturates_inf_and_masks_the_gradient():
    x = t(float("nan"), 0.5, 100.0, -100.0, float("inf"), float("-inf")).requires_grad_()
    for rounding in ("nearest", "floor"):
        out = fixed_point(x, (3, 5), rounding)
        assert math.isnan(out[0].item())
        assert out[1:].tolist() == [0.5, 4 - 1 / 32, -4.0, 4 - 1 / 32, -4.0]
        (g,) = torch.autograd.grad(out[1:].sum(), x)
        assert g.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # straight through inside only


def test_float32_and_both_roundings_agree_with_plain_formula():
    x = torch.randn(5000) * 3
    for ab in [(3, 5), (1, 7), (8, 0), (16, 16)]:
        lo, hi = fixed_point_limits(ab)
        for rounding, fn in (("nearest", torch.round), ("floor", torch.floor)):
            expected = fn(x * 2.0 ** ab[1]).clamp(lo, hi) * 2.0 ** -ab[1]
            assert torch.equal(fixed_point(x, ab, rounding), expected)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-64, max_value=64, allow_nan=False, width=32), st.integers(2, 8),
       st.integers(-4, 4))
def test_q_picks_the_log_nearest_allowed_power(w, bits, max_shift):
    p_min, p_max = max_shift - 2 ** (bits - 1) + 1, max_shift
    q = q_weight(t(w), (p_min, p_max)).item()
    p = math.log2(abs(q))
    assert p == int(p) and p_min <= p <= p_max
    assert math.copysign(1.0, q) == (-1.0 if w < 0 else 1.0)
    if 2.0**p_min <= abs(w) <= 2.0**p_max:
        assert abs(p - math.log2(abs(w))) <= 0.5 + 1e-12


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-4, max_value=4, allow_nan=False, allow_subnormal=False, width=32),
       st.integers(3, 8))
def test_ps_from_weight_then_forward_equals_q_rounding_for_nonzero_weights(w, bits):
    # The two methods round a float weight the same way (PS just has one code fewer).
    rng = (-(2 ** (bits - 1)) + 2, 0)
    shift, sign = ps_from_weight(t(w), rng)
    ps = ps_weight(shift, sign, rng)
    if w == 0:
        assert ps.item() == 0
    else:
        assert torch.equal(ps, q_weight(t(w), rng))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_rounding_is_exact_next_to_the_log_midpoints(dtype):
    # sqrt(2) * 2**k is the log-domain midpoint between 2**k and 2**(k + 1); the floats on either
    # side of it round to their own side. (round(log2(m)) in float32 gets one of them wrong per
    # binade: its log2 rounds to exactly k + 1/2, and half-to-even then picks the even side.)
    above = sqrt_half_above(dtype)
    assert above**2 > 0.5
    below = torch.nextafter(torch.tensor(above, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()
    assert below**2 < 0.5
    ks = torch.arange(-15, 1, dtype=dtype)
    w = torch.cat([below * 2.0 ** (ks + 1), above * 2.0 ** (ks + 1)])
    w = torch.cat([w, -w])
    expected = torch.cat([ks, ks + 1] * 2)
    shift, sign = q_shift_sign(w, (-16, 2))
    assert torch.equal(shift, expected)
    assert torch.equal(q_weight(w, (-16, 2)), sign * torch.exp2(expected))
    assert torch.equal(ps_from_weight(w, (-16, 2))[0], expected)  # converting to PS rounds alike


def _both_paths(fn, monkeypatch):
    """fn() with the native weight-rounding passes, then with the ops' torch reference (natives disabled)."""
    native = fn()
    with monkeypatch.context() as m:
        m.setenv("DEEPSHIFT_NO_NATIVE", "1")
        torch_path = fn()
    return native, torch_path


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) \
        and torch.equal(a.signbit(), b.signbit())


SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-130, -(2.0**-140), 1e30, -1e30, 0.5, -2.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift_range", [(-15, 0), (-3, 2), (-126, 0), (-127, 0), (0, 0)])
def test_native_weight_rounding_equals_the_torch_path(dtype, shift_range, monkeypatch):
    if build.load_extension() is None:
        pytest.skip("native kernels unavailable (no compiler, or DEEPSHIFT_NO_NATIVE set)")
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(20000, generator=g, dtype=dtype) * 0.3, t(*SPECIALS, dtype=dtype)])
    w.requires_grad_()
    up = torch.randn(w.shape, generator=g, dtype=dtype)
    # 2**-127 is subnormal in float32: the native pass declines and the torch path runs.
    applies = elementwise._weight_pass_ok(w.detach(), *shift_range)
    assert applies == (dtype == torch.float64 or shift_range[0] >= -126)

    def q():
        out = q_weight(w, shift_range)
        (grad,) = torch.autograd.grad((out * up).sum(), w)
        return out.detach(), grad

    (a, ga), (b, gb) = _both_paths(q, monkeypatch)
    assert _same_bits(a, b) and torch.equal(ga, gb) and torch.equal(ga, up)
    lo, hi = 2.0 ** shift_range[0], 2.0 ** shift_range[1]
    # +-0 -> +2**p_min (Q has no zero), +-inf and +-1e30 saturate, NaN stays NaN
    assert a[-11:-7].tolist()[:4] == [lo, lo, hi, -hi] and a[-4:-2].tolist() == [hi, -hi]
    assert math.isnan(a[-7].item())

    shift = torch.cat([torch.randn(20000, generator=g, dtype=dtype) * 4 - 3, t(*SPECIALS, dtype=dtype)])
    sign = torch.cat([torch.randn(20000, generator=g, dtype=dtype), t(*SPECIALS[::-1], dtype=dtype)])
    shift.requires_grad_()
    sign.requires_grad_()

    def ps():
        out = ps_weight(shift, sign, shift_range)
        gs, gg = torch.autograd.grad((out * up).sum(), (shift, sign))
        return out.detach(), gs, gg

    (a, gs_a, gg_a), (b, gs_b, gg_b) = _both_paths(ps, monkeypatch)
    assert _same_bits(a, b) and _same_bits(gs_a, gs_b) and torch.equal(gg_a, gg_b)
    assert torch.equal(gg_a, up)
    torch.testing.assert_close(gs_a, up * a * math.log(2.0), equal_nan=True)


def test_fixed_point_without_gradient_equals_the_autograd_path():
    x = torch.cat([torch.randn(5000) * 3, t(math.nan, math.inf, -math.inf, 0.5, -0.0, dtype=torch.float32)])
    for ab in [(3, 5), (16, 16), (1, 7)]:
        for rounding in ("nearest", "floor"):
            with torch.no_grad():
                a = fixed_point(x, ab, rounding)
            b = fixed_point(x.clone().requires_grad_(), ab, rounding).detach()
            assert _same_bits(a, b)
