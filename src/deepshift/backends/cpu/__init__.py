"""The C++ CPU kernels (``csrc/``; portable and AVX2 paths chosen at run time, OpenMP): ``build``
compiles and loads them, ``cache`` keeps what they derive from weights, ``linear``, ``conv`` and
``elementwise`` are the op kernels, ``register`` registers them."""
