"""The C++ CPU kernels (``csrc/``; portable, AVX2 and AVX-512 paths chosen at run time, OpenMP):
``build`` compiles and loads them (and forces a path: ``set_isa``), ``cache`` keeps what they derive
from weights, ``linear``, ``conv`` and ``elementwise`` are the op kernels, ``register`` registers
them, ``machine`` names the CPU and the path for benchmark headers."""
