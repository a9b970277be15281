"""torch.nn.utils.parametrize classes that turn any module's ``weight`` into shift weights.

One class per *method* (not per layer type): Linear, every convolution and user subclasses keep
their own ``forward``; only the tensor they read as ``weight`` (and ``bias``) changes.
The parametrization objects are submodules, so ``model.eval()`` switches them to deterministic
rounding, and they never modify a parameter in forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepshift.core.config import PSConfig, QConfig
from deepshift.core.quantize import fixed_point, ps_from_weight, ps_weight, q_weight


class _EvalCache(nn.Module):
    """Reuses the rounded tensor across inference passes while its inputs are unchanged.

    Only in eval mode with gradients off and outside torch.compile: there the result is a pure
    function of the parameters, so it is keyed on their storage, version counter (bumped by
    every in-place update: optimizer steps, load_state_dict), dtype and shape. Nothing is
    stored in the state_dict and no parameter is touched.
    """

    def __init__(self):
        super().__init__()
        self._cache_key: tuple | None = None
        self._cache_value: Tensor | None = None

    def _cached(self, compute, *tensors: Tensor) -> Tensor:
        # Inference tensors (made under torch.inference_mode) have no version counter: an in-place
        # change could not be seen, so they are never cached.
        if (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or any(t.is_inference() for t in tensors)):
            return compute()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)
        if key != self._cache_key or self._cache_value is None:
            self._cache_value, self._cache_key = compute(), key
        return self._cache_value

    def train(self, mode: bool = True):
        if mode:  # drop the copy when training starts; repeated eval() calls keep it (it is keyed)
            self._cache_key = self._cache_value = None
        return super().train(mode)


class _ShiftWeight(_EvalCache):
    """What ShiftQ and ShiftPS share: the config and the layer's window of shifts.

    A fixed ``max_shift`` gives every layer the config's window. With ``max_shift="auto"`` the
    window's top is a per-layer int64 buffer ``max_shift`` (set by :func:`deepshift.convert_`
    before the weights are converted, saved in the state_dict); a Python copy of it is kept so
    that forward passes read no tensor (no device sync, nothing for torch.compile to trace).
    """

    def __init__(self, config: QConfig | PSConfig):
        super().__init__()
        self.config = config
        if config.auto_range:
            self.register_buffer("max_shift", torch.zeros((), dtype=torch.int64))
            self._max_shift = 0

    @property
    def shift_range(self) -> tuple[int, int]:
        """Inclusive ``(p_min, p_max)`` of this layer's shifts."""
        if self.config.auto_range:
            return self.config.range_below(self._max_shift)
        return self.config.shift_range

    def set_max_shift_(self, max_shift: int) -> None:
        """Place an ``"auto"`` layer's window so that it ends at ``max_shift`` (in place)."""
        if not self.config.auto_range:
            raise ValueError("only layers converted with max_shift='auto' place their own window")
        with torch.no_grad():
            self.max_shift.fill_(int(max_shift))
        self._max_shift = int(max_shift)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.config.auto_range:
            self._max_shift = int(self.max_shift)

    def _range_key(self) -> tuple[Tensor, ...]:
        # The buffer joins the eval cache's key: its version moves when a window is re-placed.
        return (self.max_shift,) if self.config.auto_range else ()

    def extra_repr(self) -> str:
        return _describe(self.config, self.shift_range)


class ShiftQ(_ShiftWeight):
    """DeepShift-Q: the stored parameter is the float weight; forward rounds it to ``s * 2**p``.

    Registered on ``weight``, the float tensor stays at ``parametrizations.weight.original``.
    """

    def __init__(self, config: QConfig):
        if not isinstance(config, QConfig):
            raise TypeError(f"ShiftQ needs a QConfig, got {type(config).__name__}")
        super().__init__(config)

    def forward(self, weight: Tensor) -> Tensor:
        stochastic = self.training and self.config.rounding == "stochastic"
        shift_range = self.shift_range
        return self._cached(lambda: q_weight(weight, shift_range, stochastic), weight, *self._range_key())


class ShiftPS(_ShiftWeight):
    """DeepShift-PS: two stored parameters, ``shift`` and ``sign``; forward gives ``s * 2**p``.

    Registered on ``weight``, they live at ``parametrizations.weight.original0`` (shift) and
    ``parametrizations.weight.original1`` (sign). ``right_inverse`` converts float weights,
    which is how a pretrained model is converted.
    """

    def __init__(self, config: PSConfig):
        if not isinstance(config, PSConfig):
            raise TypeError(f"ShiftPS needs a PSConfig, got {type(config).__name__}")
        super().__init__(config)

    def forward(self, shift: Tensor, sign: Tensor) -> Tensor:
        stochastic = self.training and self.config.rounding == "stochastic"
        shift_range = self.shift_range
        return self._cached(lambda: ps_weight(shift, sign, shift_range, stochastic),
                            shift, sign, *self._range_key())

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return ps_from_weight(weight, self.shift_range)


class FixedPointBias(_EvalCache):
    """Rounds a shift layer's bias to the same fixed point as its inputs (one rule for every layer)."""

    def __init__(self, config: QConfig | PSConfig):
        super().__init__()
        self.config = config

    def forward(self, bias: Tensor) -> Tensor:
        return self._cached(lambda: fixed_point(bias, self.config.act_bits, self.config.act_rounding), bias)


class FixedPointInput:
    """Forward pre-hook rounding a shift layer's input to fixed point ``act_bits``."""

    def __init__(self, config: QConfig | PSConfig):
        self.config = config

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = fixed_point(args[0], self.config.act_bits, self.config.act_rounding)
        return (x, *args[1:])


def _describe(config: QConfig | PSConfig, shift_range: tuple[int, int]) -> str:
    lo, hi = shift_range
    text = f"method={config.method}, weight_bits={config.weight_bits}, shifts=[{lo}, {hi}]"
    if config.auto_range:
        text += " (auto)"
    if config.rounding != "deterministic":
        text += f", rounding={config.rounding}"
    if config.act_bits is not None:
        text += f", act_bits={config.act_bits}"
    return text
