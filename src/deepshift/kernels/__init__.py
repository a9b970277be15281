"""Native kernels for the shift ops, registered only when they load.

``deepshift.kernels.cpu``: C++ (portable + AVX2, OpenMP) CPU kernels of ``deepshift::shift_linear``
and ``deepshift::shift_conv``, built lazily on first use; see that module.
"""

from . import cpu

__all__ = ["cpu"]
