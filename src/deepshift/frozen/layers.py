"""Frozen (inference) shift layers: packed integer codes, fixed-point inputs, integer ops.

A frozen layer holds no float weight. Its buffers are ``codes`` (uint8, ``weight_bits`` bits per
weight, bit-packed by :func:`deepshift.pack_codes`) and, if the layer has a bias, ``bias_int``
(int32, the bias in fixed-point units ``2**-F``). Its forward pass

1. rounds the float input to fixed point ``x_int = clamp(round(x * 2**F))`` (``act_bits = (I, F)``,
   the layer's ``act_rounding``; computed in float64, exact), applying non-zero padding modes /
   asymmetric padding first (padding copies values, so it commutes with the elementwise
   rounding). Out-of-range inputs (and +-inf) saturate; a NaN input raises ValueError.
   (``deepshift.fixed_point``, used in training, rounds through float32 when ``I + F > 24``;
   the frozen layer follows the exact definition, ``to_fixed_point_int`` in float64);
2. runs ``deepshift::shift_linear`` / ``deepshift::shift_conv`` on integers in the accumulator
   dtype chosen at freeze time (int32 when provably safe, else int64; see
   :func:`deepshift.ops.reference.accumulator_bound`);
3. scales the integer result by ``2**(min(shift_lo, 0) - F)`` (exact in float64 while the
   result is below ``2**53``) and returns it in the input's float dtype (float32 for float32
   input, rounded once, to nearest).

All three steps are one op, ``deepshift::frozen_linear`` / ``deepshift::frozen_conv`` (one native
call on the CPU; see :mod:`deepshift.ops.reference` for the definition).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from deepshift.core.quantize import fixed_point_limits
from deepshift.frozen.spec import FrozenSpec
from deepshift.ops.codes import decode_codes, packed_numel
from deepshift.ops.reference import ACCUMULATORS as _ACC_DTYPES
from deepshift.ops.reference import accumulator_bound, conv_pads, fan_in, frozen_conv_output_shape


def choose_accumulator(
    fan_in: int, act_bits: tuple[int, int], shift_lo: int, shift_hi: int, has_bias: bool
) -> str:
    """``"int32"`` when no intermediate can reach ``2**31``, ``"int64"`` when none can reach
    ``2**63``; otherwise ValueError (the layer's used shift span is too wide for exact integers).
    """
    lo, _ = fixed_point_limits(act_bits)
    u = min(shift_lo, 0)
    bound = accumulator_bound(fan_in, -lo, shift_hi - u, -lo if has_bias else 0, u)
    if bound < 2**31:
        return "int32"
    if bound < 2**63:
        return "int64"
    raise ValueError(
        f"exact integer accumulation needs {bound.bit_length() + 1} bits (fan-in {fan_in}, "
        f"act_bits {act_bits}, used shifts [{shift_lo}, {shift_hi}]) but int64 holds 64: "
        "narrow the activation bits or the layer's shift range"
    )


class _FrozenShift(nn.Module):
    """State shared by the frozen layers, made from a :class:`~deepshift.frozen.spec.FrozenSpec`
    (``spec()`` gives it back)."""

    def __init__(self, spec: FrozenSpec):
        super().__init__()
        if spec.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs a {self.kind} spec, got {spec.kind!r}")
        self.weight_shape: tuple[int, ...] = spec.weight_shape
        self.weight_bits = spec.weight_bits
        self.has_zero = spec.has_zero
        self.shift_lo = spec.shift_lo
        self.shift_hi = spec.shift_hi
        self.act_bits = spec.act_bits
        self.act_rounding = spec.act_rounding
        self.method = spec.method
        self.accumulator = spec.accumulator
        # The training config (QConfig/PSConfig.to_dict()), kept for reports and packed files.
        self.config: dict[str, Any] | None = spec.config
        # The ops' description of the layer, made once: the layer's fields do not change.
        self._spec_json = spec.to_json()
        numel = math.prod(self.weight_shape)
        self.register_buffer("codes", torch.zeros(packed_numel(numel, self.weight_bits), dtype=torch.uint8))
        if spec.bias:
            self.register_buffer("bias_int", torch.zeros(spec.out_channels, dtype=torch.int32))
        else:
            self.bias_int = None

    def fan_in(self) -> int:
        """Most terms any output sums (the accumulator bound's fan-in)."""
        return fan_in(self.weight_shape, getattr(self, "transposed", False), getattr(self, "groups", 1))

    @torch.no_grad()
    def check_consistency(self) -> None:
        """ValueError unless the codes and the stated shift range / accumulator agree.

        Loading a file calls this, so a header that misstates them (which could make the
        integer accumulator overflow silently) is rejected. (The spec's fields themselves were
        checked when the layer was made: :class:`~deepshift.frozen.spec.FrozenSpec`.)
        """
        rel, sign = decode_codes(self.codes, self.weight_shape, self.weight_bits, self.has_zero)
        used = rel[sign != 0]
        top = self.shift_lo + (int(used.max()) if used.numel() else 0)
        if top > self.shift_hi or self.shift_hi - self.shift_lo >= 2 ** (self.weight_bits - 1):
            raise ValueError(f"codes reach shift {top}, beyond the stated range "
                             f"[{self.shift_lo}, {self.shift_hi}]")
        needed = choose_accumulator(self.fan_in(), self.act_bits, self.shift_lo, self.shift_hi,
                                    self.bias_int is not None)
        if _ACC_DTYPES[needed].itemsize > _ACC_DTYPES[self.accumulator].itemsize:
            raise ValueError(f"accumulator {self.accumulator} is too narrow; exactness needs {needed}")
        if self.bias_int is not None:
            lo, hi = fixed_point_limits(self.act_bits)
            if bool((self.bias_int < lo).any()) or bool((self.bias_int > hi).any()):
                raise ValueError("bias lies outside the fixed-point range")

    def spec(self) -> FrozenSpec:
        """The layer's description, from which ``FROZEN_TYPES[spec.kind](spec)`` rebuilds it empty."""
        return FrozenSpec(
            kind=self.kind, weight_shape=self.weight_shape, weight_bits=self.weight_bits,
            has_zero=self.has_zero, shift_lo=self.shift_lo, shift_hi=self.shift_hi, act_bits=self.act_bits,
            act_rounding=self.act_rounding, method=self.method, accumulator=self.accumulator,
            bias=self.bias_int is not None, config=self.config, **self._conv_fields(),
        )

    def _conv_fields(self) -> dict[str, Any]:
        return {}

    def _check_input(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a float input, got {x.dtype}")

    def extra_repr(self) -> str:
        return (f"weight_shape={self.weight_shape}, method={self.method}, bits={self.weight_bits}, "
                f"shifts=[{self.shift_lo}, {self.shift_hi}], act_bits={self.act_bits}, "
                f"accumulator={self.accumulator}")


class ShiftLinear(_FrozenShift):
    """Frozen shift ``nn.Linear``: ``(..., in_features) -> (..., out_features)``."""

    kind = "linear"

    def __init__(self, spec: FrozenSpec):
        super().__init__(spec)
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return torch.ops.deepshift.frozen_linear(x, self.codes, self.bias_int, self._spec_json)


class ShiftConvNd(_FrozenShift):
    """Frozen shift convolution: Conv1d/2d/3d and ConvTranspose1d/2d/3d, every option."""

    kind = "conv"

    def __init__(self, spec: FrozenSpec):
        super().__init__(spec)
        self.transposed = spec.transposed
        self.groups = spec.groups
        self.out_channels = spec.out_channels
        self.in_channels = self.weight_shape[0] if self.transposed else self.weight_shape[1] * self.groups
        self.kernel_size = tuple(self.weight_shape[2:])
        self.stride = spec.stride
        self.dilation = spec.dilation
        self.output_padding = spec.output_padding
        self.padding = spec.padding
        self.padding_mode = spec.padding_mode
        self._pads = conv_pads(self.padding, self.kernel_size, self.dilation)
        # Padding the op does itself (symmetric zeros) vs. padding applied to the float input.
        self._pad_outside = spec.pad_outside

    def _conv_fields(self) -> dict[str, Any]:
        return {"transposed": self.transposed, "groups": self.groups, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "output_padding": self.output_padding,
                "padding_mode": self.padding_mode}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output shape for an input shape (batched)."""
        return frozen_conv_output_shape(FrozenSpec.from_json(self._spec_json), input_shape)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        return self.forward_fused(x, output_size=output_size)

    def forward_fused(self, x: Tensor, bn_scale: Tensor | None = None, bn_shift: Tensor | None = None,
                      residual: Tensor | None = None, relu: bool = False,
                      output_size: list[int] | None = None) -> Tensor:
        """The forward, optionally followed by a per-channel affine (a frozen BatchNorm's
        ``affine(x.dtype)``), ``+ residual`` and ReLU, in one op (one native call on the CPU)."""
        if output_size is not None:
            raise NotImplementedError("output_size is not supported by frozen transposed convolutions; "
                                      "set output_padding on the layer instead")
        self._check_input(x)
        unbatched = x.dim() == len(self.kernel_size) + 1
        if unbatched:
            x = x.unsqueeze(0)
        y = torch.ops.deepshift.frozen_conv(x, self.codes, self.bias_int, self._spec_json, bn_scale, bn_shift,
                                            residual, relu)
        return y.squeeze(0) if unbatched else y


FROZEN_TYPES: dict[str, type[_FrozenShift]] = {"linear": ShiftLinear, "conv": ShiftConvNd}


def frozen_from_spec(spec: FrozenSpec) -> _FrozenShift:
    """An empty frozen layer (zero codes) described by ``spec``; fill it with ``load_state_dict``."""
    return FROZEN_TYPES[spec.kind](spec)


def is_frozen_layer(module: nn.Module) -> bool:
    """True for :class:`ShiftLinear` and :class:`ShiftConvNd`."""
    return isinstance(module, _FrozenShift)
