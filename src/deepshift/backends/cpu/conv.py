"""CPU kernels of ``deepshift::shift_conv`` and ``deepshift::frozen_conv``, and what Linear shares.

The C++ extension (``csrc/``, see :mod:`deepshift.backends.cpu.build`) is built on first use;
without it (no compiler, a failed build, ``DEEPSHIFT_NO_NATIVE=1``) every kernel hands its call to
the op's reference implementation.

Results equal the reference op bit for bit for every input (the kernels use wrapping integer
arithmetic exactly like torch's int32/int64 tensors). The instruction set is chosen at run time:
AVX2 where ``__builtin_cpu_supports("avx2")``, else a portable path (:func:`set_isa` forces one).

Algorithms (no multiplication of an activation by a weight anywhere; multiplications occur only in
index arithmetic: row / plane offsets, computed per row or per weight, never per activation):

* Linear, up to ``GEMV_MAX_ROWS`` input rows, int32 lanes: a cached byte per weight (sign, shift
  amount) in tiles of 8 output features; per weight column: broadcast ``x[k]``, variable left shift
  (``vpsllvd``), sign (``vpsignd``), add.
* Convolution (any dims, stride, padding, dilation, groups; transposed through the reference's
  rewrite to a stride-1 convolution) and Linear with more rows (as a 1x1 convolution over the
  rows): per image, a table of the zero-padded input (strided columns split into phases so every
  read is contiguous); each non-zero weight becomes a *term*, an offset into the table. An output's
  terms, positive then negative, amounts descending, are summed in *segments* by Horner's rule
  term by term, ``s = (s << d) + x`` with ``d`` the drop in amount since the previous term (stored
  in the term's low bits), and each segment's sum is shifted by its last amount and added to or
  subtracted from the output (exact mod 2**bits, like torch's wrapping ops): per term and vector
  one load, one uniform shift and one add, and no branch where the amount or sign changes (an
  output has a few terms per amount, a varying number: loops per amount and sign paid a
  mispredicted exit each, about as much as their sums). One amount's terms, where there are many
  (8 for spatial kernels, 32 for 1x1), make a segment without the shifts. Zero weights have no
  term. Term lists are split into channel blocks so the table slice in use stays in L1. Horner's
  rule needs no pre-shifted copies of the input, so the table is as small as the input itself.
* 8-bit activations (every ``|x| <= 128``, checked per call; computed on int32 lanes): the table
  holds int16 copies, 16 outputs per vector (half the loads and adds), and the plan ends a segment
  where its bound on the int16 sum (the terms' count times 128, shifted) could reach 2**15, so the
  sums are exact in int16 and results are the int32 path's bit for bit.
* Narrow rows (8x8 planes: half of every 16-lane vector idle): a whole plane can be computed as one
  long row over the table's rows (the positions between rows are computed and dropped; ~40% fewer
  vectors there). The table is split into stride phases (rows and columns) so that this holds for
  strided convolutions too: ResNet-50's 512-channel stride-2 3x3 conv (7x7 outputs) takes 4 vectors
  per term instead of 7 rows. Rows of at most 8 outputs can also use 8-lane int16 vectors, one per
  row (no idle lane); where 256-bit operations cost two 128-bit ones (Zen 1, the portable build) that
  is preferred. Each channel's table plane (of 32 elements or more) starts 64-byte aligned.
* int64 inputs run in int32 lanes (then widen) when the actual ``max|x|``, ``max|bias|`` and the
  weights' largest sum of ``2**amount`` over one output prove every intermediate value is below
  ``2**31`` (``_weight_sum``; frozen layers with int64 accumulators too); otherwise convolutions sum
  their segments on an int16 (every ``|x| <= 128``) or int32 (``|x| <= 2**15``) table, ended where
  the sums could leave those lanes, and add them in int64 lanes (per segment, not per term); other
  inputs run in int64 lanes.
* Strided 1x1 convolutions without padding (ResNet's shortcuts) run, in the fused forward below, as
  the stride-1 convolution of every stride-th input: no table of inputs they never read.

Caches: decoded weights (an int8 signed shift code per weight), the Linear tiles, the term lists and
each call signature's prepared arguments are kept in a small LRU (``CACHE_MAX_BYTES`` in total)
keyed on the codes tensor's ``data_ptr``, ``_version`` (bumped by in-place writes such as
``load_state_dict``), size and the layer/input geometry, and validated by a weak reference to the
very tensor (a new tensor at a recycled address never hits a stale entry). Inference tensors (no
version counter) are not cached. Calls with little work (< ~0.1 ms) run on one thread.

A frozen layer's whole forward (``deepshift::frozen_conv``, ``frozen_linear``) is one native call:
it takes the float input, rounds it to fixed point while building the kernel's table (8-bit
``act_bits`` guarantee the int16 path, so no range check), runs the same kernel and scales each
image's output to float while it is still in cache; bit for bit the reference's composition of
``quantize_input``, ``shift_conv`` and ``scale_output`` (int32 accumulators, or int64 ones on int16 /
int32 tables where the activations have at most 16 bits), without the intermediate integer tensors or
the per-call Python work of three ops (at batch 1 that work cost as much as the kernels). The call
is prepared here once per layer and input signature (an extension ``PreparedConv``) and then run by
the op's C++ kernel (``csrc/frozen.cpp``) without entering Python.

"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepshift.backends.cpu import cache, machine
from deepshift.backends.cpu.build import load_extension
from deepshift.backends.cpu.cache import _cached, fused_forward, parsed_spec
from deepshift.ops import reference as ref

_FLOAT_DTYPES = (torch.float32, torch.float64)

INT16_MAX_ABS = 128
"""Inputs with every |x| <= this (8-bit activations) take the int16-table fast path of the conv kernel
(and of Linear beyond GEMV_MAX_ROWS rows) when the result is computed on int32 lanes: 255 such
terms sum exactly in int16, and the plan ends each segment before its bound on the sum reaches 255
such terms (INT16_MAX_GROUP)."""


INT16_MAX_GROUP = 255
# Lanes of int64-accumulator calls whose inputs fit a narrow table: int16 (every |x| <= 128) or int32
# (every |x| <= 2**15, segments bounded by WIDE32_MAX_GROUP terms' worth: |sum| < 2**31), summed in
# the table's lanes and added into int64 per segment (the extension's conv_wide).
WIDE16, WIDE32 = -16, -32
WIDE32_MAX_ABS = 2**15
WIDE32_MAX_GROUP = 2**16 - 1


_LANE_DTYPES = {16: torch.int16, 32: torch.int32, 64: torch.int64}


L1D_BYTES = machine.l1d_bytes()
"""This CPU's L1 data cache per core, as the OS reports it (32 KiB where it does not say)."""

