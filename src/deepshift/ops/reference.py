"""The pure-torch reference implementation of every ``deepshift::*`` op: what the op computes.

Each op (declared in :mod:`deepshift.ops.schemas`) uses its function here as its default
implementation; native kernels (C++, Triton) are checked against these functions bit for bit.

Integer semantics of ``shift_linear`` and ``shift_conv`` (integers only). Inputs:

* ``x``: int32 or int64 fixed-point integers (``x_real = x * 2**-F``; F is not an op argument,
  the ops are scale-free). The result has ``x``'s dtype: the caller picks int32 only when it has
  proved that no intermediate value overflows (see :func:`accumulator_bound`).
* ``codes``: the weight's codes, bit-packed by :func:`deepshift.pack_codes` (flattened in the
  weight's row-major order), ``weight_bits`` bits each: sign bit ``b-1`` (1 = negative) and shift
  field ``f`` (low ``b-1`` bits). The weight is ``s * 2**p`` with ``p = shift_lo + f - z``,
  ``z = 1`` when ``has_zero`` (DeepShift-PS; ``f == 0`` is then a zero weight), else ``z = 0``.
* ``bias``: optional, same dtype as ``x`` and the same fixed-point unit as ``x``.

Output, in units of ``2**u`` times ``x``'s unit with ``u = min(shift_lo, 0)``::

    y = sum_i s_i * (x_i << (p_i - u))  +  (bias << -u)

computed exactly with left shifts, negation and additions only: there is no multiplication of an
activation by a weight anywhere (torch's integer matmul/conv multiply, so they are not used).
For each output the inputs are gathered from a small table of pre-shifted, pre-negated copies of
``x`` (one entry per (shift, sign) the weights actually use, plus a zero entry) and summed.
Because ``p_i - u >= 0``, only left shifts occur, so the result is exact.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from deepshift.core.quantize import ps_shift_sign, q_shift_sign, to_fixed_point_int
from deepshift.frozen.spec import FrozenSpec
from deepshift.ops.codes import decode_codes

# Elements of the (rows, out, in) gather buffer built per step: bounds the reference's memory.
_GATHER_BUDGET = 1 << 22


_INT_DTYPES = (torch.int32, torch.int64)


def _check_int_inputs(x: Tensor, bias: Tensor | None) -> None:
    if x.dtype not in _INT_DTYPES:
        raise ValueError(f"x must be int32 or int64 fixed-point integers, got {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")


def _shift_gather_sum(x2d: Tensor, amount: Tensor, sign: Tensor) -> Tensor:
    """``out[n, o] = sum_k sign[o, k] * (x2d[n, k] << amount[o, k])`` without multiplications.

    A table holds ``x << a`` and ``-(x << a)`` for each shift amount ``a`` in use, and zero;
    every weight becomes an index into it, and the output is a gather followed by a sum.
    Rows are processed in chunks so the table and the gathered terms stay within a budget.
    """
    rows, fan_in = x2d.shape
    out_features = amount.shape[0]
    # Shift amounts in use, sorted (amounts are small non-negative ints: count, don't sort).
    used = torch.bincount(amount[sign != 0].reshape(-1)).nonzero().reshape(-1)
    n_entries = 1 + 2 * used.numel()  # zero, then (+x << a, -(x << a)) per used amount a
    # Index bookkeeping on the weights only (integer ops on codes, not on activations).
    slot = torch.searchsorted(used, amount.contiguous()) if used.numel() else torch.zeros_like(amount)
    entry = torch.where(sign == 0, 0, (slot << 1) + 1 + (sign < 0).to(slot.dtype))
    # Start of each entry's block in the flattened table (arange with a step: no multiply).
    block = torch.arange(0, n_entries * fan_in, fan_in, device=x2d.device)
    flat = (block[entry] + torch.arange(fan_in, device=x2d.device)).reshape(-1)
    out = x2d.new_empty(rows, out_features)
    step = max(1, _GATHER_BUDGET // max(1, out_features * fan_in, n_entries * fan_in))
    for start in range(0, rows, step):
        x = x2d[start : start + step]
        entries = [torch.zeros_like(x)]  # entry 0: zero weights contribute nothing
        for a in used.tolist():
            shifted = torch.bitwise_left_shift(x, a)
            entries += [shifted, torch.neg(shifted)]  # entries 1 + 2i (+) and 2 + 2i (-)
        table = torch.stack(entries, dim=1).reshape(x.shape[0], -1)  # (r, entries * fan_in)
        # (r, out * fan_in) gathered terms; their sum over fan_in is the output.
        picked = torch.index_select(table, 1, flat)
        out[start : start + step] = picked.reshape(-1, out_features, fan_in).sum(-1, dtype=x2d.dtype)
    return out


def _add_bias(y: Tensor, bias: Tensor | None, u: int, channel_dim: int) -> Tensor:
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + torch.bitwise_left_shift(bias, -u).reshape(shape)


def shift_linear_reference(x: Tensor, codes: Tensor, weight_shape: list[int], weight_bits: int,
                           has_zero: bool, shift_lo: int, bias: Tensor | None) -> Tensor:
    """Integer shift Linear: ``x`` (..., in) -> (..., out), see the module docstring.

    ``weight_shape`` is ``[out_features, in_features]``.
    """
    _check_int_inputs(x, bias)
    if len(weight_shape) != 2 or x.dim() < 1 or x.shape[-1] != weight_shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit a weight of shape {weight_shape}")
    rel, sign = decode_codes(codes, weight_shape, weight_bits, has_zero)
    u = min(shift_lo, 0)
    lead = x.shape[:-1]
    y = _shift_gather_sum(x.reshape(-1, weight_shape[1]), rel + (shift_lo - u), sign)
    y = _add_bias(y, bias, u, 1)
    return y.reshape(*lead, weight_shape[0])


def conv_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, transposed: bool,
    output_padding: int,
) -> int:
    """Spatial output size of one dimension, torch's formula for conv and transposed conv."""
    if transposed:
        return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _im2col(x: Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> Tensor:
    """(N, C, *S) -> (N, C, prod(kernel), *Out) by slicing (no arithmetic on values)."""
    dims = len(kernel)
    out_sizes = [
        (x.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(dims)
    ]
    patches = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)]
        for d, k in enumerate(offsets):
            start = k * dilation[d]
            index.append(slice(start, start + stride[d] * (out_sizes[d] - 1) + 1, stride[d]))
        patches.append(x[tuple(index)])
    return torch.stack(patches, dim=2)


