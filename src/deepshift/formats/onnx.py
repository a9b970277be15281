"""ONNX export of shift networks with standard operators only.

The frozen integer ops (``deepshift::shift_linear`` / ``shift_conv``) are not ONNX operators, so
each shift layer is exported as the float computation it is exactly equivalent to:

* ``mode="fixed_point"`` (default): ``q = Clip(Round(x * 2^F), lo, hi)`` (``Floor`` for floor
  rounding; ONNX ``Round`` is half to even, like ours), then the layer as float32 ``Conv`` /
  ``Gemm`` calls that are exact: ``q`` is split into byte planes where its range needs it
  (``q = 256 * Floor(q / 256) + rest``) and the weights into groups of neighbouring powers of two,
  so that every sum each call makes is an integer multiple of its smallest term below ``2**24`` of
  it in magnitude (proved per layer from its weights), which float32 adds exactly in any order: each
  call's result is exact. Their sum with the fixed-point bias is rounded once to float32, as the
  frozen layer rounds it: two terms with one float32 Add (correctly rounded), more in float64 (exact)
  and one cast. A layer that would need more than :data:`MAX_PLANE_CALLS` calls takes the float64
  form below.
* ``mode="fixed_point_float64"``: the same values with each layer one float64 ``MatMul`` (convolutions
  as slices + MatMul, since onnxruntime has no float64 Conv): exact too, and several times slower
  under onnxruntime (``benchmarks/onnx_bound.py``).
* Transposed convolutions, in both modes: a float32 ``ConvTranspose`` of the fixed-point input (no
  float64 kernel exists), equal to the frozen layer up to float32 rounding.
* ``mode="weights"``: the float-simulated graph for runtimes that only want the power-of-two
  weights: no activation rounding, the frozen layer's fixed-point bias.

Everything outside shift layers is exported as torch exports it. In a frozen model, BatchNorm and
global average pooling are already in runtime-independent forms (:mod:`deepshift.frozen.float_layers`:
a separate Mul and Add; a float64 ReduceSum), so onnxruntime reproduces the frozen model bit for
bit, CIFAR ResNets included.

Integer-only models (:func:`deepshift.integer_only`) are exported as they compute: int64 tensors from
the input's rounding to the logits' one scaling, each shift layer a MatMul of the int64 input (convolutions
as slices + MatMul) with its integer weights (decoded from the codes by a Gather), each BatchNorm /
requantisation step an integer multiply by its sum of powers of two, plus bias, and a rounding
division by a power of two (Mod, Div and comparisons: ties to even), max pooling as the maximum of
strided slices; every step is exact in int64, so onnxruntime's logits equal the torch model's bit
for bit.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepshift.core.quantize import fixed_point_limits, to_fixed_point_int
from deepshift.core.replace import replace_modules
from deepshift.files import atomic_path
from deepshift.frozen.float_layers import FrozenBatchNorm
from deepshift.frozen.freeze import frozen_copy
from deepshift.frozen.integer import (
    MAX_POOL_FUNCTIONS,
    ChannelScale,
    IntegerShiftLayer,
    QuantizeInput,
    Requantize,
)
from deepshift.frozen.layers import ShiftConvNd, ShiftLinear, _FrozenShift, is_frozen_layer
from deepshift.ops.codes import decode_codes, pack_codes, unpack_codes
from deepshift.ops.reference import _im2col, channel_affine_reference, conv_pads

MODES = ("fixed_point", "fixed_point_float64", "weights")

# The most float32 calls (byte planes x weight groups) a layer takes in the default mode; beyond it the
# float64 form is as fast (benchmarks/onnx_bound.py: two calls cost ~3x the float layer, the float64
# form ~6-10x).
MAX_PLANE_CALLS = 6
_F32_EXACT = 2**24  # every integer of at most this magnitude is a float32
_ROUND_MAGIC = 1.5 * 2.0**23  # x + this - this rounds a float32 x, |x| <= 2**22, half to even
_ROUND_LIMIT = 2**21  # fixed-point ranges the addition rounds for (values beyond come out beyond)


def _code_table(layer: _FrozenShift | IntegerShiftLayer) -> tuple[Tensor, Tensor]:
    """The layer's codes, one uint8 per weight (weight's shape), and the float64 weight value of
    every possible code (``2**weight_bits`` entries): ``table[codes]`` is the weight."""
    numel = math.prod(layer.weight_shape)
    codes = unpack_codes(layer.codes, layer.weight_bits, numel).reshape(tuple(layer.weight_shape))
    every = pack_codes(torch.arange(2**layer.weight_bits, dtype=torch.uint8), layer.weight_bits)
    rel, sign = decode_codes(every, [2**layer.weight_bits], layer.weight_bits, layer.has_zero)
    return codes, sign.to(torch.float64) * torch.exp2((rel + layer.shift_lo).to(torch.float64))


class OnnxShiftLayer(nn.Module):
    """Standard-op stand-in for one frozen shift layer, used only for export. Its weight is held as
    codes, one uint8 per weight, and a table of the ``2**bits`` weight values; the graph decodes
    it with one ``Gather`` (so the file holds a byte per weight, not a float)."""

    def __init__(self, kind: str, codes: Tensor, table: Tensor, bias: Tensor | None, act_bits,
                 act_rounding: str, conv: dict[str, Any] | None, float32_planes: bool = True):
        super().__init__()
        self.kind = kind
        self.register_buffer("codes", codes.detach().to(torch.uint8).clone())
        self.register_buffer("table", table.detach().to(torch.float64).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act_bits = None if act_bits is None else (int(act_bits[0]), int(act_bits[1]))
        self.act_rounding = act_rounding
        self.conv = conv or {}
        self.exact = self.act_bits is not None
        # The float32 plan (mode "fixed_point"): byte planes of q, weight groups as code tables.
        self.plane_split = False
        self.groups: list[tuple[int, int]] = []
        if self.exact and float32_planes and not self.conv.get("transposed", False):
            plan = _plane_plan(self.weight(), self.act_bits)
            if plan is not None:
                self.plane_split, self.groups = plan
                exps = torch.log2(self.table.abs().clamp_min(1e-300)).round()
                for i, (lo, hi) in enumerate(self.groups):  # group i's weights times 2**-F, else 0
                    inside = (self.table != 0) & (exps >= lo) & (exps <= hi)
                    scaled = torch.where(inside, self.table * 2.0 ** -self.act_bits[1], 0.0)
                    self.register_buffer(f"group_table{i}", scaled.float())

    def _quantize(self, x: Tensor) -> Tensor:
        if self.act_bits is None:
            return x
        return to_fixed_point_int(x, self.act_bits, self.act_rounding) * 2.0 ** -self.act_bits[1]

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        if c.get("pads") is not None:
            mode = "constant" if c["padding_mode"] == "zeros" else c["padding_mode"]
            x = F.pad(x, c["pads"], mode=mode)
        if self.groups:
            return self._planes(x)
        x = self._quantize(x)
        dtype = x.dtype
        weight = self.weight().to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.exact and not (self.kind == "conv" and c["transposed"]):
            # Fixed-point inputs times power-of-two weights: every product and partial sum is
            # an integer multiple of one power of two below 2**53, so float64 accumulates them
            # exactly in any order, and the one rounding to float32 matches the frozen layer.
            # onnxruntime has no float64 Conv, so convolutions become slices + MatMul.
            x, weight = x.double(), weight.double()
            bias = None if bias is None else bias.double()
            if self.kind == "conv":
                return _conv_as_matmul(x, weight, bias, c).to(dtype)
            return self._layer(x, weight, bias).to(dtype)
        return self._layer(x, weight, bias)

    def weight(self) -> Tensor:
        """The exact power-of-two weights (float64), decoded from the codes."""
        return self.table[self.codes.to(torch.int64)]

    def _fixed_point_q(self, x: Tensor) -> Tensor:
        """The fixed-point integers ``q = clamp(round(x * 2**F), lo, hi)``, computed in x's dtype
        (as the float64 form does), as float32."""
        lo, hi = fixed_point_limits(self.act_bits)
        if x.dtype != torch.float32 or self.act_rounding != "nearest" or max(-lo, hi) > _ROUND_LIMIT:
            return to_fixed_point_int(x, self.act_bits, self.act_rounding).float()
        # Half to even by adding and subtracting 1.5 * 2**23 (where float32's spacing is 1):
        # onnxruntime runs two adds several times faster than its Round. Values beyond 2**22 come
        # out beyond 2**21 either way, so the clamp gives lo / hi as after Round; NaN stays NaN.
        # Only a zero's sign can differ (-0.3 gives +0, Round gives -0).
        scaled = x * 2.0 ** self.act_bits[1]  # exact (or +-inf, which the clamp takes to lo / hi)
        return torch.clamp((scaled + _ROUND_MAGIC) - _ROUND_MAGIC, float(lo), float(hi))

    def _planes(self, x: Tensor) -> Tensor:
        """The exact layer as float32 calls (see the module docstring) on the (padded) input; the
        weights carry their powers of two and ``2**-F``, so each call's result is the exact value of
        its part. Returns the layer's result rounded once to x's dtype."""
        dtype = x.dtype
        q = self._fixed_point_q(x)
        planes = [q]
        if self.plane_split:  # q = 256 * floor(q / 256) + rest, both parts exact in float32
            high = torch.floor(q * 2.0**-8) * 256.0
            planes = [high, q - high]
        codes = self.codes.to(torch.int64)
        # Each call's result goes through a Max with -inf, a no-op that keeps onnxruntime from
        # fusing what follows into the call (a BatchNorm Mul into its weights, an Add into its
        # accumulator): either would round inside the sums.
        fence = torch.tensor(-math.inf)
        tables = [getattr(self, f"group_table{i}") for i in range(len(self.groups))]
        parts = [torch.maximum(self._layer(plane, table[codes].float(), None), fence)
                 for table in tables for plane in planes]
        if self.bias is not None:
            shape = [-1] if self.kind == "linear" else [-1, *[1] * (parts[0].dim() - 2)]
            parts.append(self.bias.float().reshape(shape))  # added last, as the float64 form adds it
        if len(parts) <= 2 and dtype == torch.float32:  # one correctly rounded addition: one rounding
            return parts[0] if len(parts) == 1 else parts[0] + parts[1]
        y = parts[0].double()
        for part in parts[1:]:
            y = y + part.double()  # exact up to the bias: every part a multiple of the smallest
        return y.to(dtype)

    def _layer(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        c = self.conv
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        dims = weight.dim() - 2
        if c["transposed"]:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
            return fn(x, weight, bias, c["stride"], c["padding"], c["output_padding"],
                      c["groups"], c["dilation"])
        fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        return fn(x, weight, bias, c["stride"], c["padding"], c["dilation"], c["groups"])


def _plane_plan(weight: Tensor, act_bits: tuple[int, int]) -> tuple[bool, list[tuple[int, int]]] | None:
    """How to compute ``q @ weight`` exactly in float32 calls: (split q into two byte planes?,
    weight groups as inclusive exponent ranges ``(lo, hi)``), or None where more than
    :data:`MAX_PLANE_CALLS` calls would be needed. A group's call sums, for each output, integers
    ``|q_plane| * |w| / 2**lo``; its bound ``max|q_plane| * max_out sum |w| / 2**lo`` must stay within
    float32's exact integers, whatever the order of the additions."""
    lo_q, hi_q = fixed_point_limits(act_bits)
    if max(-lo_q, hi_q) > _F32_EXACT:  # q itself must be a float32 before it is split
        return None
    w = weight.reshape(weight.shape[0], -1).abs()  # (outputs, fan-in): every output's weights
    e = torch.log2(w.clamp_min(2.0**-1000)).round().to(torch.int64)
    present = w > 0
    exps = sorted({int(v) for v in e[present].unique().tolist()})
    if not exps:
        return None
    # counts[i, o]: output o's weights equal to 2**exps[i]; a group's sum of |w| / 2**lo is then
    # sum_i counts[i] * 2**(exps[i] - lo) (exact in float64: a count times a power of two).
    counts = torch.stack([((e == v) & present).sum(1) for v in exps]).double()
    best = None
    for split in (False, True):
        plane_max = max(255, -math.floor(lo_q / 256), math.floor(hi_q / 256)) if split else max(-lo_q, hi_q)
        groups: list[tuple[int, int]] = []
        start = 0
        while start < len(exps):
            if plane_max * float(counts[start].max()) > _F32_EXACT:
                groups = []  # one power of two alone is too much: no plan with this split
                break
            end, total = start, counts[start].clone()
            while end + 1 < len(exps):
                grown = total + counts[end + 1] * 2.0 ** (exps[end + 1] - exps[start])
                if plane_max * float(grown.max()) > _F32_EXACT:
                    break
                end, total = end + 1, grown
            groups.append((exps[start], exps[end]))
            start = end + 1
        calls = len(groups) * (2 if split else 1)
        if groups and calls <= MAX_PLANE_CALLS and (best is None or calls < best[0]):
            best = (calls, split, groups)
    return None if best is None else (best[1], best[2])