TABLE_BLOCK_BYTES = L1D_BYTES // 2
"""Bytes of the input table one work item of a convolution reads per channel block: half of the
L1 data cache (16 KiB of 32), so the slice stays in L1 beside the term lists streaming past it.
Smaller blocks cost an extra pass over the item's outputs each (see ``conv_plan``)."""

POINTWISE_BLOCK_BYTES = L1D_BYTES * 3 // 4
"""The same for 1x1 convolutions and batched Linear layers (a 1x1 convolution over the rows): one
term per channel streams far less term data than a spatial kernel's, so a larger share of L1 holds
the table. (ResNet-50's 1x1 convs at batch 1, one thread, AMD EPYC with 32 KiB L1: 14x14 and 7x7
planes 5-12% faster with 24 KiB than with 16 KiB, 56x56 and 28x28 within 5% either way; 3x3 convs
were slower.)"""


def _shifted_bias(bias: Tensor | None, u: int) -> Tensor | None:
    """The op's bias in output units ``2**u`` (``u = min(shift_lo, 0)``): ``bias << -u``."""
    return None if bias is None else (bias if u == 0 else torch.bitwise_left_shift(bias, -u)).contiguous()


def _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, lanes):
    """(scode int8 in the weight's shape, largest used shift amount or -1): cached."""
    u = min(shift_lo, 0)

    def make():
        scode, max_amount = ext.decode(
            codes.contiguous(), math.prod(weight_shape), weight_bits, has_zero, shift_lo - u, lanes
        )
        return scode.reshape(tuple(weight_shape)), int(max_amount)

    return _cached(codes, ("dec", tuple(weight_shape), weight_bits, has_zero, shift_lo, lanes), make)


