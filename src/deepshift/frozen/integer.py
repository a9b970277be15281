"""Integer-only frozen models: the input rounded once to fixed point, then integers to the logits.

A model frozen by :func:`deepshift.freeze_` is multiplication-free inside its shift layers only:
between them it computes in float (each layer's input rounded to fixed point, its output scaled
back, BatchNorm as a float multiply and add, pooling as a float mean). :func:`integer_only` turns
a frozen model into one that stays in integers: every value between the input and the logits is
an integer tensor ``v`` standing for ``v * 2**-f``, its fraction bits ``f`` fixed per value at
conversion, and every step is a shift, an add, a compare or a copy:

* a shift layer's input is requantised to the layer's ``act_bits`` by a shift with
  round-to-nearest (ties to even, as ``torch.round``) and saturation, then the layer's integer op
  runs as in the frozen model (``deepshift::shift_linear``; a convolution, its requantisation and
  the BatchNorm step after it as one op, ``deepshift::int_conv``);
* a BatchNorm ``y = s_c * (x - m_c) + b_c`` becomes, per channel ``c``, a sum of ``scale_terms``
  signed powers of two ``s~_c = sum_k +-2**e_kc ~ s_c`` (a signed-digit approximation: each term a
  shift of ``x``) and the bias ``b_c - s~_c * m_c``, summed exactly and rounded once;
* ReLU, ReLU6 and hardtanh are integer clamps; a residual addition aligns its operands' fraction
  bits by left shifts (exact); max pooling, flattening, slicing and zero padding copy integers;
* average pooling sums; its divisor is a shift where it is a power of two, else a sum of powers of
  two accurate to ``2**-16`` (relative);
* the logits are the one conversion back to float (a power-of-two scale, exact).

Storage: values are ``int32`` tensors where the model's activation formats leave room (every shift
layer's input range, at the finest fraction bits, at least ``2**INT32_HEADROOM_BITS`` times below
``2**31``; true of the default ``(8, 8)`` and narrower): each BatchNorm step then saturates its
result to ``+-(2**31 - 1)`` (256 times past the largest input any shift layer takes, which the next
layer's requantisation saturates far below) and every value whose bound fits is stored as int32,
half the memory traffic of int64. The arithmetic inside each step stays int64 where its bound needs
it. Models with wider formats keep int64 values.

Anything else (a softmax, a LayerNorm, attention, a float parameter used in forward) is named in a
ValueError: such a model is not integer-only.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepshift.core.batchnorm import batchnorm_scale, power_terms, terms_value
from deepshift.core.quantize import fixed_point_limits
from deepshift.frozen.float_layers import ExactGlobalAvgPool, FrozenBatchNorm
from deepshift.frozen.fuse import _ADDS, _RELUS, ShiftConvBatchNorm, _Tracer
from deepshift.frozen.layers import ShiftConvNd, ShiftLinear, _FrozenShift, is_frozen_layer
from deepshift.ops import reference as ref
from deepshift.ops.reference import ACCUMULATORS, accumulator_bound

# Extra fraction bits kept after a BatchNorm or a pooling divisor, beyond the finest activation
# format of the model's shift layers: the next requantisation rounds once more, so these keep
# the integer model's double rounding far below one activation step.
GUARD_BITS = 8
# Relative accuracy of a pooling divisor that is not a power of two (a sum of powers of two).
_DIVISOR_ACCURACY = 2.0**-16
_INT64_SAFE = 2**62
_INT32_LIMIT = 2**31 - 1
# int32 storage where every shift layer's input range is this many bits below int32's (above).
INT32_HEADROOM_BITS = 8
# Signed powers of two per BatchNorm scale: on the validation split of two Fashion-MNIST ResNet-20s
# (5- and 3-bit, results/integer.md) against the float-BatchNorm frozen model, 1 term lost 17 and 50
# points, 2 terms -0.6 and +0.1, 3 terms +0.07 and -0.15.
DEFAULT_SCALE_TERMS = 3
_INT_CONV = torch.ops.deepshift.int_conv.default
_SHIFT_LINEAR = torch.ops.deepshift.shift_linear.default


class QuantizeInput(nn.Module):
    """The model's one float step at the input: ``clamp(round(x * 2**F))`` as ``out_dtype``."""

    def __init__(self, act_bits: tuple[int, int], rounding: str):
        super().__init__()
        self.act_bits, self.rounding = act_bits, rounding
        self.out_dtype = torch.int64

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"an integer-only model takes a float input, got {x.dtype}")
        return torch.ops.deepshift.quantize_input(x, list(self.act_bits), self.rounding, self.out_dtype)

    def extra_repr(self) -> str:
        return f"act_bits={self.act_bits}"


