"""Native implementations of the ``deepshift::*`` ops, registered for their device: ``cpu`` (C++,
built on first use) and ``triton`` (CUDA). Each returns its op's reference result bit for bit."""