def _max_abs(t: Tensor) -> int:
    if t.numel() == 0:
        return 0
    lo, hi = torch.aminmax(t)
    return max(-int(lo), int(hi))


def _weight_sum(ext, codes, weight_shape, weight_bits, has_zero, shift_lo) -> int:
    """The largest sum, over one output's non-zero weights, of ``2**amount`` (a weight's shift in the
    output units ``2**u`` the kernels compute in). ``max|x| * this + max|bias << -u|`` bounds every
    value the kernels compute: an output's partial sums (over channel blocks, over Horner's steps
    divided by a power of two) are sums over subsets of its terms. Where few weights take the largest
    shift this is far below ``fan_in * max|x| * 2**max_amount`` (the bound a layer's accumulator is
    chosen by when it is frozen), so layers frozen with int64 accumulators often run exactly in int32
    lanes. Cached; 2**62 stands for "too large for int32" (a used amount of 31 or more)."""
    def make():
        scode, max_amount = _decoded(ext, codes, weight_shape, weight_bits, has_zero, shift_lo, 64)
        if max_amount >= 31:
            return torch.tensor(2**62)
        a = scode.to(torch.int64).abs_()
        powers = torch.where(a > 0, torch.bitwise_left_shift(torch.ones_like(a), (a - 1).clamp_min_(0)), 0)
        return powers.reshape(weight_shape[0], -1).sum(1).max() if a.numel() else torch.tensor(0)

    return int(_cached(codes, ("wsum", tuple(weight_shape), weight_bits, has_zero, shift_lo), make))


def _int32_exact(x_max: int, weight_sum: int, bias_max: int) -> bool:
    """Whether int32 lanes compute a layer exactly: every value the kernels form is a sum over a
    subset of an output's terms (divided by a power of two inside Horner's segments) plus at most the
    bias, so ``max|x| * weight_sum + max|bias|`` below ``2**31`` bounds them all (see
    :func:`_weight_sum`). The one test behind every choice of int32 lanes for int64 work."""
    return x_max * weight_sum + bias_max < 2**31


def _lanes_for(ext, x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias_s, fan_in,
               int16: bool, wide: bool = False) -> int:
    """The lanes a call computes in: 64 (int64), 32 (int32), or 16 (int16 tables, int32 arithmetic);
    with ``wide`` (the conv kernel), WIDE16 / WIDE32 (int16 / int32 tables, int64 arithmetic).

    int32 x computes in int32; int64 x in int32 when the bound of the sums (:func:`_weight_sum`)
    proves that exact, else int64, on a narrow table where ``wide`` and every ``|x|`` fits one. Where
    int32 is used and ``int16`` (the kernel has the 8-bit path), inputs with every
    ``|x| <= INT16_MAX_ABS`` take 16.
    ``max|x|`` is computed at most once, and not at all for int32 x without the 8-bit path (the
    small-batch Linear kernel).
    """
    if x.dtype == torch.int32 and not int16:
        return 32
    x_max = _max_abs(x)
    if x.dtype != torch.int32:
        wsum = _weight_sum(ext, codes, weight_shape, weight_bits, has_zero, shift_lo)
        if not _int32_exact(x_max, wsum, 0 if bias_s is None else _max_abs(bias_s)):
            if wide and x_max <= WIDE32_MAX_ABS:
                return WIDE16 if x_max <= INT16_MAX_ABS else WIDE32
            return 64
    return 16 if int16 and x_max <= INT16_MAX_ABS else 32


