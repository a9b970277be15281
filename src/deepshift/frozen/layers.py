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
from deepshift.ops.codes import packed_numel
from deepshift.ops.reference import ACCUMULATORS as _ACC_DTYPES
from deepshift.ops.reference import accumulator_bound, conv_output_size


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


class _FrozenShift(nn.Module):
    """State shared by the frozen layers; ``spec()`` / ``from_spec`` round-trip it through JSON."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.weight_shape: tuple[int, ...] = tuple(int(d) for d in spec["weight_shape"])
        self.weight_bits = int(spec["weight_bits"])
        self.has_zero = bool(spec["has_zero"])
        self.shift_lo = int(spec["shift_lo"])
        self.shift_hi = int(spec["shift_hi"])
        self.act_bits = (int(spec["act_bits"][0]), int(spec["act_bits"][1]))
        self.act_rounding = str(spec["act_rounding"])
        self.method = str(spec["method"])
        self.accumulator = str(spec["accumulator"])
        # The training config (QConfig/PSConfig.to_dict()), kept for reports and packed files.
        self.config: dict[str, Any] | None = spec.get("config")
        if self.accumulator not in _ACC_DTYPES:
            raise ValueError(f"accumulator must be int32 or int64, got {self.accumulator!r}")
        numel = math.prod(self.weight_shape)
        self.register_buffer("codes", torch.zeros(packed_numel(numel, self.weight_bits), dtype=torch.uint8))
        if spec["bias"]:
            self.register_buffer("bias_int", torch.zeros(self.out_channels_(), dtype=torch.int32))
        else:
            self.bias_int = None

    def out_channels_(self) -> int:
        raise NotImplementedError

    def fan_in(self) -> int:
        """Most terms any output sums (the accumulator bound's fan-in)."""
        w = self.weight_shape
        if self.kind == "linear":
            return w[1]
        per_group = w[0] // self.groups if self.transposed else w[1]
        return per_group * math.prod(w[2:])

    @torch.no_grad()
    def check_consistency(self) -> None:
        """ValueError unless the codes and the stated shift range / accumulator agree.

        Loading a file calls this, so a header that misstates them (which could make the
        integer accumulator overflow silently) is rejected.
        """
        from deepshift.ops.codes import decode_codes

        if self.method not in ("q", "ps") or self.has_zero != (self.method == "ps"):
            raise ValueError(f"method {self.method!r} and has_zero={self.has_zero} disagree")
        if self.act_rounding not in ("nearest", "floor"):
            raise ValueError(f"unknown act_rounding {self.act_rounding!r}")
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

    def spec(self) -> dict[str, Any]:
        """JSON-safe description from which :meth:`from_spec` rebuilds an empty layer."""
        return {
            "weight_shape": list(self.weight_shape),
            "weight_bits": self.weight_bits,
            "has_zero": self.has_zero,
            "shift_lo": self.shift_lo,
            "shift_hi": self.shift_hi,
            "act_bits": list(self.act_bits),
            "act_rounding": self.act_rounding,
            "method": self.method,
            "accumulator": self.accumulator,
            "bias": self.bias_int is not None,
            "config": self.config,
        }

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

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.out_features, self.in_features = self.weight_shape

    def out_channels_(self) -> int:
        return self.weight_shape[0]

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ShiftLinear:
        return cls(spec)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, **super().spec()}

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return torch.ops.deepshift.frozen_linear(
            x, self.codes, list(self.weight_shape), self.weight_bits, self.has_zero, self.shift_lo,
            self.bias_int, list(self.act_bits), self.act_rounding, self.accumulator,
        )