class Requantize(nn.Module):
    """From ``in_frac`` to ``out_frac`` fraction bits (rounding, ties to even), saturated to
    ``[lo, hi]``."""

    def __init__(self, in_frac: int, out_frac: int, lo: int, hi: int):
        super().__init__()
        self.shift, self.lo, self.hi = in_frac - out_frac, lo, hi
        # deepshift::int_epilogue with one term (x itself) does it in one pass
        self.register_buffer("_one", torch.ones(1, 1, dtype=torch.int64))
        self.register_buffer("_zero", torch.zeros(1, 1, dtype=torch.int64))
        self.register_buffer("_rights", torch.tensor([self.shift], dtype=torch.int64))
        self.reference = False
        self.out_dtype = torch.int64

    def forward(self, x: Tensor) -> Tensor:
        fn = ref.int_epilogue_reference if self.reference else torch.ops.deepshift.int_epilogue
        y = fn(x, self._one, self._zero, None, self._rights, 0, None, 0, self.lo, self.hi)
        return _as(y, self.out_dtype)

    def extra_repr(self) -> str:
        return f"shift={self.shift}, range=[{self.lo}, {self.hi}]"


class IntegerShiftLayer(nn.Module):
    """A frozen shift layer on integers: its codes and its integer op, without the float steps
    around it (its input comes requantised, its accumulator leaves as ``out_dtype``)."""

    def __init__(self, layer: _FrozenShift):
        super().__init__()
        self.spec = layer.spec()
        # what reports read from a shift layer (deepshift.savings_report)
        for key in ("kind", "weight_shape", "weight_bits", "has_zero", "shift_lo", "shift_hi", "method",
                    "config", "act_bits"):
            setattr(self, key, getattr(layer, key))
        self.transposed = getattr(layer, "transposed", False)
        self.register_buffer("codes", layer.codes.clone())
        self.register_buffer("bias_int", None if layer.bias_int is None else layer.bias_int.clone())
        self.reference = False  # run the pure-torch reference op instead of the dispatched one
        self.out_dtype = torch.int64

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        acc = ACCUMULATORS[s.accumulator]
        q = x if x.dtype == acc else x.to(acc)
        bias = self._buffers["bias_int"]
        if bias is not None and bias.dtype != acc:
            bias = bias.to(acc)
        if s.kind == "linear":
            fn = ref.shift_linear_reference if self.reference else _SHIFT_LINEAR
            codes = self._buffers["codes"]
            y = fn(q, codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo, bias)
        else:
            unbatched = q.dim() == len(s.weight_shape) - 1
            if unbatched:
                q = q.unsqueeze(0)
            q, padding = ref._padded(q, s)
            fn = ref.shift_conv_reference if self.reference else torch.ops.deepshift.shift_conv
            y = fn(q, self.codes, list(s.weight_shape), s.weight_bits, s.has_zero, s.shift_lo, bias,
                   list(s.stride), padding, list(s.dilation), s.groups, s.transposed, list(s.output_padding))
            if unbatched:
                y = y.squeeze(0)
        return _as(y, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.spec.kind}, weight_shape={self.spec.weight_shape}, act_bits={self.spec.act_bits}"


def is_deployed_shift_layer(module: nn.Module) -> bool:
    """A frozen shift layer, or its integer form in an integer-only model (what reports count)."""
    return is_frozen_layer(module) or isinstance(module, IntegerShiftLayer)