def _valid_codes(codes: Tensor, weight_shape, weight_bits) -> bool:
    return (
        isinstance(weight_bits, int)
        and 2 <= weight_bits <= 8
        and codes.dtype == torch.uint8
        and codes.device.type == "cpu"
        and codes.numel() == (math.prod(weight_shape) * weight_bits + 7) // 8
    )


def _conv_native_ok(x: Tensor, a: ref.ShiftConvArgs) -> bool:
    weight_shape = a.weight_shape
    dims = len(weight_shape) - 2
    if not 1 <= dims <= 3 or x.dtype not in (torch.int32, torch.int64) or x.dim() != dims + 2:
        return False
    if not _valid_codes(a.codes, weight_shape, a.weight_bits) or min(weight_shape) <= 0 or x.numel() == 0:
        return False
    if any(len(v) != dims for v in (a.stride, a.padding, a.dilation, a.output_padding)) or a.groups < 1:
        return False
    if min(a.stride) < 1 or min(a.dilation) < 1 or min(a.padding) < 0 or min(a.output_padding) < 0:
        return False
    c_out = weight_shape[1] * a.groups if a.transposed else weight_shape[0]
    if a.bias is not None and (a.bias.dtype != x.dtype or a.bias.shape != (c_out,)):
        return False
    if a.transposed:
        if weight_shape[0] % a.groups or x.shape[1] != weight_shape[0]:
            return False
    elif weight_shape[0] % a.groups or x.shape[1] != weight_shape[1] * a.groups:
        return False
    sizes = [ref.conv_output_size(x.shape[2 + d], weight_shape[2 + d], a.stride[d], a.padding[d],
                                  a.dilation[d], a.transposed, a.output_padding[d]) for d in range(dims)]
    return min(sizes) >= 1


