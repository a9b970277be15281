"""The library's core: shift configs, the rounding math, the weight parametrizations, model
conversion (``convert_``) and the optimizer helpers. Nothing here imports training code."""