class ChannelScale(nn.Module):
    """``y = round((sum_k sign_kc * x * 2**e_kc + bias_c) * 2**(out_frac - in_frac))`` per channel
    ``c`` (channel dimension 1; per tensor when ``signs`` has one column): ``x`` at ``in_frac``
    fraction bits, ``y`` at ``out_frac``. The sum is exact (each term a left shift of ``x`` by
    ``e_kc - m_c``, ``m_c`` the channel's lowest exponent; the bias rounded once at that precision),
    and one rounding shift (ties to even) takes it to ``out_frac``."""

    def __init__(self, signs: Tensor, exps: Tensor, bias: Tensor | None, in_frac: int, out_frac: int,
                 x_bound: int):
        super().__init__()
        live = signs != 0
        low = torch.where(live, exps, torch.iinfo(torch.int64).max).amin(0)
        low = torch.where(live.any(0), low, 0)
        lefts = torch.where(live, exps - low, 0)
        gain = int(torch.where(live, torch.bitwise_left_shift(torch.ones_like(lefts), lefts), 0).sum(0).max())
        bias_max = 0.0 if bias is None else float(bias.abs().max())
        # Inputs whose bound would let the exact sum pass int64 are rounded first by ``pre`` bits
        # (bits far below the output's precision: only for extreme accumulator bounds).
        self.pre = 0
        while True:
            inner = in_frac - self.pre - low
            top = int(inner.max()) if inner.numel() else 0
            bound = ((x_bound >> self.pre) + 1) * gain + bias_max * 2.0**top
            if bound < _INT64_SAFE or self.pre >= 62:
                break
            self.pre += 1
        self.bound = int(bound)  # of the exact sum
        # of the result: the sum shifted by the smallest right shift (rounding adds at most 1)
        self.out_bound = math.ceil(bound * 2.0 ** -int(inner.min() - out_frac)) + 1 if inner.numel() else 1
        self.register_buffer("signs", signs.clone())
        self.register_buffer("lefts", lefts)
        # the sum is at in_frac - pre - low fraction bits: shift right by that minus out_frac
        self.register_buffer("rights", inner - out_frac)
        self.register_buffer("bias", None if bias is None else
                             torch.round(bias.double() * torch.exp2(inner.double())).to(torch.int64))
        # Set when fused with the residual add and the clamp after it (_fuse_epilogues).
        self.residual_shift, self.lo, self.hi = 0, None, None
        self.clamped = False  # lo / hi came from a clamp after the step (beyond int32's saturation)
        self.reference = False
        self.out_dtype = torch.int64

    def saturate_int32(self) -> None:
        """Clamp the result to ``+-(2**31 - 1)`` (int32 storage, see the module docstring)."""
        self.lo = -_INT32_LIMIT if self.lo is None else max(self.lo, -_INT32_LIMIT)
        self.hi = _INT32_LIMIT if self.hi is None else min(self.hi, _INT32_LIMIT)
        self.out_bound = min(self.out_bound, _INT32_LIMIT)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        fn = ref.int_epilogue_reference if self.reference else torch.ops.deepshift.int_epilogue
        x, residual = _common(x, residual, self.out_dtype)
        y = fn(x, self.signs, self.lefts, self.bias, self.rights, self.pre, residual, self.residual_shift,
               self.lo, self.hi)
        return _as(y, self.out_dtype)

    def extra_repr(self) -> str:
        fused = f", residual << {self.residual_shift}" if self.residual_shift else ""
        clamp = "" if self.lo is None and self.hi is None else f", clamp [{self.lo}, {self.hi}]"
        return f"terms={self.signs.shape[0]}, channels={self.signs.shape[1]}{fused}{clamp}"


class IntegerConv(nn.Module):
    """A conv layer's integer steps as one op (``deepshift::int_conv``: one native call on the CPU):
    its input's :class:`Requantize`, the :class:`IntegerShiftLayer` and the :class:`ChannelScale`
    after it (with the residual add and clamp it took over), or the first two alone. The three stay
    children (state dict, reports, exporters); they run one after another, with the same numbers,
    where a child has hooks, runs its reference (:func:`set_reference_`) or was swapped for another
    module (exporters)."""

    def __init__(self, requant: Requantize, layer: IntegerShiftLayer, scale: ChannelScale | None):
        super().__init__()
        self.requant, self.layer = requant, layer
        self.add_module("scale", scale)
        self._spec_json = layer.spec.to_json()
        self._dims = len(layer.spec.weight_shape)
        self._acc = ACCUMULATORS[layer.spec.accumulator]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        # Called once per conv layer per batch: the children and their buffers are read from the
        # module dictionaries directly (nn.Module.__getattr__ is a measurable share at batch 1).
        mods = self._modules
        r, layer, c = mods["requant"], mods["layer"], mods["scale"]
        if (type(r) is not Requantize or type(layer) is not IntegerShiftLayer
                or (c is not None and type(c) is not ChannelScale) or _unfusable(r) or _unfusable(layer)
                or (c is not None and _unfusable(c)) or x.dim() != self._dims):
            y = layer(r(x))
            return y if c is None else c(y, residual)
        bias = layer._buffers["bias_int"]
        if bias is not None and bias.dtype != self._acc:
            bias = bias.to(self._acc)
        out_dtype = layer.out_dtype if c is None else c.out_dtype
        x, residual = _common(x, residual, out_dtype)  # the op's result has its input's dtype
        head = (x, layer._buffers["codes"], bias, self._spec_json, r.shift, r.lo, r.hi)
        if c is None:
            y = _INT_CONV(*head, None, None, None, None, 0, None, 0, None, None)
        else:
            cb = c._buffers
            y = _INT_CONV(*head, cb["signs"], cb["lefts"], cb["bias"], cb["rights"], c.pre, residual,
                          c.residual_shift, c.lo, c.hi)
        return y if y.dtype == out_dtype else y.to(out_dtype)