class _ConvCall:
    """What a conv call with one signature (shapes, options) needs besides x and bias: cached."""

    def __init__(self, ext, a: ref.ShiftConvArgs):
        weight_shape = a.weight_shape
        dims = len(weight_shape) - 2
        self.kernel = list(weight_shape[2:])
        self.transposed = a.transposed
        self.groups = a.groups
        self.tstride, self.tpadding = list(a.stride), list(a.padding)
        self.tdilation, self.toutput_padding = list(a.dilation), list(a.output_padding)
        self.fan_in = ref.fan_in(weight_shape, a.transposed, a.groups)
        stride, padding = ([1] * dims, [0] * dims) if a.transposed else (a.stride, a.padding)
        self.pre = 3 - dims
        self.s3 = [1] * self.pre + list(stride)
        self.p3 = [0] * self.pre + list(padding)
        self.d3 = [1] * self.pre + list(a.dilation)
        # Not the codes tensor: this record is cached under it, and holding it would keep it alive.
        self.args = (ext, tuple(weight_shape), a.weight_bits, a.has_zero, a.shift_lo)
        self.by_lanes: dict[int, tuple] = {}
    def weights(self, codes, lanes):
        """(w5 shape, conv-layout scode) for the lane width."""
        ext, weight_shape, weight_bits, has_zero, shift_lo = self.args
        scode, _ = _decoded(ext, codes, list(weight_shape), weight_bits, has_zero, shift_lo, lanes)
        if self.transposed:
            groups, kernel = self.groups, self.kernel
            c_in_g, c_out_g = weight_shape[0] // groups, weight_shape[1]

            def as_conv():
                # (C_in, C_out/g, *k) -> (C_out, C_in/g, *k), kernel flipped: the reference's rewrite.
                t = scode.reshape(groups, c_in_g, c_out_g, *kernel).transpose(1, 2)
                t = t.reshape(groups * c_out_g, c_in_g, *kernel).flip(list(range(2, len(kernel) + 2)))
                return t.contiguous()

            scode = _cached(
                codes, ("tconv", weight_shape, weight_bits, has_zero, shift_lo, lanes, groups), as_conv
            )
        w5 = scode.reshape(scode.shape[0], scode.shape[1], *([1] * self.pre), *scode.shape[2:])
        return w5

    def prepared(self, ext, codes, lanes, x5_shape):
        """(w5 shape, plan) for the lane width and the kernel's 5-d input shape (fixed per call
        signature), made once."""
        prepared = self.by_lanes.get(lanes)
        if prepared is None:
            w5 = self.weights(codes, 64 if lanes < 0 else max(lanes, 32))
            max_group = {16: INT16_MAX_GROUP, WIDE16: INT16_MAX_GROUP, WIDE32: WIDE32_MAX_GROUP}.get(lanes, 0)
            pointwise = all(k == 1 for k in w5.shape[2:])
            plan = ext.conv_plan(
                w5, list(x5_shape), self.groups, self.s3, self.p3, self.d3, abs(lanes) // 8,
                POINTWISE_BLOCK_BYTES if pointwise else TABLE_BLOCK_BYTES, max_group,
            )
            prepared = self.by_lanes[lanes] = (list(w5.shape), plan)
        return prepared

    def run(self, ext, codes, x, bias_s, lanes):
        """``lanes``: 64 / 32 (int64 / int32 arithmetic), 16 (int16 table, int32 arithmetic), or
        WIDE16 / WIDE32 (int16 / int32 table, int64 arithmetic)."""
        dtype = _LANE_DTYPES[abs(lanes)]
        xi = x if x.dtype == dtype else x.to(dtype)
        if self.transposed:
            xi = ref._dilate_and_pad_for_transpose(
                xi, self.kernel, self.tstride, self.tpadding, self.tdilation, self.toutput_padding
            )
        x5 = xi.reshape(xi.shape[0], xi.shape[1], *([1] * self.pre), *xi.shape[2:]).contiguous()
        w5_shape, plan = self.prepared(ext, codes, lanes, x5.shape)
        wide = lanes < 0
        b = None if bias_s is None else bias_s.to(torch.int64 if lanes == 64 or wide else torch.int32)
        kernel = ext.conv_wide if wide else ext.conv
        y = kernel(x5, w5_shape, plan, b, self.groups, self.s3, self.p3, self.d3)
        y = y.reshape(y.shape[0], y.shape[1], *y.shape[2 + self.pre :])
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _conv_call(ext, x: Tensor, a: ref.ShiftConvArgs, x_dtype: torch.dtype):
    """The prepared ``_ConvCall`` for a call with x of integer dtype ``x_dtype`` (x itself may be the
    float input of the fused path), or False when the native kernel does not take the call. One per
    signature: shapes and dtypes of the tensors, every option as is."""
    key = ("call", (tuple(x.shape), x_dtype), *((tuple(v.shape), v.dtype) if isinstance(v, Tensor) else
                                                 tuple(v) if isinstance(v, list) else v for v in a))

    def make():
        xi = x if x.dtype == x_dtype else torch.empty(x.shape, dtype=x_dtype, device="meta")
        return _ConvCall(ext, a) if _conv_native_ok(xi, a) else False

    return _cached(a.codes, key, make)


def shift_conv_cpu(x: Tensor, *args) -> Tensor:
    """CPU kernel of ``deepshift::shift_conv`` (native when available, else the reference)."""
    a = ref.ShiftConvArgs(*args)
    ext = load_extension()
    call = False if ext is None else _conv_call(ext, x, a, x.dtype)
    if call is False:
        return ref.shift_conv_reference(x, *a)
    bias_s = _shifted_bias(a.bias, min(a.shift_lo, 0))
    lanes = _lanes_for(ext, x, a.codes, a.weight_shape, a.weight_bits, a.has_zero, a.shift_lo, bias_s,
                       call.fan_in, int16=True, wide=True)
    return call.run(ext, a.codes, x, bias_s, lanes)