def _dilate_and_pad_for_transpose(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
    output_padding: list[int],
) -> Tensor:
    """Input of the stride-1 convolution that equals a transposed convolution."""
    dims = len(kernel)
    n, c, *sizes = x.shape
    dilated = x.new_zeros(n, c, *[(s - 1) * st + 1 for s, st in zip(sizes, stride, strict=True)])
    dilated[(slice(None), slice(None), *[slice(None, None, st) for st in stride])] = x
    pads = []  # F.pad order: last dimension first
    for d in reversed(range(dims)):
        edge = dilation[d] * (kernel[d] - 1) - padding[d]
        pads += [edge, edge + output_padding[d]]
    # Negative pads crop, which is what a padding larger than the kernel reach means.
    return torch.nn.functional.pad(dilated, pads)


def shift_conv_reference(x: Tensor, codes: Tensor, weight_shape: list[int], weight_bits: int,
                         has_zero: bool, shift_lo: int, bias: Tensor | None, stride: list[int],
                         padding: list[int], dilation: list[int], groups: int, transposed: bool,
                         output_padding: list[int]) -> Tensor:
    """Integer shift convolution (1, 2 or 3 spatial dims, plain or transposed), batched input.

    ``x`` is (N, C_in, *spatial); ``weight_shape`` is torch's weight shape for the layer
    (``[C_out, C_in/groups, *k]``, or ``[C_in, C_out/groups, *k]`` when ``transposed``);
    ``padding`` is symmetric zero padding per spatial dimension (other padding modes and
    asymmetric padding are applied to ``x`` before the op). Semantics as in the module docstring.
    """
    _check_int_inputs(x, bias)
    dims = len(weight_shape) - 2
    if dims < 1 or x.dim() != dims + 2 or groups < 1:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit a weight of shape {weight_shape}")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation),
                        ("output_padding", output_padding)):
        if len(value) != dims:
            raise ValueError(f"{name} needs {dims} values, got {value}")
    rel, sign = decode_codes(codes, weight_shape, weight_bits, has_zero)
    kernel = list(weight_shape[2:])
    if transposed:
        c_in, c_out_g = weight_shape[0], weight_shape[1]
        if c_in % groups or x.shape[1] != c_in:
            raise ValueError(f"x has {x.shape[1]} channels, the weight expects {c_in}")
        c_in_g = c_in // groups
        flip = list(range(2, dims + 2))

        def as_conv(t: Tensor) -> Tensor:
            # (C_in, C_out/g, *k) -> (C_out, C_in/g, *k) with the kernel flipped: a rearrangement.
            t = t.reshape(groups, c_in_g, c_out_g, *kernel).transpose(1, 2)
            return t.reshape(groups * c_out_g, c_in_g, *kernel).flip(flip)

        rel, sign = as_conv(rel), as_conv(sign)
        x = _dilate_and_pad_for_transpose(x, kernel, stride, padding, dilation, output_padding)
        stride = [1] * dims
    else:
        if x.shape[1] != weight_shape[1] * groups or weight_shape[0] % groups:
            raise ValueError(f"x has {x.shape[1]} channels, the weight expects {weight_shape[1] * groups}")
        pads = []
        for d in reversed(range(dims)):
            pads += [padding[d], padding[d]]
        x = torch.nn.functional.pad(x, pads)
    c_out, c_in_g = rel.shape[0], rel.shape[1]
    n = x.shape[0]
    cols = _im2col(x, kernel, stride, dilation)  # (N, C_in, K, *Out)
    out_sizes = list(cols.shape[3:])
    positions = math.prod(out_sizes)
    fan_in = c_in_g * math.prod(kernel)
    cols = cols.reshape(n, groups, fan_in, positions)
    u = min(shift_lo, 0)
    amount = (rel + (shift_lo - u)).reshape(groups, c_out // groups, fan_in)
    sign = sign.reshape(groups, c_out // groups, fan_in)
    outs = []
    for g in range(groups):
        x2d = cols[:, g].transpose(1, 2).reshape(n * positions, fan_in)
        y = _shift_gather_sum(x2d, amount[g], sign[g])  # (N * positions, C_out/g)
        outs.append(y.reshape(n, positions, -1).transpose(1, 2))
    y = torch.cat(outs, dim=1).reshape(n, c_out, *out_sizes)
    return _add_bias(y, bias, u, 1)


class ShiftConvArgs(NamedTuple):
    """``deepshift::shift_conv``'s arguments after ``x``, in the op's order: the packed weight, its
    bias and torch's convolution options. Kernels unpack a call into one (``ShiftConvArgs(*args)``)
    and pass it on whole, instead of thirteen positional arguments."""

    codes: Tensor
    weight_shape: list[int]
    weight_bits: int
    has_zero: bool
    shift_lo: int
    bias: Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    transposed: bool
    output_padding: list[int]


def fan_in(weight_shape: list[int] | tuple[int, ...], transposed: bool = False, groups: int = 1) -> int:
    """Terms one output of a shift layer sums (borders aside): the accumulator bound's fan-in.

    Linear ``(out, in)``: ``in``; convolution ``(C_out, C_in/groups, *k)``: ``C_in/groups * prod(k)``;
    transposed convolution ``(C_in, C_out/groups, *k)``: ``C_in/groups * prod(k)`` as well.
    """
    per_group = weight_shape[0] // groups if transposed else weight_shape[1]
    return per_group * math.prod(weight_shape[2:])


def accumulator_bound(fan_in: int, max_abs_x: int, max_amount: int, max_abs_bias: int, u: int) -> int:
    """Largest magnitude any intermediate value of the ops can reach (table entry, partial sum).

    ``fan_in * max|x| * 2**max_amount + max|bias| * 2**-u``; int32 is safe when this is
    below ``2**31``, int64 when below ``2**63``.
    """
    return fan_in * max_abs_x * 2**max_amount + max_abs_bias * 2 ** (-u)


# ---- float <-> fixed point, and the frozen layers' whole forward -------------------------------

ACCUMULATORS = {"int32": torch.int32, "int64": torch.int64}


def _nan_error() -> ValueError:
    return ValueError("got a NaN input; fixed point has no NaN")


def quantize_input_reference(x: Tensor, act_bits: list[int], rounding: str, dtype: torch.dtype) -> Tensor:
    """``clamp(round(x * 2**F), lo, hi)`` as integers of ``dtype`` (``act_bits = (I, F)``).

    Rounded in float64, where ``x * 2**F`` and the saturation bounds (< 2**31) are exact, so the
    integers are the float64 simulation's for every input dtype. +-inf saturate; NaN raises.
    """
    if bool(torch.isnan(x).any()):
        raise _nan_error()
    return to_fixed_point_int(x.to(torch.float64), tuple(act_bits), rounding).to(dtype)


def scale_output_reference(y: Tensor, exponent: int, dtype: torch.dtype) -> Tensor:
    """``y * 2**exponent`` as ``dtype``: exact in float64 below 2**53, then rounded once."""
    return (y.to(torch.float64) * 2.0**exponent).to(dtype)


def channel_affine_reference(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale[c] + shift[c]`` over dimension 1, as two roundings (a multiply, then an add).

    Two operations on purpose: a fused multiply-add rounds once, and runtimes disagree on whether
    they fuse; separately rounded, every runtime (onnxruntime included) computes the same bits.
    """
    view = (-1,) + (1,) * (x.dim() - 2)
    return torch.add(torch.mul(x, scale.view(view)), shift.view(view))


def round_shift(x: Tensor, amount: Tensor | int) -> Tensor:
    """``x * 2**-amount`` rounded to the nearest integer (ties to even), by shifts: a right shift
    where ``amount > 0``, an exact left shift where it is negative. ``amount`` broadcasts."""
    amount = torch.as_tensor(amount, dtype=x.dtype, device=x.device)
    left = torch.clamp_min(-amount, 0)
    right = torch.clamp_min(amount, 0)
    x = torch.bitwise_left_shift(x, left)
    # floor((x + 2**(a-1) - 1 + lowest kept bit) / 2**a): round half to even; nothing where a == 0
    half = torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(right), right), 1)
    odd = torch.bitwise_and(torch.bitwise_right_shift(x, right), 1)
    adjust = torch.where(right > 0, half - 1 + odd, torch.zeros_like(odd))
    return torch.bitwise_right_shift(x + adjust, right)


def int_epilogue_reference(x: Tensor, signs: Tensor, lefts: Tensor, bias: Tensor | None, rights: Tensor,
                           pre: int, residual: Tensor | None, residual_shift: int, lo: int | None,
                           hi: int | None) -> Tensor:
    """An integer-only model's step after a shift layer, on int32 or int64 ``x`` (channels on
    dimension 1 when the parameters have more than one column; else one set for the whole tensor)::

        v = round_shift(x, pre)
        s = sum_k signs[k, c] * (v << lefts[k, c]) + bias[c]       (signs in {-1, 0, 1}: selected)
        y = clamp(round_shift(s, rights[c]) + (residual << residual_shift), lo, hi)

    i.e. a BatchNorm as a sum of powers of two, exact, rounded once (ties to even), then an
    optional residual (exactly aligned) and clamp (ReLU: ``lo = 0``). Computed in int64 (the caller
    proves no intermediate overflows: :class:`deepshift.frozen.integer.ChannelScale`); the result
    has ``x``'s dtype (an int32 result keeps the low 32 bits: the caller's clamp keeps it in range)."""
    out_dtype = x.dtype
    x = x.to(torch.int64)
    residual = None if residual is None else residual.to(torch.int64)
    per_channel = signs.shape[1] > 1

    def view(t: Tensor) -> Tensor:
        if not per_channel:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[1] = -1
        return t.reshape(shape)

    v = round_shift(x, pre) if pre else x
    y = None
    for sign, left in zip(signs, lefts, strict=True):
        term = torch.bitwise_left_shift(v, view(left))
        s = view(sign)
        term = torch.where(s > 0, term, torch.where(s < 0, -term, torch.zeros_like(term)))
        y = term if y is None else y + term
    if bias is not None:
        y = y + view(bias)
    y = round_shift(y, view(rights))
    if residual is not None:
        y = y + torch.bitwise_left_shift(residual, residual_shift)
    return (y if lo is None and hi is None else torch.clamp(y, lo, hi)).to(out_dtype)


def int_conv_reference(x: Tensor, codes: Tensor, bias: Tensor | None, spec: str, in_shift: int, in_lo: int,
                       in_hi: int, signs: Tensor | None, lefts: Tensor | None, ebias: Tensor | None,
                       rights: Tensor | None, pre: int, residual: Tensor | None, residual_shift: int,
                       lo: int | None, hi: int | None) -> Tensor:
    """An integer-only model's conv layer, int32 or int64 in and the same dtype out::

        q = clamp(round_shift(x, in_shift), in_lo, in_hi)       (the layer's input range)
        y = shift_conv(q) in the layer's accumulator, as x's dtype (the frozen layer's integer op)
        y = int_epilogue(y, signs, lefts, ebias, rights, pre, residual, residual_shift, lo, hi)

    the last step only where ``signs`` is given: the composition of the ``int_epilogue`` and
    ``shift_conv`` ops that :class:`deepshift.frozen.integer.IntegerConv` stands for (the epilogue
    takes the accumulator in int64, its result has x's dtype)."""
    s = FrozenSpec.from_json(spec)
    one = torch.ones(1, 1, dtype=torch.int64, device=x.device)
    shift = torch.full((1,), in_shift, dtype=torch.int64, device=x.device)
    q = torch.ops.deepshift.int_epilogue(x, one, torch.zeros_like(one), None, shift, 0, None, 0, in_lo, in_hi)
    acc = ACCUMULATORS[s.accumulator]
    q, padding = _padded(q.to(acc), s)
    y = torch.ops.deepshift.shift_conv(q, codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo,
                                       None if bias is None else bias.to(acc), list(s.stride), padding,
                                       list(s.dilation), s.groups, s.transposed, list(s.output_padding))
    if signs is None:
        return y.to(x.dtype)
    y = torch.ops.deepshift.int_epilogue(y.to(torch.int64), signs, lefts, ebias, rights, pre,
                                         None if residual is None else residual.to(torch.int64),
                                         residual_shift, lo, hi)
    return y.to(x.dtype)


def fake_quantize_reference(x: Tensor, frac_bits: int, lo: float, hi: float, floor: bool, band_lo: float,
                            band_hi: float) -> tuple[Tensor, Tensor]:
    """``(clamp(round(x * 2**F), lo, hi) * 2**-F, outside)``: training-time fixed point.

    ``outside`` (a bool scalar tensor) tells whether some element has ``x <= band_lo`` or
    ``x >= band_hi`` (NaN counts as inside): whether the straight-through gradient masks anything.
    """
    y = x * 2.0**frac_bits  # multiplying by a power of two is exact
    y = y.floor_() if floor else y.round_()
    y.clamp_(lo, hi).mul_(2.0**-frac_bits)  # clamp keeps NaN; +-inf saturate
    outside = torch.logical_or(x <= band_lo, x >= band_hi).any()
    return y, outside


def q_round_reference(weight: Tensor, p_min: int, p_max: int) -> Tensor:
    """DeepShift-Q's deterministic rounded weight ``sign(w) * 2**round(log2 |w|)`` in ``[p_min, p_max]``."""
    shift, sign = q_shift_sign(weight, (p_min, p_max))
    return sign.mul_(torch.exp2(shift))  # exact: a power of two times +-1


def ps_round_reference(shift: Tensor, sign: Tensor, p_min: int, p_max: int) -> Tensor:
    """DeepShift-PS's deterministic weight ``sign(round(sign)) * 2**round(clamp(shift))``."""
    p, s = ps_shift_sign(shift, sign, (p_min, p_max))
    return s.mul_(torch.exp2(p))  # exact: a power of two times -1, 0 or +1


def _float_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def conv_pads(padding, kernel_size, dilation) -> list[int]:
    """F.pad's list (left, right per dimension, last dimension first) for a conv's ``padding``.

    ``padding`` is "same", "valid" or ints; torch's own rule for "same": the extra element of
    an odd total goes on the right.
    """
    pads: list[int] = []
    for d in reversed(range(len(kernel_size))):
        if padding == "same":
            total = dilation[d] * (kernel_size[d] - 1)
            pads += [total // 2, total - total // 2]
        elif padding == "valid":
            pads += [0, 0]
        else:
            pads += [padding[d], padding[d]]
    return pads


def _padded(x: Tensor, spec: FrozenSpec) -> tuple[Tensor, list[int]]:
    """The conv input as the integer op takes it, and the op's (symmetric zero) padding: padding
    modes other than zeros and "same"/"valid" are applied to the float input first (padding
    copies values, so it commutes with the element-wise rounding)."""
    dims = len(spec.weight_shape) - 2
    if not spec.pad_outside:
        return x, list(spec.padding)
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    pads = conv_pads(spec.padding, spec.weight_shape[2:], spec.dilation)
    return torch.nn.functional.pad(x, pads, mode=mode), [0] * dims


def frozen_conv_output_shape(spec: FrozenSpec, input_shape) -> tuple[int, ...]:
    """The output shape of a frozen convolution for a batched input shape."""
    dims = len(spec.weight_shape) - 2
    sizes = list(input_shape[2:])
    padding = list(spec.padding) if not spec.pad_outside else [0] * dims
    if spec.pad_outside:
        pads = conv_pads(spec.padding, spec.weight_shape[2:], spec.dilation)
        sizes = [sizes[d] + pads[2 * (dims - 1 - d)] + pads[2 * (dims - 1 - d) + 1] for d in range(dims)]
    out = [conv_output_size(sizes[d], spec.weight_shape[2 + d], spec.stride[d], padding[d], spec.dilation[d],
                            spec.transposed, spec.output_padding[d]) for d in range(dims)]
    return (input_shape[0], spec.out_channels, *out)


def frozen_linear_reference(x: Tensor, codes: Tensor, bias: Tensor | None, spec: str) -> Tensor:
    """A frozen Linear layer on a float input: fixed point, ``shift_linear``, the scale back.

    ``spec`` is the layer's :class:`~deepshift.frozen.spec.FrozenSpec` as JSON; ``bias`` its int32
    ``bias_int`` (units ``2**-F``). The integers are of the spec's ``accumulator`` dtype; the
    output has x's float dtype (float32 for other dtypes).
    """
    s = FrozenSpec.from_json(spec)
    acc = ACCUMULATORS[s.accumulator]
    q = torch.ops.deepshift.quantize_input(x, list(s.act_bits), s.act_rounding, acc)
    y = torch.ops.deepshift.shift_linear(q, codes, list(s.weight_shape), s.weight_bits, s.has_zero,
                                         s.shift_lo, None if bias is None else bias.to(acc))
    return torch.ops.deepshift.scale_output(y, min(s.shift_lo, 0) - s.act_bits[1], _float_dtype(x))


def frozen_conv_reference(x: Tensor, codes: Tensor, bias: Tensor | None, spec: str, bn_scale: Tensor | None,
                          bn_shift: Tensor | None, residual: Tensor | None, relu: bool) -> Tensor:
    """A frozen convolution on a batched float input (as :func:`frozen_linear_reference`; padding
    modes applied first), then optionally ``channel_affine(y, bn_scale, bn_shift)`` (a frozen
    BatchNorm), ``+ residual`` and ReLU, each as torch computes it."""
    s = FrozenSpec.from_json(spec)
    acc = ACCUMULATORS[s.accumulator]
    x, padding = _padded(x, s)
    q = torch.ops.deepshift.quantize_input(x, list(s.act_bits), s.act_rounding, acc)
    y = torch.ops.deepshift.shift_conv(q, codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo,
                                       None if bias is None else bias.to(acc), list(s.stride), padding,
                                       list(s.dilation), s.groups, s.transposed, list(s.output_padding))
    y = torch.ops.deepshift.scale_output(y, min(s.shift_lo, 0) - s.act_bits[1], _float_dtype(x))
    if bn_scale is not None:
        y = torch.ops.deepshift.channel_affine(y, bn_scale, bn_shift)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y