def _conv_as_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, c: dict[str, Any]) -> Tensor:
    """Convolution as im2col by slicing (static shapes) and a batched MatMul, for any dims/groups."""
    dims = weight.dim() - 2
    pads: list[int] = []
    for d in reversed(range(dims)):
        pads += [c["padding"][d], c["padding"][d]]
    if any(pads):
        x = F.pad(x, pads)
    kernel = list(weight.shape[2:])
    cols = _im2col(x, kernel, c["stride"], c["dilation"])  # (N, C_in, K, *out), by slicing
    out = list(cols.shape[3:])
    groups = c["groups"]
    n_out, c_in_g = weight.shape[0], weight.shape[1]
    k_total = math.prod(kernel)
    positions = math.prod(out)
    cols = cols.reshape(-1, groups, c_in_g * k_total, positions)
    w = weight.reshape(groups, n_out // groups, c_in_g * k_total)
    y = torch.matmul(w, cols).reshape(-1, n_out, *out)  # (N, G, O/G, P) -> (N, O, *out)
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * dims))
    return y


def _conv_options_frozen(layer: ShiftConvNd) -> dict[str, Any]:
    dims = len(layer.kernel_size)
    return {
        "transposed": layer.transposed, "groups": layer.groups, "stride": list(layer.stride),
        "dilation": list(layer.dilation), "output_padding": list(layer.output_padding),
        "padding": [0] * dims if layer._pad_outside else list(layer.padding),
        "pads": list(layer._pads) if layer._pad_outside else None,
        "padding_mode": layer.padding_mode,
    }


