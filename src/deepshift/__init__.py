"""deepshift: multiplication-less neural networks (DeepShift-Q and DeepShift-PS) for PyTorch.

Convert any model's linear and convolution layers so that every weight is a signed power of two
``s * 2**p``; each multiply-accumulate then becomes a shift, a sign flip and an add.

Example:
    >>> import torch, deepshift
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(8 * 6 * 6, 10))
    >>> _ = deepshift.convert_(model, deepshift.PSConfig(weight_bits=5))
    >>> opt = torch.optim.RAdam(deepshift.param_groups(model, lr=0.01))
    >>> loss = model(torch.randn(4, 1, 8, 8)).square().mean()
    >>> loss.backward(); opt.step(); _ = deepshift.clamp_parameters_(model)
    >>> w = deepshift.effective_weight(model[0])   # exactly sign * 2**shift
    >>> bool((w[w != 0].abs().log2() % 1 == 0).all())
    True
"""

from .config import PSConfig, QConfig, config_from_dict
from .convert import (
    convert_,
    effective_weight,
    is_shift_layer,
    shift_and_sign,
    shift_config,
    shift_layers,
    shift_parameters,
)
from .optim import clamp_parameters_, param_groups
from .quantize import fixed_point
from .summary import summary

__version__ = "0.1.0"

__all__ = [
    "PSConfig",
    "QConfig",
    "clamp_parameters_",
    "config_from_dict",
    "convert_",
    "effective_weight",
    "fixed_point",
    "is_shift_layer",
    "param_groups",
    "shift_and_sign",
    "shift_config",
    "shift_layers",
    "shift_parameters",
    "summary",
]
