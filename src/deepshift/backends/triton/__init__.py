"""The Triton (CUDA) kernels of ``deepshift::shift_linear`` / ``shift_conv``: ``kernels`` holds
them (triton imported on first use), ``register`` launches and registers them."""