class OnnxBatchNorm(nn.Module):
    """Standard-op stand-in for a :class:`~deepshift.FrozenBatchNorm`: the reference's separate
    Mul and Add, which every runtime rounds alike (the op ``deepshift::channel_affine`` is not an
    ONNX operator)."""

    def __init__(self, bn: FrozenBatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.bn.affine(x.dtype)
        return channel_affine_reference(x, scale, shift)


def exportable(model: nn.Module, mode: str = "fixed_point") -> nn.Module:
    """A frozen copy of ``model`` in standard operators: every frozen shift layer an
    :class:`OnnxShiftLayer`, every frozen BatchNorm an :class:`OnnxBatchNorm`.

    A converted model is frozen first (:func:`deepshift.frozen.freeze.frozen_copy`), so the graph
    computes what the frozen model computes. The original model is not changed.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; choose one of {', '.join(MODES)}")

    def standard_ops(module: nn.Module) -> nn.Module | None:
        if isinstance(module, FrozenBatchNorm):
            return OnnxBatchNorm(module)
        if not is_frozen_layer(module):
            return None
        act = module.act_bits if mode != "weights" else None
        bias = None
        if module.bias_int is not None:
            bias = module.bias_int.to(torch.float64) * 2.0 ** -module.act_bits[1]
        conv = _conv_options_frozen(module) if isinstance(module, ShiftConvNd) else None
        kind = "linear" if isinstance(module, ShiftLinear) else "conv"
        return OnnxShiftLayer(kind, *_code_table(module), bias, act, module.act_rounding, conv,
                              float32_planes=mode == "fixed_point")

    return replace_modules(copy.deepcopy(frozen_copy(model)).eval(), standard_ops)


# ---- Integer-only models --------------------------------------------------------------------------
# Stand-ins built from operators that onnxruntime runs on int64 (it has no signed BitShift and no
# integer Conv): shifts by constants become multiplications and divisions by powers of two.


def _pow2(t: Tensor) -> Tensor:
    return torch.bitwise_left_shift(torch.ones_like(t), t)


def _round_shift(x: Tensor, left_mul: Tensor, divisor: Tensor) -> Tensor:
    """``deepshift.ops.reference.round_shift``: ``x * left_mul`` divided by ``divisor`` (both powers of
    two, broadcasting), rounded half to even; exact on int64 where the reference's result is."""
    x = x * left_mul
    r = torch.remainder(x, divisor)  # in [0, divisor)
    q = torch.div(x - r, divisor, rounding_mode="trunc")  # an exact division: the floor
    up = (2 * r > divisor) | ((2 * r == divisor) & (torch.remainder(q, 2) == 1))
    return q + up.to(torch.int64)


def _shift_pair(amount: Tensor) -> tuple[Tensor, Tensor]:
    """(2**max(-amount, 0), 2**max(amount, 0)): round_shift's left multiplier and divisor."""
    amount = amount.to(torch.int64)
    return _pow2(torch.clamp_min(-amount, 0)), _pow2(torch.clamp_min(amount, 0))


class OnnxIntegerEpilogue(nn.Module):
    """Standard-op stand-in for :class:`~deepshift.frozen.integer.ChannelScale` and
    :class:`~deepshift.frozen.integer.Requantize` (``deepshift::int_epilogue``): the sum of shifted
    terms as one multiplication by its value (the same integer: the conversion proved no
    intermediate passes int64), the bias, one rounding shift, the residual and the clamp."""

    def __init__(self, step: ChannelScale | Requantize):
        super().__init__()
        if isinstance(step, Requantize):
            gain, bias, rights, pre = torch.ones(1), None, torch.tensor([step.shift]), 0
            self.residual_shift = 0
        else:
            gain = (step.signs * _pow2(step.lefts)).sum(0)
            bias, rights, pre, self.residual_shift = step.bias, step.rights, step.pre, step.residual_shift
        self.lo, self.hi = step.lo, step.hi
        self.register_buffer("gain", gain.to(torch.int64))
        self.register_buffer("bias", None if bias is None else bias.to(torch.int64).clone())
        left, div = _shift_pair(rights)
        self.register_buffer("left", left)
        self.register_buffer("div", div)
        self.pre = int(pre)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        shape = [1] * x.dim()
        if self.gain.numel() > 1:  # per channel (dimension 1)
            shape[1] = -1
        else:
            shape = []
        one = torch.ones((), dtype=torch.int64)
        if self.pre:
            x = _round_shift(x, one, one * 2**self.pre)
        y = x * self.gain.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        y = _round_shift(y, self.left.reshape(shape), self.div.reshape(shape))
        if residual is not None:
            y = y + residual * 2**self.residual_shift
        return y if self.lo is None and self.hi is None else torch.clamp(y, self.lo, self.hi)


class OnnxIntegerShift(nn.Module):
    """Standard-op stand-in for an :class:`~deepshift.frozen.integer.IntegerShiftLayer`: its int64
    weights (``table[codes]``, one uint8 code per weight in the file) in a MatMul with the int64
    input (convolutions as slices + MatMul), plus the bias, in the op's output units."""

    def __init__(self, layer: IntegerShiftLayer):
        super().__init__()
        s = layer.spec
        if s.kind == "conv" and s.transposed:
            raise ValueError("ONNX export of integer-only models does not cover transposed convolutions")
        self.spec = s
        codes, table = _code_table(layer)  # float64 powers of two: in output units 2**u, integers
        u = min(s.shift_lo, 0)
        self.register_buffer("codes", codes)
        self.register_buffer("table", (table * 2.0**-u).to(torch.int64))
        self.register_buffer("bias", None if layer.bias_int is None else
                             layer.bias_int.to(torch.int64) * 2**-u)

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        weight = self.table[self.codes.to(torch.int64)]
        if s.kind == "linear":
            y = torch.matmul(x, weight.t())
            return y if self.bias is None else y + self.bias
        unbatched = x.dim() == len(s.weight_shape) - 1
        if unbatched:
            x = x.unsqueeze(0)
        padding = list(s.padding)
        if s.pad_outside:
            mode = "constant" if s.padding_mode == "zeros" else s.padding_mode
            x = F.pad(x, conv_pads(s.padding, s.weight_shape[2:], s.dilation), mode=mode)
            padding = [0] * len(padding)
        y = _conv_as_matmul(x, weight, self.bias, {"padding": padding, "stride": list(s.stride),
                                                   "dilation": list(s.dilation), "groups": s.groups})
        return y.squeeze(0) if unbatched else y


class OnnxQuantizeInput(nn.Module):
    """Standard-op stand-in for :class:`~deepshift.frozen.integer.QuantizeInput`: ``Round`` (half to
    even) or ``Floor`` of ``x * 2**F``, clipped, cast to int64 (exact in the input's dtype)."""

    def __init__(self, step: QuantizeInput):
        super().__init__()
        self.act_bits, self.rounding = step.act_bits, step.rounding

    def forward(self, x: Tensor) -> Tensor:
        return to_fixed_point_int(x, self.act_bits, self.rounding).to(torch.int64)


def _max_pool_int(x: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
                  return_indices: bool = False) -> Tensor:
    """Max pooling as the maximum of strided slices (onnxruntime's MaxPool has no int64 kernel)."""
    dims = x.dim() - 2

    def per_dim(v) -> list[int]:
        return [int(v)] * dims if isinstance(v, int) else [int(t) for t in v]

    if ceil_mode or return_indices:
        raise ValueError("ONNX export of integer-only models: max pooling with ceil_mode or indices is not "
                         "covered")
    k = per_dim(kernel_size)
    st = per_dim(k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride)
    pd, dl = per_dim(padding), per_dim(dilation)
    if any(pd):
        pads: list[int] = []
        for d in reversed(range(dims)):
            pads += [pd[d], pd[d]]
        x = F.pad(x, pads, value=torch.iinfo(torch.int64).min)
    sizes = [(x.shape[2 + d] - dl[d] * (k[d] - 1) - 1) // st[d] + 1 for d in range(dims)]
    y = None
    for offsets in itertools.product(*(range(kk) for kk in k)):
        index = [slice(None), slice(None)]
        for d, o in enumerate(offsets):
            start = o * dl[d]
            index.append(slice(start, start + (sizes[d] - 1) * st[d] + 1, st[d]))
        window = x[tuple(index)]
        y = window if y is None else torch.maximum(y, window)
    return y


class _OnnxMaxPool(nn.Module):
    def __init__(self, pool: nn.Module):
        super().__init__()
        self.args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                     pool.return_indices)

    def forward(self, x: Tensor) -> Tensor:
        return _max_pool_int(x, *self.args)


def _is_integer_only(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and any(isinstance(m, QuantizeInput)
                                                           for m in model.modules())


def integer_exportable(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of an integer-only model in standard operators on int64 (see the module docstring)."""
    model = copy.deepcopy(model)
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS:
            node.target = _max_pool_int
    model.recompile()

    def standard_ops(module: nn.Module) -> nn.Module | None:
        if isinstance(module, (ChannelScale, Requantize)):
            return OnnxIntegerEpilogue(module)
        if isinstance(module, IntegerShiftLayer):
            return OnnxIntegerShift(module)
        if isinstance(module, QuantizeInput):
            return OnnxQuantizeInput(module)
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return _OnnxMaxPool(module)
        return None

    return replace_modules(model, standard_ops)


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike,
    mode: str = "fixed_point",
    opset: int = 17,
    dynamic_batch: bool = True,
) -> str:
    """Export a frozen shift network to ONNX with standard operators; returns the path.

    A converted model is exported as its frozen copy (:func:`deepshift.freeze_` of a copy with
    the default activation bits for layers trained without; freeze it yourself to choose them).

    The file is checked with ``onnx.checker`` and written atomically. ``example_input`` fixes
    the input shape (the batch dimension stays dynamic when ``dynamic_batch``) and the dtype of
    the whole graph (integer token ids for a language model: the graph then stays float32).

    Exactness: every shift layer of the graph computes exactly what the frozen layer computes,
    and the float layers :func:`deepshift.freeze_` leaves between them are in forms whose float32
    results do not depend on the runtime (:mod:`deepshift.frozen.float_layers`), so onnxruntime's output
    equals the frozen torch model's bit for bit (tested on the MNIST models and CIFAR ResNet-20).
    Not covered: transposed convolutions (a float32 ConvTranspose, equal up to float32
    rounding) and float operations a model calls functionally in its ``forward``
    (``F.batch_norm``, ``x.mean()``) or that have no runtime-independent form (LayerNorm,
    softmax and GELU of transformers), which ``freeze_`` cannot reach; there a last-bit
    difference landing on a fixed-point rounding boundary moves one activation by ``2**-F``.

    Example:
        >>> import torch, deepshift, tempfile, os
        >>> net = deepshift.convert_(torch.nn.Sequential(torch.nn.Linear(4, 2)),
        ...                          deepshift.QConfig(act_bits=(4, 4)))
        >>> frozen = deepshift.freeze_(net.eval())
        >>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
        >>> deepshift.export_onnx(frozen, torch.randn(1, 4), path) == path
        True
    """
    try:
        import onnx
    except ImportError as exc:  # optional extra
        raise ImportError("ONNX export needs the onnx package: pip install 'deepshift[onnx]'") from exc
    if example_input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
                                   torch.int32):
        raise TypeError(f"example_input must be a float tensor (or int64 tokens), got {example_input.dtype}")
    if _is_integer_only(model):  # int64 inside; its input and logits keep the example's dtype
        if not example_input.is_floating_point():
            raise TypeError(f"an integer-only model takes a float input, got {example_input.dtype}")
        graph_model = integer_exportable(model)
    else:
        graph_model = exportable(model, mode)
        if example_input.is_floating_point():
            graph_model = graph_model.to(example_input.dtype)
    path = os.fspath(path)
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with atomic_path(path) as tmp_path:
        tmp = os.fspath(tmp_path)
        with torch.no_grad(), warnings.catch_warnings():
            # Shapes are static by design (the example input fixes them): tracing says so.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # e.g. "Constant folding - Only steps=1 can be constant folded": slices with a step
            # are left for the runtime, which is what we want.
            warnings.filterwarnings("ignore", message="Constant folding")
            # No constant folding: it would store each layer's decoded float weights instead of
            # its codes (8x larger); the runtime folds them once when it loads the graph.
            torch.onnx.export(graph_model, (example_input,), tmp, input_names=["input"],
                              output_names=["output"], opset_version=opset,
                              dynamic_axes=dynamic_axes, dynamo=False, do_constant_folding=False)
        onnx.checker.check_model(onnx.load(tmp), full_check=True)
    return path

