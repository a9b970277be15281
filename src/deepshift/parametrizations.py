"""torch.nn.utils.parametrize classes that turn any module's ``weight`` into shift weights.

One class per *method* (not per layer type): Linear, every convolution and user subclasses keep
their own ``forward``; only the tensor they read as ``weight`` (and ``bias``) changes.
The parametrization objects are submodules, so ``model.eval()`` switches them to deterministic
rounding, and they never modify a parameter in forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import PSConfig, QConfig
from .quantize import fixed_point, ps_from_weight, ps_weight, q_weight


class ShiftQ(nn.Module):
    """DeepShift-Q: the stored parameter is the float weight; forward rounds it to ``s * 2**p``.

    Registered on ``weight``, the float tensor stays at ``parametrizations.weight.original``.
    """

    def __init__(self, config: QConfig):
        super().__init__()
        if not isinstance(config, QConfig):
            raise TypeError(f"ShiftQ needs a QConfig, got {type(config).__name__}")
        self.config = config

    def forward(self, weight: Tensor) -> Tensor:
        stochastic = self.training and self.config.rounding == "stochastic"
        return q_weight(weight, self.config.shift_range, stochastic)

    def extra_repr(self) -> str:
        return _describe(self.config)


class ShiftPS(nn.Module):
    """DeepShift-PS: two stored parameters, ``shift`` and ``sign``; forward gives ``s * 2**p``.

    Registered on ``weight``, they live at ``parametrizations.weight.original0`` (shift) and
    ``parametrizations.weight.original1`` (sign). ``right_inverse`` converts float weights,
    which is how a pretrained model is converted.
    """

    def __init__(self, config: PSConfig):
        super().__init__()
        if not isinstance(config, PSConfig):
            raise TypeError(f"ShiftPS needs a PSConfig, got {type(config).__name__}")
        self.config = config

    def forward(self, shift: Tensor, sign: Tensor) -> Tensor:
        stochastic = self.training and self.config.rounding == "stochastic"
        return ps_weight(shift, sign, self.config.shift_range, stochastic)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return ps_from_weight(weight, self.config.shift_range)

    def extra_repr(self) -> str:
        return _describe(self.config)


class FixedPointBias(nn.Module):
    """Rounds a shift layer's bias to the same fixed point as its inputs (one rule for every layer)."""

    def __init__(self, config: QConfig | PSConfig):
        super().__init__()
        self.config = config

    def forward(self, bias: Tensor) -> Tensor:
        return fixed_point(bias, self.config.act_bits, self.config.act_rounding)


class FixedPointInput:
    """Forward pre-hook rounding a shift layer's input to fixed point ``act_bits``."""

    def __init__(self, config: QConfig | PSConfig):
        self.config = config

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = fixed_point(args[0], self.config.act_bits, self.config.act_rounding)
        return (x, *args[1:])


def _describe(config: QConfig | PSConfig) -> str:
    lo, hi = config.shift_range
    text = f"method={config.method}, weight_bits={config.weight_bits}, shifts=[{lo}, {hi}]"
    if config.rounding != "deterministic":
        text += f", rounding={config.rounding}"
    if config.act_bits is not None:
        text += f", act_bits={config.act_bits}"
    return text
