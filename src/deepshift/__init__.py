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

# The ops first: every layer below calls torch.ops.deepshift.*; then the backends' kernels.
import deepshift.ops.schemas  # noqa: F401,I001  declares every deepshift::* op
import deepshift.backends.cpu.register  # noqa: F401  the C++ CPU kernels (built on first use)
from deepshift.backends.triton.register import register_cuda_kernels as _register_cuda_kernels
from deepshift._version import __version__
from deepshift.core.batchnorm import finetune_batchnorm_
from deepshift.core.calibrate import calibrate_
from deepshift.core.config import PSConfig, QConfig, config_from_dict
from deepshift.core.convert import (
    convert_,
    effective_weight,
    float_weights,
    is_shift_layer,
    layer_shift_range,
    matmul_weight_names,
    shift_and_sign,
    shift_config,
    shift_layers,
    shift_parameters,
    shift_tensors,
)
from deepshift.core.optim import clamp_parameters_, param_groups
from deepshift.core.quantize import fixed_point
from deepshift.formats.onnx import export_onnx
from deepshift.formats.packed import PackedFormatError, load_packed, save_packed
from deepshift.frozen.attention import ShiftMultiheadAttention
from deepshift.frozen.float_layers import ExactGlobalAvgPool, FrozenBatchNorm
from deepshift.frozen.freeze import DEFAULT_ACT_BITS, freeze_
from deepshift.frozen.fuse import ChannelsLastMaxPool2d, ShiftConvBatchNorm, fuse_frozen
from deepshift.frozen.integer import integer_only
from deepshift.frozen.layers import ShiftConvNd, ShiftLinear, is_frozen_layer
from deepshift.models import build_model
from deepshift.ops.codes import pack_codes, unpack_codes
from deepshift.core.summary import summary
from deepshift.report import compression_report, plot_shift_histograms, savings_report

_register_cuda_kernels()  # no-op without CUDA, triton or with DEEPSHIFT_NO_NATIVE=1


def __getattr__(name: str):
    # The training application (deepshift.training) is imported on first use only, so that
    # `import deepshift` loads no data, distributed or training-loop code.
    if name == "TrainConfig":
        from deepshift.training.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'deepshift' has no attribute {name!r}")


__all__ = [
    "__version__",
    "DEFAULT_ACT_BITS",
    "ExactGlobalAvgPool",
    "FrozenBatchNorm",
    "PSConfig",
    "PackedFormatError",
    "QConfig",
    "ShiftConvBatchNorm",
    "ChannelsLastMaxPool2d",
    "ShiftConvNd",
    "ShiftLinear",
    "ShiftMultiheadAttention",
    "TrainConfig",
    "clamp_parameters_",
    "compression_report",
    "config_from_dict",
    "build_model",
    "calibrate_",
    "convert_",
    "effective_weight",
    "float_weights",
    "export_onnx",
    "finetune_batchnorm_",
    "fixed_point",
    "freeze_",
    "fuse_frozen",
    "integer_only",
    "is_frozen_layer",
    "is_shift_layer",
    "layer_shift_range",
    "load_packed",
    "matmul_weight_names",
    "pack_codes",
    "param_groups",
    "plot_shift_histograms",
    "save_packed",
    "savings_report",
    "shift_and_sign",
    "shift_config",
    "shift_layers",
    "shift_parameters",
    "shift_tensors",
    "summary",
    "unpack_codes",
]
