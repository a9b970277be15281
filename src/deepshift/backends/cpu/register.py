"""Registers the CPU kernels as the ``deepshift::*`` ops' CPU implementations.

Most ops get their Python kernel at import (which builds or loads the extension on first use). The
frozen and integer-only models' ops (``NATIVE_KERNELS``) get a C++ kernel once the extension is
loaded (by the first call of any deepshift op on the CPU; until then the ops' reference runs, whose
smaller ops load it): at batch 1 a Python kernel's dispatch would cost as much as a small layer.
The C++ kernel of ``frozen_conv`` / ``frozen_linear`` / ``int_conv`` runs the prepared call it finds
and hands every other call to the Python kernel named here, which prepares one or takes the
reference; those of ``channel_affine`` / ``int_epilogue`` run every call the native pass takes and
hand the rest to the reference.
"""

from __future__ import annotations

from deepshift.backends.cpu.build import on_load
from deepshift.backends.cpu.conv import frozen_conv_cpu, int_conv_cpu, shift_conv_cpu
from deepshift.backends.cpu.elementwise import (
    fake_quantize_cpu,
    ps_round_cpu,
    q_round_cpu,
    quantize_input_cpu,
    scale_output_cpu,
)
from deepshift.backends.cpu.linear import frozen_linear_cpu, shift_linear_cpu
from deepshift.ops import reference as ref
from deepshift.ops.schemas import register_backend

KERNELS = {
    "shift_linear": shift_linear_cpu,
    "shift_conv": shift_conv_cpu,
    "quantize_input": quantize_input_cpu,
    "scale_output": scale_output_cpu,
    "fake_quantize": fake_quantize_cpu,
    "q_round": q_round_cpu,
    "ps_round": ps_round_cpu,
}

for _name, _kernel in KERNELS.items():
    register_backend(_name, "CPU", _kernel)

# op -> what its C++ kernel hands the calls it does not take to: the Python kernel of the ops with
# prepared calls, the reference of the element-wise ones (every native case is the C++ kernel's).
NATIVE_KERNELS = {"frozen_conv": frozen_conv_cpu, "frozen_linear": frozen_linear_cpu,
                  "int_conv": int_conv_cpu, "channel_affine": ref.channel_affine_reference,
                  "int_epilogue": ref.int_epilogue_reference}

on_load(lambda ext: ext.register_kernels(NATIVE_KERNELS))