class ShiftConvNd(_FrozenShift):
    """Frozen shift convolution: Conv1d/2d/3d and ConvTranspose1d/2d/3d, every option."""

    kind = "conv"

    def __init__(self, spec: dict[str, Any]):
        self.transposed = bool(spec["transposed"])
        self.groups = int(spec["groups"])
        w = [int(d) for d in spec["weight_shape"]]
        # Checked before any buffer is allocated: groups divides the weight's first dimension,
        # which bounds the bias size by the weight's.
        if self.groups < 1 or w[0] % self.groups:
            raise ValueError(f"groups={self.groups} must be positive and divide {w[0]}")
        self.out_channels = w[1] * self.groups if self.transposed else w[0]
        self.in_channels = w[0] if self.transposed else w[1] * self.groups
        super().__init__(spec)
        dims = len(self.weight_shape) - 2
        self.kernel_size = tuple(self.weight_shape[2:])
        self.stride = tuple(int(v) for v in spec["stride"])
        self.dilation = tuple(int(v) for v in spec["dilation"])
        self.output_padding = tuple(int(v) for v in spec["output_padding"])
        padding = spec["padding"]
        self.padding = padding if isinstance(padding, str) else tuple(int(v) for v in padding)
        self.padding_mode = str(spec["padding_mode"])
        if self.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {self.padding_mode!r}")
        for name in ("stride", "dilation", "output_padding", "kernel_size"):
            if len(getattr(self, name)) != dims:
                raise ValueError(f"{name} needs {dims} values")
        if min(self.stride + self.dilation, default=1) < 1:
            raise ValueError("stride and dilation must be positive")
        if min(self.output_padding, default=0) < 0:
            raise ValueError("output_padding must be >= 0")
        if any(op >= max(st, dl) for op, st, dl in zip(self.output_padding, self.stride, self.dilation,
                                                        strict=False)):
            raise ValueError("output_padding must be smaller than stride or dilation")
        if not self.transposed and any(self.output_padding):
            raise ValueError("output_padding is only for transposed convolutions")
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid") or self.transposed:
                raise ValueError(f"padding={self.padding!r} is not supported here")
        elif len(self.padding) != dims or min(self.padding, default=0) < 0:
            raise ValueError(f"padding needs {dims} values >= 0")
        self._pads = conv_pads(self.padding, self.kernel_size, self.dilation)
        # Padding the op does itself (symmetric zeros) vs. padding applied to the float input.
        self._pad_outside = self.padding_mode != "zeros" or isinstance(self.padding, str)

    def out_channels_(self) -> int:
        return self.out_channels

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ShiftConvNd:
        return cls(spec)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **super().spec(),
            "transposed": self.transposed,
            "groups": self.groups,
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "output_padding": list(self.output_padding),
            "padding_mode": self.padding_mode,
        }

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output shape for an input shape (batched)."""
        dims = len(self.kernel_size)
        sizes = []
        for d in range(dims):
            size = input_shape[2 + d]
            pad = 0 if self._pad_outside else self.padding[d]
            if self._pad_outside:
                size += self._pads[2 * (dims - 1 - d)] + self._pads[2 * (dims - 1 - d) + 1]
            sizes.append(conv_output_size(size, self.kernel_size[d], self.stride[d], pad,
                                          self.dilation[d], self.transposed, self.output_padding[d]))
        return (input_shape[0], self.out_channels, *sizes)

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
        dims = len(self.kernel_size)
        unbatched = x.dim() == dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        if self._pad_outside:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = torch.nn.functional.pad(x, self._pads, mode=mode)
            padding = [0] * dims
        else:
            padding = list(self.padding)
        y = torch.ops.deepshift.frozen_conv(
            x, self.codes, list(self.weight_shape), self.weight_bits, self.has_zero, self.shift_lo,
            self.bias_int, list(self.stride), padding, list(self.dilation), self.groups, self.transposed,
            list(self.output_padding), list(self.act_bits), self.act_rounding, self.accumulator,
            bn_scale, bn_shift, residual, relu,
        )
        return y.squeeze(0) if unbatched else y


FROZEN_TYPES: dict[str, type[_FrozenShift]] = {"linear": ShiftLinear, "conv": ShiftConvNd}


def frozen_from_spec(spec: dict[str, Any]) -> _FrozenShift:
    """An empty frozen layer (zero codes) described by ``spec``; fill it with ``load_state_dict``."""
    kind = spec.get("kind")
    if kind not in FROZEN_TYPES:
        raise ValueError(f"unknown frozen layer kind {kind!r}")
    return FROZEN_TYPES[kind].from_spec(spec)


def is_frozen_layer(module: nn.Module) -> bool:
    """True for :class:`ShiftLinear` and :class:`ShiftConvNd`."""
    return isinstance(module, _FrozenShift)