def _unfusable(step: nn.Module) -> bool:
    """A child that must run as its own module: hooked, or set to run its reference."""
    return bool(step.reference or step._forward_hooks or step._forward_pre_hooks)


class Clamp(nn.Module):
    """ReLU / ReLU6 / hardtanh on integers: ``clamp(x, lo, hi)`` (``None``: unbounded)."""

    def __init__(self, lo: int | None, hi: int | None):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.lo, self.hi)


class AlignedAdd(nn.Module):
    """``a + b`` with ``a`` shifted left by ``shift_a`` bits and ``b`` by ``shift_b`` (exact)."""

    def __init__(self, shift_a: int, shift_b: int):
        super().__init__()
        self.shift_a, self.shift_b = shift_a, shift_b
        self.out_dtype = torch.int64

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = _as(a, self.out_dtype), _as(b, self.out_dtype)
        return torch.bitwise_left_shift(a, self.shift_a) + torch.bitwise_left_shift(b, self.shift_b)


class SumPool(nn.Module):
    """Sum over ``kernel`` windows (``None``: over all positions, keeping dimensions as
    ``adaptive_avg_pool(x, 1)`` does)."""

    def __init__(self, kernel: tuple[int, ...] | None, stride: tuple[int, ...] | None, count: int):
        super().__init__()
        self.kernel, self.stride, self.count = kernel, stride, count
        self.out_dtype = torch.int64  # torch sums integers in int64

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
        if self.kernel is None:
            # the divisor after the sum was fixed at conversion: another input size would be wrong
            got = math.prod(x.shape[d] for d in dims)
            if got != self.count:
                raise ValueError(f"this integer-only model averages over {self.count} positions, as its "
                                 f"example input gave; got an input with {got}: convert it again with an "
                                 "example of this size")
            return _as(x.sum(dims, keepdim=True), self.out_dtype)
        # each unfold appends its window dimension last; the spatial dimensions stay at 2, 3, ...
        for d, (k, s) in enumerate(zip(self.kernel, self.stride, strict=True)):
            x = x.unfold(2 + d, k, s)
        return _as(x.sum(tuple(range(x.dim() - len(self.kernel), x.dim()))), self.out_dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _common(x: Tensor, residual: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``x`` and ``residual`` in one dtype for an epilogue op, whose result has its input's dtype:
    int64 where any of them (or the result) is int64, so that nothing narrower than its bound is
    ever computed in; else int32."""
    wide = torch.int64 in (x.dtype, out_dtype) or (residual is not None and residual.dtype == torch.int64)
    dtype = torch.int64 if wide else torch.int32
    return _as(x, dtype), None if residual is None else _as(residual, dtype)


class Dequantize(nn.Module):
    """The logits: ``v * 2**-frac`` in the model input's float dtype (computed in float64: exact;
    rounded once to a narrower input dtype)."""

    def __init__(self, frac: int):
        super().__init__()
        self.frac = frac

    def forward(self, v: Tensor, like: Tensor) -> Tensor:
        return (v.to(torch.float64) * 2.0 ** -self.frac).to(like.dtype)


# --------------------------------------------------------------------------------------------
# Conversion: trace the frozen model, give every value its fraction bits, emit integer steps.


class _Value:
    """A traced value of the integer graph: its node, fraction bits and a bound on its integers."""

    def __init__(self, node: torch.fx.Node, frac: int, bound: int):
        self.node, self.frac, self.bound = node, frac, bound


MAX_POOL_FUNCTIONS = {torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, F.max_pool1d, F.max_pool2d,
                      F.max_pool3d}
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                   torch.transpose, operator.getitem, *MAX_POOL_FUNCTIONS, torch.nn.functional.dropout}
_PASS_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose", "contiguous",
                 "__getitem__", "clone"}
_PASS_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Unflatten)
_RELU_FUNCTIONS = {*_RELUS, F.relu6, F.hardtanh}


def _describe(node: torch.fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({name})"


def integer_only(model: nn.Module, example_input: Tensor, scale_terms: int = DEFAULT_SCALE_TERMS
                 ) -> torch.fx.GraphModule:
    """The integer-only form of a frozen model (see the module docstring); ``model`` is unchanged.

    ``example_input`` (one batch of the inputs the model takes, float) fixes the shapes the
    conversion reads (pooling windows). ``scale_terms`` is how many signed powers of two
    approximate each BatchNorm channel's scale (1: a single shift, within 1/3 of the scale; 2:
    within 1/9; 3, the default, within 1/27 and typically much closer; each term is one more
    shift and add per value).

    The result is a ``torch.fx.GraphModule`` of integer steps (:class:`Requantize`,
    :class:`IntegerShiftLayer`, :class:`ChannelScale`, :class:`IntegerConv` for the three around a
    convolution, ...) that takes the float input and returns float logits; ``print(result.code)``
    shows them. Its shift layers run the frozen model's integer ops (the native kernels);
    :func:`set_reference_` switches every step to the pure-torch reference, which gives the same
    integers.

    Raises ValueError naming every operation that has no integer form, or a model without
    frozen shift layers.

    Example:
        >>> import torch, deepshift
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
        >>> frozen = deepshift.freeze_(deepshift.convert_(net, deepshift.QConfig(weight_bits=5)))
        >>> x = torch.randn(2, 1, 8, 8)
        >>> model = deepshift.integer_only(frozen, x)
        >>> bool((model(x) - frozen(x)).abs().max() < 0.1)
        True
        >>> deepshift.savings_report(model, (1, 8, 8)).float_mults_outside
        0
    """
    if not any(is_frozen_layer(m) for m in model.modules()):
        raise ValueError("integer_only needs a frozen model (deepshift.freeze_) with shift layers")
    if any(isinstance(m, ShiftConvBatchNorm) for m in model.modules()):
        raise ValueError("integer_only takes the frozen model, not its fuse_frozen copy (the integer "
                         "model fuses BatchNorm, residual and ReLU itself)")
    if isinstance(scale_terms, bool) or not isinstance(scale_terms, int) or not 1 <= scale_terms <= 8:
        raise ValueError(f"scale_terms must be an int in [1, 8], got {scale_terms!r}")
    try:
        traced = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types on untraceable code
        raise ValueError(f"integer_only cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    modules = dict(model.named_modules())
    gm = torch.fx.GraphModule(model, traced)
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(example_input)
    layers = [modules[n.target] for n in traced.nodes if n.op == "call_module"
              and is_frozen_layer(modules[n.target])]
    work_frac = max(layer.act_bits[1] for layer in layers) + GUARD_BITS
    first = layers[0]
    # int32 storage where every shift layer's input range, at work_frac, leaves the headroom
    store32 = all(max(-lo, hi) << (work_frac - layer.act_bits[1]) <= 2**31 >> INT32_HEADROOM_BITS
                  for layer in layers for lo, hi in [fixed_point_limits(layer.act_bits)])

    graph = torch.fx.Graph()
    new_modules: dict[str, nn.Module] = {}
    env: dict[torch.fx.Node, _Value] = {}
    unsupported: list[str] = []

    def add(name: str, module: nn.Module, args: tuple) -> torch.fx.Node:
        key = f"{name.replace('.', '_')}_{len(new_modules)}"
        new_modules[key] = module
        return graph.call_module(key, args)

    def value(arg):
        return env[arg] if isinstance(arg, torch.fx.Node) else arg

    for node in traced.nodes:
        if node.op == "placeholder":
            if env:
                unsupported.append(f"second input {node.name}")
                continue
            x = graph.placeholder(node.name)
            lo, hi = fixed_point_limits(first.act_bits)
            quantize = QuantizeInput(first.act_bits, first.act_rounding)
            quantize.out_dtype = _storage(max(-lo, hi), store32)
            env[node] = _Value(add("input", quantize, (x,)), first.act_bits[1], max(-lo, hi))
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node) or out not in env:
                unsupported.append("an output that is not one tensor")
                continue
            v = env[out]
            graph.output(add("logits", Dequantize(v.frac), (v.node, x)))
            continue
        if node.op == "get_attr":
            unsupported.append(f"{node.target} (a parameter or buffer read in forward)")
            env[node] = _Value(graph.call_function(_no_integer_form, ()), 0, 0)
            continue
        mod = _module_of(node, modules)
        result = _convert_node(node, mod, env, value, add, graph, work_frac, scale_terms, store32)
        if result is None:
            unsupported.append(_describe(node, modules))
            # a stand-in, so that the steps after it are checked too (the graph is not kept)
            result = _Value(graph.call_function(_no_integer_form, ()), 0, 0)
        env[node] = result
    if unsupported:
        listed = ", ".join(unsupported[:8]) + (f", ... ({len(unsupported) - 8} more)"
                                               if len(unsupported) > 8 else "")
        raise ValueError(f"integer_only: no integer form for {listed}. Integer-only models take shift "
                         "layers, BatchNorm, ReLU/ReLU6/hardtanh, residual additions, max and average "
                         "pooling, flatten/reshape/slicing and zero padding.")
    _fuse_clamps(graph, new_modules)
    _fuse_epilogues(graph, new_modules)
    _fuse_convs(graph, new_modules)
    root = nn.Module()
    for key, module in new_modules.items():
        root.add_module(key, module)
    graph.lint()
    result = torch.fx.GraphModule(root, graph, class_name=f"{type(model).__name__}IntegerOnly")
    for node, v in env.items():
        _check_int64(v.bound, node.name)
    return result


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _module_of(node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    return modules.get(node.target) if isinstance(node, torch.fx.Node) and node.op == "call_module" else None


def _fuse_clamps(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    """A clamp (ReLU) that a requantisation alone reads becomes that requantisation's range (the
    rounding shift is monotone: ``clamp(round_shift(clamp(x, L, H)), lo, hi)`` is ``clamp(round_shift(x),
    max(lo, round_shift(L)), min(hi, round_shift(H)))``); one right after a conv without BatchNorm
    becomes an identity epilogue step (one term ``x << 0``, no rounding), which the conv's op then
    takes over. Either way one pass over memory less, the same integers."""
    for node in list(graph.nodes):
        clamp = _module_of(node, modules)
        if not isinstance(clamp, Clamp) or len(node.args) != 1:
            continue
        prev = node.args[0]
        src = _module_of(prev, modules)
        if isinstance(src, IntegerShiftLayer) and src.spec.kind == "conv" and len(prev.users) == 1:
            one = torch.ones(1, 1, dtype=torch.int64)
            step = ChannelScale(one, torch.zeros_like(one), None, 0, 0, 0)
            step.lo, step.hi, step.out_dtype = clamp.lo, clamp.hi, src.out_dtype
            step.clamped = True
            modules[node.target] = step
            continue
        user = _only_user(node)
        requant = _module_of(user, modules)
        if isinstance(requant, Requantize) and user.args[0] is node:
            # the requantisation's own rounding, applied to the clamp's bounds
            bounds = [v for v in (clamp.lo, clamp.hi) if v is not None]
            rounded = ref.round_shift(torch.tensor(bounds, dtype=torch.int64), requant.shift).tolist()
            lo = requant.lo if clamp.lo is None else max(requant.lo, rounded[0])
            hi = requant.hi if clamp.hi is None else min(requant.hi, rounded[-1])
            if lo <= hi:
                requant.lo, requant.hi = lo, hi
                node.replace_all_uses_with(prev)
                graph.erase_node(node)
                modules.pop(node.target)


def _fuse_epilogues(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Each BatchNorm step (:class:`ChannelScale`) takes over the residual add (where its output is
    the operand not shifted) and then the clamp that use its result alone: one pass over memory
    (``deepshift::int_epilogue``) instead of three."""
    def replace(old: torch.fx.Node, last: torch.fx.Node, args: tuple) -> torch.fx.Node:
        with graph.inserting_before(last):
            new = graph.call_module(old.target, args)
        last.replace_all_uses_with(new)
        graph.erase_node(last)
        graph.erase_node(old)
        return new

    for node in list(graph.nodes):
        step = _module_of(node, modules)
        if not isinstance(step, ChannelScale) or len(node.args) != 1:
            continue
        user = _only_user(node)
        add = _module_of(user, modules)
        # (a step that already clamps cannot take an add after it: the clamp would move past the add)
        if isinstance(add, AlignedAdd) and not step.clamped and user.args[0] is not user.args[1]:
            mine, theirs = (add.shift_a, add.shift_b) if user.args[0] is node else (add.shift_b, add.shift_a)
            if mine == 0:
                other = user.args[1] if user.args[0] is node else user.args[0]
                step.residual_shift = theirs
                node = replace(node, user, (node.args[0], other))
                modules.pop(user.target)
        user = _only_user(node)
        clamp = _module_of(user, modules)
        if isinstance(clamp, Clamp):  # within the step's own clamp, if any (where the ranges meet)
            lo = clamp.lo if step.lo is None else step.lo if clamp.lo is None else max(step.lo, clamp.lo)
            hi = clamp.hi if step.hi is None else step.hi if clamp.hi is None else min(step.hi, clamp.hi)
            if lo is None or hi is None or lo <= hi:
                step.lo, step.hi, step.clamped = lo, hi, True
                node = replace(node, user, tuple(node.args))
                modules.pop(user.target)