def _fused_setup(ext, x, act_bits, rounding, accumulator, shift_lo, bias, weight_sum=None):
    """Common checks and constants of the fused frozen-layer paths, or None when they do not apply:
    (lanes, lo, hi, exponent, shifted bias or None). ``weight_sum``
    (:func:`_weight_sum` of the layer, called only where needed) is given by callers that also run
    int64 accumulators (lanes WIDE16 / WIDE32, an int64 bias) for inputs of at most 16 bits: in int32
    lanes where it proves no value reaches ``2**31`` (int32 arithmetic is exact there, so its results
    are the int64 accumulators' bit for bit)."""
    total = act_bits[0] + act_bits[1]
    if (
        accumulator not in (("int32", "int64") if weight_sum is not None and total <= 16 else ("int32",))
        or not isinstance(x, Tensor)
        or x.dtype not in _FLOAT_DTYPES
        or x.device.type != "cpu"
        or rounding not in ("nearest", "floor")
        or (bias is not None and bias.dtype != torch.int32)
    ):
        return None
    lo, hi = -(2 ** (total - 1)), 2 ** (total - 1) - 1
    u = min(shift_lo, 0)
    int64 = accumulator == "int64"
    if int64:
        bias_max = 0 if bias is None else _max_abs(bias) << -u
        int64 = not _int32_exact(-lo, weight_sum(), bias_max)
    b = _shifted_bias(bias.to(torch.int64) if int64 and bias is not None else bias, u)
    # 8-bit activations (|q| <= 128 by construction) take the int16 tables, however few terms an
    # output has (AMD Zen 4, one thread, batch 8, ms int16 / int32 tables: 3 -> 16 channels 3x3 0.127 /
    # 0.171, 1x1 0.065 / 0.077; 64-channel depthwise 3x3 1.37 / 1.56-1.78).
    lanes = 16 if total <= 8 else 32
    return -lanes if int64 else lanes, lo, hi, u - act_bits[1], b


