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
    layer_shift_range,
    shift_and_sign,
    shift_config,
    shift_layers,
    shift_parameters,
)
from .export import PackedFormatError, compression_report, load_packed, save_packed
from .freeze import DEFAULT_ACT_BITS, freeze_
from .frozen_float import ExactGlobalAvgPool, FrozenBatchNorm
from .fuse import ShiftConvBatchNorm, fuse_frozen
from .kernels import cpu as _native_cpu  # noqa: F401  registers the C++ CPU kernels (built lazily)
from .kernels import triton_ops as _triton_ops  # Triton CUDA kernels (triton imported on first use)
from .modules import ShiftConvNd, ShiftLinear, is_frozen_layer
from .onnx_export import export_onnx
from .optim import clamp_parameters_, param_groups
from .packing import pack_codes, unpack_codes
from .quantize import fixed_point
from .report import plot_shift_histograms, savings_report
from .summary import summary

__version__ = "0.1.0"

# Training config and the model zoo (after __version__: run folders record it). The training
# functions stay in their module (`from deepshift.train import train, evaluate`): a function
# named `train` here would shadow the submodule `deepshift.train`.
from .models import build_model  # noqa: E402
from .train import TrainConfig  # noqa: E402

_triton_ops.register_cuda_kernels()  # no-op without CUDA, triton or with DEEPSHIFT_NO_NATIVE=1

__all__ = [
    "DEFAULT_ACT_BITS",
    "ExactGlobalAvgPool",
    "FrozenBatchNorm",
    "PSConfig",
    "PackedFormatError",
    "QConfig",
    "ShiftConvBatchNorm",
    "ShiftConvNd",
    "ShiftLinear",
    "TrainConfig",
    "clamp_parameters_",
    "compression_report",
    "config_from_dict",
    "build_model",
    "convert_",
    "effective_weight",
    "export_onnx",
    "fixed_point",
    "freeze_",
    "fuse_frozen",
    "is_frozen_layer",
    "is_shift_layer",
    "layer_shift_range",
    "load_packed",
    "pack_codes",
    "param_groups",
    "plot_shift_histograms",
    "save_packed",
    "savings_report",
    "shift_and_sign",
    "shift_config",
    "shift_layers",
    "shift_parameters",
    "summary",
    "unpack_codes",
]
