"""Validated configurations for the two DeepShift training methods.

A config says how one shift layer rounds its weights (and, optionally, its inputs and bias).
Configs are immutable dataclasses; ``to_dict`` / ``from_dict`` give a JSON-safe form that is
stored beside every checkpoint and packed file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

ROUNDINGS = ("deterministic", "stochastic")
ACT_ROUNDINGS = ("nearest", "floor")
MIN_BITS, MAX_BITS = 2, 8
MAX_SHIFT_LIMIT = 16  # |max_shift| bound: keeps every weight a normal-or-subnormal float32 power of 2
MAX_ACT_TOTAL_BITS = 32  # I + F; activations are held as int32 fixed point at most
AUTO = "auto"  # max_shift placed per layer from its weights (see deepshift.convert_)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range; allowed values are {lo}..{hi}")


def _normalise_act_bits(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        int_bits, frac_bits = value
    except (TypeError, ValueError):
        raise ValueError(
            f"act_bits must be None or a pair (I, F) of integer and fraction bits, got {value!r}"
        ) from None
    _check_int("act_bits[0] (integer bits I, sign included)", int_bits, 1, MAX_ACT_TOTAL_BITS)
    _check_int("act_bits[1] (fraction bits F)", frac_bits, 0, MAX_ACT_TOTAL_BITS - 1)
    if int_bits + frac_bits > MAX_ACT_TOTAL_BITS:
        raise ValueError(
            f"act_bits={value!r}: I + F = {int_bits + frac_bits} exceeds {MAX_ACT_TOTAL_BITS} bits"
        )
    return (int(int_bits), int(frac_bits))


@dataclass(frozen=True)
class _ShiftConfig:
    weight_bits: int = 5
    rounding: str = "deterministic"
    act_bits: tuple[int, int] | None = None
    max_shift: int | str = 0
    act_rounding: str = "nearest"

    method: ClassVar[str] = ""
    # Number of codes a weight spends on things other than shift values (Q: none; PS: zero).
    _reserved_codes: ClassVar[int] = 0

    def __post_init__(self) -> None:
        _check_int("weight_bits", self.weight_bits, MIN_BITS, MAX_BITS)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("act_rounding", self.act_rounding, ACT_ROUNDINGS)
        if self.max_shift != AUTO:
            if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, int):
                raise ValueError(f"max_shift must be 'auto' or an int in [{-MAX_SHIFT_LIMIT}, "
                                 f"{MAX_SHIFT_LIMIT}], got {self.max_shift!r}")
            _check_int("max_shift", self.max_shift, -MAX_SHIFT_LIMIT, MAX_SHIFT_LIMIT)
        object.__setattr__(self, "act_bits", _normalise_act_bits(self.act_bits))

    @property
    def num_shifts(self) -> int:
        """How many distinct shift values a weight can take (one sign bit, b-1 shift bits)."""
        return 2 ** (self.weight_bits - 1) - self._reserved_codes

    @property
    def auto_range(self) -> bool:
        """True when each layer places its own window of shifts (``max_shift="auto"``)."""
        return self.max_shift == AUTO

    def range_below(self, max_shift: int) -> tuple[int, int]:
        """The inclusive ``(p_min, p_max)`` window of this bit width that ends at ``max_shift``."""
        return (max_shift - self.num_shifts + 1, max_shift)

    @property
    def shift_range(self) -> tuple[int, int]:
        """Inclusive ``(p_min, p_max)`` of the integer shift ``p`` in ``w = s * 2**p``.

        With ``max_shift="auto"`` the window is a property of each layer, not of the config:
        ask the layer (:func:`deepshift.layer_shift_range`).
        """
        if self.auto_range:
            raise ValueError("max_shift='auto' places the window of shifts per layer: use "
                             "deepshift.layer_shift_range(module) for a converted layer's range")
        return self.range_below(self.max_shift)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, including ``"method"`` so :func:`config_from_dict` can rebuild it."""
        d = asdict(self)
        d["act_bits"] = list(self.act_bits) if self.act_bits is not None else None
        d["method"] = self.method
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _ShiftConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__}.from_dict got method={method!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**data)


@dataclass(frozen=True)
class QConfig(_ShiftConfig):
    """DeepShift-Q: float weights rounded to a signed power of two in every forward pass.

    Args:
        weight_bits: bits per weight, 2..8: one sign bit plus ``weight_bits - 1`` shift bits,
            so shifts take ``2**(weight_bits-1)`` values ending at ``max_shift``
            (5 bits: ``p`` in [-15, 0]). Q weights are never zero.
        rounding: ``"deterministic"`` (round half to even in the log domain) or
            ``"stochastic"`` (``floor(x) + Bernoulli(x - floor(x))``; training mode only).
        act_bits: ``None`` (float inputs) or ``(I, F)``: inputs and bias are rounded to signed
            fixed point with ``I`` integer bits (sign included) and ``F`` fraction bits.
        max_shift: the largest shift ``p_max``; 0 is the paper (``|w| <= 1``), positive values
            allow left shifts. ``"auto"`` places each layer's window where it rounds that layer's
            weights with the least squared error (chosen when the layer is converted, stored in
            its state_dict as ``parametrizations.weight.0.max_shift``).
        act_rounding: ``"nearest"`` (half to even, unbiased; default) or ``"floor"`` (the
            original code's choice).

    Example:
        >>> cfg = QConfig(weight_bits=4)
        >>> cfg.shift_range
        (-7, 0)
    """

    method: ClassVar[str] = "q"
    _reserved_codes: ClassVar[int] = 0


@dataclass(frozen=True)
class PSConfig(_ShiftConfig):
    """DeepShift-PS: trainable ``shift`` and ``sign`` parameters; ``W = sign * 2**shift``.

    The sign is ternary (-1, 0, +1); one code of the ``weight_bits`` is reserved for zero, so
    shifts take ``2**(weight_bits-1) - 1`` values (5 bits: ``p`` in [-14, 0]; 2 bits:
    weights in {-1, 0, +1}). Other arguments as :class:`QConfig`, plus:

    Args:
        freeze_sign: keep the sign parameters fixed (``requires_grad=False``).

    Example:
        >>> PSConfig(weight_bits=5).shift_range
        (-14, 0)
    """

    freeze_sign: bool = False

    method: ClassVar[str] = "ps"
    _reserved_codes: ClassVar[int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.freeze_sign, bool):
            raise ValueError(f"freeze_sign must be True or False, got {self.freeze_sign!r}")


_BY_METHOD: dict[str, type[_ShiftConfig]] = {"q": QConfig, "ps": PSConfig}


def config_from_dict(data: dict[str, Any]) -> QConfig | PSConfig:
    """Rebuild a :class:`QConfig` or :class:`PSConfig` from its ``to_dict()`` form."""
    if not isinstance(data, dict):
        raise ValueError(f"a shift config must be a dict, got {type(data).__name__}")
    method = data.get("method")
    if method not in _BY_METHOD:
        raise ValueError(f"config method={method!r} is not allowed; choose one of q, ps")
    return _BY_METHOD[method].from_dict(data)  # type: ignore[return-value]
