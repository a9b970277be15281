"""Registers the CPU kernels as the ``deepshift::*`` ops' CPU implementations (at import)."""

from __future__ import annotations

from deepshift.backends.cpu.conv import frozen_conv_cpu, shift_conv_cpu
from deepshift.backends.cpu.elementwise import (
    channel_affine_cpu,
    fake_quantize_cpu,
    int_epilogue_cpu,
    ps_round_cpu,
    q_round_cpu,
    quantize_input_cpu,
    scale_output_cpu,
)
from deepshift.backends.cpu.linear import frozen_linear_cpu, shift_linear_cpu
from deepshift.ops.schemas import register_backend

KERNELS = {
    "shift_linear": shift_linear_cpu,
    "shift_conv": shift_conv_cpu,
    "frozen_linear": frozen_linear_cpu,
    "frozen_conv": frozen_conv_cpu,
    "quantize_input": quantize_input_cpu,
    "scale_output": scale_output_cpu,
    "channel_affine": channel_affine_cpu,
    "int_epilogue": int_epilogue_cpu,
    "fake_quantize": fake_quantize_cpu,
    "q_round": q_round_cpu,
    "ps_round": ps_round_cpu,
}

for _name, _kernel in KERNELS.items():
    register_backend(_name, "CPU", _kernel)