def _prepare_conv_fused(x: Tensor, a: ref.ShiftConvArgs, act_bits: list[int], rounding: str,
                        accumulator: str):
    """The extension's ``PreparedConv``: a frozen (non-transposed) conv layer's whole forward on float
    CPU inputs shaped and typed like ``x``, in one native call; None where that does not apply (no
    native kernels, an int64 accumulator with activations of more than 16 bits, another dtype, shapes
    the native kernel does not take).

    Its ``run(x, affine=[scale, shift], residual, relu)`` rounds the input to fixed point while
    building the kernel's table and scales each image's integer output to x's dtype while it is
    still in cache: bit for bit the reference's ``scale_output(shift_conv(quantize_input(x)))``,
    without the intermediate integer tensors or the per-call range check (8-bit ``act_bits``
    guarantee ``|q| <= 128``); it also applies a per-channel affine (a frozen BatchNorm), adds
    ``residual`` and applies ReLU to each output value while it is in cache, bit for bit as torch
    computes those operations. It returns ``(y, x has a NaN)``.
    """
    ext = load_extension()
    weight_shape = a.weight_shape

    def weight_sum():
        return _weight_sum(ext, a.codes, weight_shape, a.weight_bits, a.has_zero, a.shift_lo)

    setup = None if ext is None else _fused_setup(ext, x, act_bits, rounding, accumulator, a.shift_lo, a.bias,
                                                  weight_sum)
    if setup is None or x.dim() != len(weight_shape) or a.transposed:
        return None
    lanes, lo, hi, exponent, b = setup
    dims = len(weight_shape) - 2
    subsample = []
    if all(k == 1 for k in weight_shape[2:]) and not any(a.padding) and any(s > 1 for s in a.stride):
        # A strided 1x1 conv (ResNet's downsampling shortcuts) reads every stride-th input only: run
        # the stride-1 conv on those (sliced out in the prepared call), not a table of every input.
        subsample = list(a.stride)
        kept = [-(-n // s) for n, s in zip(x.shape[2:], a.stride, strict=True)]
        x = torch.empty([*x.shape[:2], *kept], dtype=x.dtype, device="meta")
        a = a._replace(stride=[1] * dims)
    call = _conv_call(ext, x, a, torch.int32)
    if call is False:
        return None
    x5_shape = [x.shape[0], x.shape[1], *([1] * call.pre), *x.shape[2:]]
    w5_shape, plan = call.prepared(ext, a.codes, lanes, x5_shape)
    sizes = [ref.conv_output_size(x.shape[2 + d], weight_shape[2 + d], a.stride[d], a.padding[d],
                                  a.dilation[d], False, 0) for d in range(dims)]
    # Holds no reference to the codes tensor: the cache entry goes with it.
    return ext.PreparedConv(w5_shape, plan, b, a.groups, call.s3, call.p3, call.d3, act_bits[1], lo, hi,
                            rounding == "floor", lanes, exponent, [x.shape[0], weight_shape[0], *sizes],
                            subsample)


def _channel_vector_ok(t: Tensor, like: Tensor, channels: int) -> bool:
    return t.dtype == like.dtype and t.device.type == "cpu" and t.is_contiguous() and t.shape == (channels,)


def frozen_conv_cpu(x: Tensor, codes: Tensor, bias: Tensor | None, spec: str, bn_scale: Tensor | None,
                    bn_shift: Tensor | None, residual: Tensor | None, relu: bool) -> Tensor:
    """``deepshift::frozen_conv`` on the CPU where the extension's C++ kernel has no prepared forward
    for the call: prepares (and remembers) one where the fused native call applies and runs it, else
    the reference's composition of the smaller ops."""
    s = parsed_spec(spec)
    prepared = None
    if not s.transposed and not s.pad_outside:
        def prepare():
            a = ref.ShiftConvArgs(codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo, bias,
                                  list(s.stride), list(s.padding), list(s.dilation), s.groups, False,
                                  list(s.output_padding))
            return _prepare_conv_fused(x, a, list(s.act_bits), s.act_rounding, s.accumulator)

        prepared = fused_forward(x, codes, bias, spec, prepare)
    if prepared is not None:
        out_shape = tuple(prepared.out_shape)
        channels = out_shape[1]
        if ((bn_scale is None or (_channel_vector_ok(bn_scale, x, channels)
                                  and _channel_vector_ok(bn_shift, x, channels)))
                and (residual is None or (residual.dtype == x.dtype and residual.device.type == "cpu"
                                          and residual.is_contiguous() and residual.shape == out_shape))):
            y, has_nan = prepared.run(x, None if bn_scale is None else [bn_scale, bn_shift], residual, relu)
            if has_nan:
                raise ref._nan_error()
            return y
    return ref.frozen_conv_reference(x, codes, bias, spec, bn_scale, bn_shift, residual, relu)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int_epilogue_args_ok(shape, dtype: torch.dtype, signs: Tensor, lefts: Tensor, bias: Tensor | None,
                          rights: Tensor, pre: int, residual: Tensor | None, residual_shift: int) -> bool:
    """Whether the native integer epilogue takes these parameters for an int32 / int64 (``dtype``)
    output of ``shape`` (as the C++ kernel of ``deepshift::int_epilogue`` decides, ``csrc/frozen.cpp``)."""
    int64 = torch.int64
    return (dtype in (torch.int32, int64) and signs.dtype == lefts.dtype == rights.dtype == int64
            and signs.dim() == 2
            and lefts.shape == signs.shape and rights.numel() == signs.shape[1]
            and (bias is None or (bias.dtype == int64 and bias.numel() == signs.shape[1]))
            and (residual is None or (residual.dtype == dtype and residual.shape == tuple(shape)))
            and (signs.shape[1] == 1 or (len(shape) >= 2 and shape[1] == signs.shape[1]))
            and 0 <= pre < 63 and 0 <= residual_shift < 63
            and all(t.device.type == "cpu" for t in (signs, lefts, rights)))


def _prepare_int_conv(ext, x: Tensor, codes: Tensor, bias: Tensor | None, s, in_shift: int, in_lo: int,
                      in_hi: int):
    """The extension's ``PreparedIntConv`` for int32 / int64 inputs shaped like ``x``
    (``deepshift::int_conv``'s native call on int32 lanes), or None where it does not apply. Layers
    with int64 accumulators get one only where this input proves int32 lanes exact (as shift_conv
    decides for int64 inputs):
    the requantised ``|q|`` is at most ``round_shift(max|x|) + 1``, and the bound of the sums follows."""
    if (ext is None or x.dtype not in (torch.int32, torch.int64) or x.device.type != "cpu" or s.transposed
            or s.pad_outside
            or not -(2**31) <= in_lo <= in_hi < 2**31 or not -62 <= in_shift <= 62
            or (bias is not None and bias.dtype not in (torch.int32, torch.int64))):
        return None
    a = ref.ShiftConvArgs(codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo, bias,
                          list(s.stride), list(s.padding), list(s.dilation), s.groups, False,
                          list(s.output_padding))
    call = _conv_call(ext, x, a, torch.int32)
    if call is False:
        return None
    u = min(s.shift_lo, 0)
    if s.accumulator == "int64":
        q_max = min(max(-in_lo, in_hi), (_max_abs(x) >> max(in_shift, 0) << max(-in_shift, 0)) + 1)
        b_max = 0 if bias is None else _max_abs(bias) << -u
        wsum = _weight_sum(ext, codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo)
        if not _int32_exact(q_max, wsum, b_max):
            return None
    # The int16 table where |q| <= 128 and outputs have enough terms (as for the float fused path).
    narrow = in_lo >= -INT16_MAX_ABS and in_hi <= INT16_MAX_ABS
    lanes = 16 if narrow and call.fan_in >= 2**s.weight_bits else 32
    x5_shape = [x.shape[0], x.shape[1], *([1] * call.pre), *x.shape[2:]]
    w5_shape, plan = call.prepared(ext, codes, lanes, x5_shape)
    b = None if bias is None else _shifted_bias(bias, u).to(torch.int32)
    return ext.PreparedIntConv(w5_shape, plan, b, s.groups, call.s3, call.p3, call.d3, in_shift, in_lo, in_hi,
                               lanes, list(ref.frozen_conv_output_shape(s, x.shape)))


def int_conv_cpu(x: Tensor, codes: Tensor, bias: Tensor | None, spec: str, in_shift: int, in_lo: int,
                 in_hi: int, signs: Tensor | None, lefts: Tensor | None, ebias: Tensor | None,
                 rights: Tensor | None, pre: int, residual: Tensor | None, residual_shift: int,
                 lo: int | None, hi: int | None) -> Tensor:
    """``deepshift::int_conv`` on the CPU where the extension's C++ kernel has no prepared call for it:
    one native call (the input requantised in the table build, the epilogue applied to each output
    run while in cache) where it applies (non-transposed, zero padding, int32 lanes), prepared and
    remembered for layers with int32 accumulators; else the reference's composition of the ops."""
    s = parsed_spec(spec)
    ext = load_extension()

    def prepare():
        return _prepare_int_conv(ext, x, codes, bias, s, in_shift, in_lo, in_hi)

    if s.accumulator == "int32":
        prepared = fused_forward(x, codes, bias, spec, prepare)
        requant = (in_shift, in_lo, in_hi)
        if prepared is not None and (prepared.in_shift, prepared.in_lo, prepared.in_hi) != requant:
            prepared = prepare()  # the same layer requantised otherwise: not cached
    else:  # the lanes depend on this input
        prepared = prepare() if cache.fused_enabled() else None
    if prepared is not None and (residual is None if signs is None else (
            lefts is not None and rights is not None and _int_epilogue_args_ok(
                prepared.out_shape, x.dtype, signs, lefts, ebias, rights, pre, residual, residual_shift))):
        return prepared.run(x, signs, lefts, ebias, rights, pre, residual, residual_shift,
                            _INT64_MIN if lo is None else lo, _INT64_MAX if hi is None else hi)
    return ref.int_conv_reference(x, codes, bias, spec, in_shift, in_lo, in_hi, signs, lefts, ebias, rights,
                                  pre, residual, residual_shift, lo, hi)