def _fuse_convs(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Each conv's requantisation, integer layer and BatchNorm step (with what that took over) become
    one :class:`IntegerConv` where each feeds the next alone."""
    for node in list(graph.nodes):
        layer = _module_of(node, modules)
        if not isinstance(layer, IntegerShiftLayer) or layer.spec.kind != "conv" or len(node.args) != 1:
            continue
        prev = node.args[0]
        requant = _module_of(prev, modules)
        if not isinstance(requant, Requantize) or len(prev.users) != 1:
            continue
        user = _only_user(node)
        scale = _module_of(user, modules)
        if not isinstance(scale, ChannelScale) or user.args[0] is not node:
            user, scale = None, None
        last = user if user is not None else node
        name = f"{node.target}_fused"
        modules[name] = IntegerConv(requant, layer, scale)
        with graph.inserting_before(last):
            new = graph.call_module(name, (prev.args[0], *(user.args[1:] if user is not None else ())))
        last.replace_all_uses_with(new)
        for old in ([user] if user is not None else []) + [node, prev]:
            graph.erase_node(old)
            modules.pop(old.target)


def _check_int64(bound: int, name: str) -> None:
    if bound >= _INT64_SAFE:
        raise ValueError(f"integer_only: the integers at {name} may reach 2**{bound.bit_length()}, beyond "
                         "int64: narrow the activation bits or the layer's shift range")


def _no_integer_form() -> Tensor:
    raise AssertionError("unreachable: a model with this step is refused")


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _storage(bound: int, store32: bool) -> torch.dtype:
    """The dtype that stores a value of this bound (see the module docstring)."""
    return torch.int32 if store32 and bound <= _INT32_LIMIT else torch.int64


def _convert_node(node, mod, env, value, add, graph, work_frac: int, scale_terms: int,
                  store32: bool) -> _Value | None:
    """The integer step(s) for one traced node, or None if it has none (``store32``: int32 storage)."""

    def typed(module: nn.Module, bound: int) -> nn.Module:
        if isinstance(module, ChannelScale) and store32:
            module.saturate_int32()
            bound = module.out_bound
        module.out_dtype = _storage(bound, store32)
        return module

    args = [value(a) for a in node.args]
    first = args[0] if args and isinstance(args[0], _Value) else None
    name = str(node.target) if node.op == "call_module" else node.name

    # shift layers
    if isinstance(mod, (ShiftLinear, ShiftConvNd)) and first is not None and len(args) == 1:
        lo, hi = fixed_point_limits(mod.act_bits)
        q = add(name + "_in", typed(Requantize(first.frac, mod.act_bits[1], lo, hi), max(-lo, hi)),
                (first.node,))
        u = min(mod.shift_lo, 0)
        bound = accumulator_bound(mod.fan_in(), max(-lo, hi), mod.shift_hi - u,
                                  max(-lo, hi) if mod.bias_int is not None else 0, u)
        return _Value(add(name, typed(IntegerShiftLayer(mod), bound), (q,)), mod.act_bits[1] - u, bound)

    # BatchNorm (eval): per-channel scale and shift
    if isinstance(mod, (FrozenBatchNorm, nn.modules.batchnorm._BatchNorm)) and first is not None:
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or mod.running_var is None):
            return None
        scale = batchnorm_scale(mod)
        b = mod.bias.double() if mod.bias is not None else torch.zeros_like(scale)
        signs, exps = power_terms(scale, scale_terms)
        # y = s~ * (x - mean) + bias: the rounded scale times the centred input, so its error
        # grows with the spread of x around the mean, not with x itself
        shift = b - mod.running_mean.double() * terms_value(signs, exps)
        step = ChannelScale(signs, exps, shift, first.frac, work_frac, first.bound)
        _check_int64(step.bound, name)
        return _Value(add(name, typed(step, step.out_bound), (first.node,)), work_frac, step.out_bound)

    # clamps
    relu = ((node.op == "call_module" and isinstance(mod, (nn.ReLU, nn.ReLU6, nn.Hardtanh)))
            or (node.op == "call_function" and node.target in _RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_")))
    if relu and first is not None:
        if isinstance(mod, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            lo_f, hi_f = mod.min_val, mod.max_val
        elif node.target is F.relu6:
            lo_f, hi_f = 0.0, 6.0
        elif node.target is F.hardtanh:
            lo_f = node.kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi_f = node.kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        else:
            lo_f, hi_f = 0.0, None
        bounds = []
        for v in (lo_f, hi_f):
            if v is None:
                bounds.append(None)
                continue
            scaled = float(v) * 2.0**first.frac
            if scaled != round(scaled):
                return None
            bounds.append(int(scaled))
        return _Value(add(name, Clamp(*bounds), (first.node,)), first.frac, first.bound)

    # residual additions
    if node.op == "call_function" and node.target in _ADDS and len(args) == 2 and not node.kwargs \
            and all(isinstance(a, _Value) for a in args):
        a, b = args
        frac = max(a.frac, b.frac)
        step = AlignedAdd(frac - a.frac, frac - b.frac)
        bound = (a.bound << (frac - a.frac)) + (b.bound << (frac - b.frac))
        return _Value(add("add", typed(step, bound), (a.node, b.node)), frac, bound)

    # average pooling
    shape_in = _shape(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
    shape_out = _shape(node)
    pool = None
    adaptive = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    if isinstance(mod, ExactGlobalAvgPool) or (isinstance(mod, adaptive) and shape_out is not None
                                               and all(s == 1 for s in shape_out[2:])):
        pool = (None, None)
    elif isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        dims = len(shape_in) - 2 if shape_in else 0

        def as_tuple(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims

        padding = as_tuple(mod.padding)
        if any(padding) or mod.ceil_mode or getattr(mod, "divisor_override", None):
            return None
        pool = (as_tuple(mod.kernel_size), as_tuple(mod.stride or mod.kernel_size))
    if pool is not None and first is not None and shape_in is not None:
        kernel, stride = pool
        count = math.prod(shape_in[2:]) if kernel is None else math.prod(kernel)
        bound = first.bound * count
        summed = add(name + "_sum", typed(SumPool(kernel, stride, count), bound), (first.node,))
        if count & (count - 1) == 0:  # a power of two: the divisor is a change of fraction bits
            return _Value(summed, first.frac + count.bit_length() - 1, bound)
        terms = 1
        while True:
            signs, exps = power_terms(torch.tensor([1.0 / count], dtype=torch.float64), terms)
            if abs(float(terms_value(signs, exps)[0]) * count - 1) <= _DIVISOR_ACCURACY or terms == 8:
                break
            terms += 1
        step = ChannelScale(signs, exps, None, first.frac, work_frac, bound)
        _check_int64(step.bound, name)
        return _Value(add(name, typed(step, step.out_bound), (summed,)), work_frac, step.out_bound)

    # value-preserving steps (copies, views, max pooling, zero padding)
    if first is not None:
        keeps = ((node.op == "call_module" and isinstance(mod, _PASS_MODULES))
                 or (node.op == "call_function" and node.target in _PASS_FUNCTIONS)
                 or (node.op == "call_method" and node.target in _PASS_METHODS))
        if node.op == "call_function" and node.target is F.pad:
            mode = node.kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            fill = node.kwargs.get("value", args[3] if len(args) > 3 else None)
            keeps = mode == "constant" and not fill
        if keeps:
            new_args = tuple(a.node if isinstance(a, _Value) else a for a in args)
            if node.op == "call_module":
                copy_mod = mod
                new = add(name, copy_mod, new_args)
            elif node.op == "call_method":
                new = graph.call_method(node.target, new_args, dict(node.kwargs))
            else:
                new = graph.call_function(node.target, new_args, dict(node.kwargs))
            return _Value(new, first.frac, first.bound)
    return None


def set_reference_(model: nn.Module, on: bool = True) -> nn.Module:
    """Make the shift layers and BatchNorm steps of an integer-only model call the pure-torch
    reference ops (``on``) or the dispatched native kernels (the default)."""
    for module in model.modules():
        if isinstance(module, (IntegerShiftLayer, ChannelScale, Requantize)):
            module.reference = on
    return model
