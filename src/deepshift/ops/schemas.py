"""Every ``deepshift::*`` op: its schema, its fake (meta) implementation and its default implementation.

The library and layer modules reach native code only through these ops (``torch.ops.deepshift.*``);
a backend registers an implementation for its device key with :func:`register_backend` (the CPU
kernels in :mod:`deepshift.backends.cpu`, Triton's in :mod:`deepshift.backends.triton`). Each op's
default implementation, used on every other device and wherever a backend declines a call, is the
pure-torch reference in :mod:`deepshift.ops.reference`, which defines what the op computes; the
backends return its results bit for bit.

The ops are declared with ``torch.library.Library`` rather than ``torch.library.custom_op``: the
former's dispatch costs ~5 us a call here, the latter's ~20 us, which at batch 1 is a large share
of a small layer's time.

Ops (integer ops first; see :mod:`deepshift.ops.reference` for the exact semantics):

* ``shift_linear`` / ``shift_conv``: the multiplication-free integer layers on packed codes.
* ``frozen_linear`` / ``frozen_conv``: a frozen layer's whole forward on a float input, the layer
  described by its :class:`~deepshift.frozen.spec.FrozenSpec` as JSON: padding, rounding to fixed
  point, the integer layer, the power-of-two scale back (``frozen_conv`` optionally followed by a
  per-channel affine, a residual add and ReLU, for fused Conv-BatchNorm blocks).
* ``quantize_input`` / ``scale_output``: those two element-wise steps alone.
* ``channel_affine``: ``x * scale[c] + shift[c]``, two roundings (a frozen BatchNorm).
* ``int_epilogue``: an integer-only model's BatchNorm (a sum of shifts per channel, rounded once),
  residual add and clamp, on int32 or int64 (computed in int64; the result in the input's dtype).
* ``int_conv``: an integer-only model's conv layer whole: input requantisation, the shift conv and
  ``int_epilogue``, int32 or int64 in and the same dtype out.
* ``fake_quantize``: training-time fixed-point rounding, and whether any input saturated.
* ``q_round`` / ``ps_round``: DeepShift-Q / -PS deterministic weight rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deepshift.frozen.spec import FrozenSpec
from deepshift.ops import reference as ref

_DEF = torch.library.Library("deepshift", "DEF")
_IMPL = torch.library.Library("deepshift", "IMPL")

_WEIGHT = "Tensor codes, int[] weight_shape, int weight_bits, bool has_zero, int shift_lo, Tensor? bias"
_CONV = "int[] stride, int[] padding, int[] dilation, int groups, bool transposed, int[] output_padding"
# A frozen layer's fixed description travels as one argument, its FrozenSpec's JSON (parsed once
# per layer and cached): a boxed call costs per argument, and twenty of them cost ~10 us here.
_FROZEN = "Tensor x, Tensor codes, Tensor? bias, str spec"

SCHEMAS: dict[str, tuple[str, Callable]] = {
    "shift_linear": (f"shift_linear(Tensor x, {_WEIGHT}) -> Tensor", ref.shift_linear_reference),
    "shift_conv": (f"shift_conv(Tensor x, {_WEIGHT}, {_CONV}) -> Tensor", ref.shift_conv_reference),
    "frozen_linear": (f"frozen_linear({_FROZEN}) -> Tensor", ref.frozen_linear_reference),
    "frozen_conv": (
        f"frozen_conv({_FROZEN}, Tensor? bn_scale, Tensor? bn_shift, Tensor? residual, bool relu) -> Tensor",
        ref.frozen_conv_reference,
    ),
    "quantize_input": ("quantize_input(Tensor x, int[] act_bits, str rounding, ScalarType dtype) -> Tensor",
                       ref.quantize_input_reference),
    "scale_output": ("scale_output(Tensor y, int exponent, ScalarType dtype) -> Tensor",
                     ref.scale_output_reference),
    "channel_affine": ("channel_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor",
                       ref.channel_affine_reference),
    "int_epilogue": (
        "int_epilogue(Tensor x, Tensor signs, Tensor lefts, Tensor? bias, Tensor rights, int pre, "
        "Tensor? residual, int residual_shift, int? lo, int? hi) -> Tensor",
        ref.int_epilogue_reference,
    ),
    "int_conv": (
        "int_conv(Tensor x, Tensor codes, Tensor? bias, str spec, int in_shift, int in_lo, int in_hi, "
        "Tensor? signs, Tensor? lefts, Tensor? ebias, Tensor? rights, int pre, Tensor? residual, "
        "int residual_shift, int? lo, int? hi) -> Tensor",
        ref.int_conv_reference,
    ),
    "fake_quantize": (
        "fake_quantize(Tensor x, int frac_bits, float lo, float hi, bool floor, float band_lo, "
        "float band_hi) -> (Tensor, Tensor)",
        ref.fake_quantize_reference,
    ),
    "q_round": ("q_round(Tensor weight, int p_min, int p_max) -> Tensor", ref.q_round_reference),
    "ps_round": ("ps_round(Tensor shift, Tensor sign, int p_min, int p_max) -> Tensor",
                 ref.ps_round_reference),
}

for _name, (_schema, _default) in SCHEMAS.items():
    _DEF.define(_schema)
    _DEF.impl(_name, _default, "CompositeExplicitAutograd")


def register_backend(name: str, dispatch_key: str, kernel: Callable) -> None:
    """Register ``kernel`` as op ``deepshift::<name>``'s implementation for ``dispatch_key``
    ("CPU", "CUDA"). The kernel takes the op's arguments and returns the reference's result."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown op deepshift::{name}")
    _IMPL.impl(name, kernel, dispatch_key)


