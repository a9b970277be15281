"""``FrozenSpec``: everything about a frozen shift layer except its tensors, in one typed record.

``freeze_`` builds it, the frozen layers are made from it, and the packed format stores it as JSON
and validates what it reads through :meth:`FrozenSpec.from_dict`: one place checks every field,
so a layer made from an untrusted file is as well-formed as one made by ``freeze_``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from typing import Any

from deepshift.core.config import config_from_dict

KINDS = ("linear", "conv")
ACCUMULATORS = ("int32", "int64")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV_FIELDS = ("transposed", "groups", "stride", "padding", "dilation", "output_padding", "padding_mode")
_SHIFT_LIMIT = 1024  # |shift_lo|, |shift_hi|: far beyond any float exponent, small enough to be safe


@dataclass(frozen=True)
class FrozenSpec:
    """A frozen layer's description (see :class:`deepshift.ShiftLinear` / :class:`deepshift.ShiftConvNd`).

    ``weight_shape`` is torch's weight shape for the layer; ``shift_lo`` / ``shift_hi`` the lowest
    and highest shift the codes use; ``accumulator`` the integer dtype proved exact at freeze time;
    ``bias`` whether the layer has ``bias_int``; ``config`` the training config
    (``QConfig/PSConfig.to_dict()``) for reports. The convolution fields are torch's options.
    """

    kind: str
    weight_shape: tuple[int, ...]
    weight_bits: int
    has_zero: bool
    shift_lo: int
    shift_hi: int
    act_bits: tuple[int, int]
    act_rounding: str
    method: str
    accumulator: str
    bias: bool
    config: dict[str, Any] | None = None
    transposed: bool = False
    groups: int = 1
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    output_padding: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        self._validate()

    @property
    def out_channels(self) -> int:
        """Output features / channels (the bias size)."""
        w = self.weight_shape
        return w[1] * self.groups if self.kind == "conv" and self.transposed else w[0]

    def _validate(self) -> None:
        def fail(message: str) -> ValueError:
            return ValueError(f"frozen layer spec: {message}")

        if self.kind not in KINDS:
            raise fail(f"unknown kind {self.kind!r}")
        w = self.weight_shape
        dims = 0 if self.kind == "linear" else len(w) - 2
        if not (len(w) == 2 if self.kind == "linear" else 1 <= dims <= 3) or min(w) < 1:
            raise fail(f"invalid weight shape {list(w)} for a {self.kind} layer")
        if not 2 <= self.weight_bits <= 8:
            raise fail(f"weight_bits must be in 2..8, got {self.weight_bits}")
        if self.method not in ("q", "ps") or self.has_zero != (self.method == "ps"):
            raise fail(f"method {self.method!r} and has_zero={self.has_zero} disagree")
        if self.accumulator not in ACCUMULATORS:
            raise fail(f"accumulator must be int32 or int64, got {self.accumulator!r}")
        if self.act_rounding not in ("nearest", "floor"):
            raise fail(f"unknown act_rounding {self.act_rounding!r}")
        i, f = self.act_bits
        if not (i >= 1 and f >= 0 and i + f <= 32):
            raise fail(f"invalid act_bits {list(self.act_bits)}")
        if max(abs(self.shift_lo), abs(self.shift_hi)) > _SHIFT_LIMIT or self.shift_hi < self.shift_lo:
            raise fail(f"invalid shift range [{self.shift_lo}, {self.shift_hi}]")
        if self.config is not None:
            config_from_dict(self.config)  # ValueError on nonsense
        if self.kind == "linear":
            return
        # Groups divide the weight's first dimension, which bounds the bias size by the weight's.
        if self.groups < 1 or w[0] % self.groups:
            raise fail(f"groups={self.groups} must be positive and divide {w[0]}")
        if self.padding_mode not in PADDING_MODES:
            raise fail(f"unknown padding_mode {self.padding_mode!r}")
        for name in ("stride", "dilation", "output_padding"):
            if len(getattr(self, name)) != dims:
                raise fail(f"{name} needs {dims} values")
        if min(self.stride + self.dilation) < 1:
            raise fail("stride and dilation must be positive")
        if min(self.output_padding) < 0:
            raise fail("output_padding must be >= 0")
        if any(op >= max(st, dl) for op, st, dl in zip(self.output_padding, self.stride, self.dilation,
                                                        strict=True)):
            raise fail("output_padding must be smaller than stride or dilation")
        if not self.transposed and any(self.output_padding):
            raise fail("output_padding is only for transposed convolutions")
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid") or self.transposed:
                raise fail(f"padding={self.padding!r} is not supported here")
        elif len(self.padding) != dims or min(self.padding) < 0:
            raise fail(f"padding needs {dims} values >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists for tuples; no convolution fields for a linear layer)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if self.kind == "linear" and f.name in _CONV_FIELDS:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """Compact JSON (sorted keys): what the frozen ops take as their ``spec`` argument."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> FrozenSpec:
        """The spec of :meth:`to_json`'s text; parsed once per distinct text (the ops see the same
        few texts on every call)."""
        return _from_json(text)

    @property
    def pad_outside(self) -> bool:
        """Whether the input is padded before the integer op (padding modes other than zeros,
        ``"same"``/``"valid"``); otherwise the op pads with zeros itself."""
        return self.kind == "conv" and (self.padding_mode != "zeros" or isinstance(self.padding, str))

    @classmethod
    def from_dict(cls, data: Any) -> FrozenSpec:
        """The spec a JSON object describes; ValueError naming the first bad field (types included:
        a file's ``true`` is no int, ``1.0`` no int, ``"3"`` no list)."""
        if not isinstance(data, dict):
            raise ValueError("frozen layer spec: not an object")
        kind = data.get("kind")
        if kind not in KINDS:
            raise ValueError(f"frozen layer spec: unknown kind {kind!r}")
        names = [f.name for f in fields(cls) if kind == "conv" or f.name not in _CONV_FIELDS]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"frozen layer spec: unknown fields {unknown}")
        optional = {"config"} | set(_CONV_FIELDS)
        missing = [n for n in names if n not in data and n not in optional]
        if missing:
            raise ValueError(f"frozen layer spec: missing {missing}")

        def ints(name: str, value: Any, length: int | None = None) -> tuple[int, ...]:
            if (not isinstance(value, list) or not all(type(v) is int for v in value)
                    or (length is not None and len(value) != length)):
                raise ValueError(f"frozen layer spec: {name} must be a list of ints, got {value!r}")
            return tuple(value)

        kwargs: dict[str, Any] = {}
        for name in names:
            if name not in data:
                continue
            value = data[name]
            if name in ("weight_shape", "stride", "dilation", "output_padding"):
                value = ints(name, value)
            elif name == "act_bits":
                value = ints(name, value, 2)
            elif name == "padding":
                value = value if isinstance(value, str) else ints(name, value)
            elif name in ("weight_bits", "shift_lo", "shift_hi", "groups"):
                if type(value) is not int:
                    raise ValueError(f"frozen layer spec: {name} must be an int, got {value!r}")
            elif name in ("has_zero", "bias", "transposed"):
                if type(value) is not bool:
                    raise ValueError(f"frozen layer spec: {name} must be true or false, got {value!r}")
            elif name == "config":
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"frozen layer spec: config must be an object, got {value!r}")
            elif type(value) is not str:
                raise ValueError(f"frozen layer spec: {name} must be a string, got {value!r}")
            kwargs[name] = value
        return cls(**kwargs)


@functools.lru_cache(maxsize=4096)
def _from_json(text: str) -> FrozenSpec:
    return FrozenSpec.from_dict(json.loads(text))