# ---- fake (meta) implementations: output shapes and dtypes for tracing and torch.compile --------
# The dispatcher also picks the fake when one real tensor is on "meta" and another elsewhere: a
# device mismatch is then torch's usual error, not an empty result.


def _same_device(*tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"expected all tensors to be on the same device, got {sorted(map(str, devices))}")


@torch.library.register_fake("deepshift::shift_linear")
def _shift_linear_fake(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias):
    _same_device(x, codes, bias)
    return x.new_empty((*x.shape[:-1], weight_shape[0]))


def _conv_shape(x, weight_shape, stride, padding, dilation, groups, transposed, output_padding):
    dims = len(weight_shape) - 2
    c_out = weight_shape[1] * groups if transposed else weight_shape[0]
    sizes = [
        ref.conv_output_size(x.shape[2 + d], weight_shape[2 + d], stride[d], padding[d], dilation[d],
                             transposed, output_padding[d])
        for d in range(dims)
    ]
    return (x.shape[0], c_out, *sizes)


@torch.library.register_fake("deepshift::shift_conv")
def _shift_conv_fake(x, codes, weight_shape, weight_bits, has_zero, shift_lo, bias, *conv):
    _same_device(x, codes, bias)
    return x.new_empty(_conv_shape(x, weight_shape, *conv))


def _float_out(x):
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


@torch.library.register_fake("deepshift::frozen_linear")
def _frozen_linear_fake(x, codes, bias, spec):
    _same_device(x, codes, bias)
    return x.new_empty((*x.shape[:-1], FrozenSpec.from_json(spec).weight_shape[0]), dtype=_float_out(x))


@torch.library.register_fake("deepshift::frozen_conv")
def _frozen_conv_fake(x, codes, bias, spec, bn_scale, bn_shift, residual, relu):
    _same_device(x, codes, bias, bn_scale, bn_shift, residual)
    return x.new_empty(ref.frozen_conv_output_shape(FrozenSpec.from_json(spec), x.shape), dtype=_float_out(x))


@torch.library.register_fake("deepshift::int_conv")
def _int_conv_fake(x, codes, bias, spec, *rest):
    _same_device(x, codes, bias)
    return x.new_empty(ref.frozen_conv_output_shape(FrozenSpec.from_json(spec), x.shape))


@torch.library.register_fake("deepshift::quantize_input")
def _quantize_input_fake(x, act_bits, rounding, dtype):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.register_fake("deepshift::scale_output")
def _scale_output_fake(y, exponent, dtype):
    return y.new_empty(y.shape, dtype=dtype)


@torch.library.register_fake("deepshift::channel_affine")
def _channel_affine_fake(x, scale, shift):
    _same_device(x, scale, shift)
    return torch.empty_like(x)


@torch.library.register_fake("deepshift::fake_quantize")
def _fake_quantize_fake(x, frac_bits, lo, hi, floor, band_lo, band_hi):
    return torch.empty_like(x), x.new_empty((), dtype=torch.bool)


@torch.library.register_fake("deepshift::q_round")
def _q_round_fake(weight, p_min, p_max):
    return torch.empty_like(weight)


@torch.library.register_fake("deepshift::ps_round")
def _ps_round_fake(shift, sign, p_min, p_max):
    _same_device(shift, sign)
    return torch.empty_like(shift)
