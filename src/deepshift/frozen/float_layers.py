"""The float layers of a frozen model, in forms every runtime rounds identically.

Between shift layers a frozen network still has a few float operations (BatchNorm, global
average pooling). Their float32 results depend on how a runtime evaluates them: torch's
BatchNorm kernel uses fused multiply-adds, onnxruntime's does not; pooling sums in whatever
order the kernel likes. A last-bit difference is harmless by itself, but the next shift layer
rounds its input to fixed point, and a value sitting on a rounding boundary then moves by a whole
step ``2**-F``. :func:`deepshift.freeze_` therefore replaces

* eval-mode ``BatchNorm1d/2d/3d`` by :class:`FrozenBatchNorm`: ``x * scale + shift`` as two
  separately rounded float operations (a multiply, then an add: IEEE-exact in any runtime),
  with ``scale`` and ``shift`` computed once in float64 from the running statistics;
* ``AdaptiveAvgPool1d/2d/3d`` with output size 1 by :class:`ExactGlobalAvgPool`: the sum in
  float64 (exact for all but extreme spreads of magnitude, so independent of order), divided
  by the count, rounded once.

The ONNX export writes exactly these operations, so onnxruntime reproduces the frozen model bit
for bit. State-dict keys are unchanged (a packed file holds the BatchNorm statistics as saved).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepshift.core.replace import replace_modules

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


class FrozenBatchNorm(nn.Module):
    """Eval-mode BatchNorm as ``x * scale + shift`` (multiply, then add; never fused).

    Holds the same state as the BatchNorm it replaces (``weight`` and ``bias`` when affine,
    ``running_mean``, ``running_var``, ``num_batches_tracked``, all buffers), so state dicts are
    interchangeable. ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` are
    computed in float64 and rounded once to the input's dtype. Train mode changes nothing: a
    frozen model has no statistics to update.
    """

    def __init__(self, num_features: int, eps: float, affine: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, float(eps)
        # BatchNorm(affine=False) has no weight and bias: keep the state-dict keys alike.
        for name in ("weight", "bias"):
            self.register_buffer(name, torch.ones(num_features) if affine else None)
        for name in ("running_mean", "running_var"):
            self.register_buffer(name, torch.zeros(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._affine_cache: dict = {}

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{type(bn).__name__} without running statistics cannot be frozen")
        frozen = cls(bn.num_features, bn.eps, bn.affine)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.num_batches_tracked is not None:
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen.to(bn.running_mean.device)

    def affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` in ``dtype``, each computed in float64 and rounded once; shape (C,).

        Cached per dtype while the statistics are unchanged (keyed on the buffers' storage and
        version counters, which every in-place write such as ``load_state_dict`` bumps).
        """
        # The key is built from the buffer dict directly, without loops: at batch 1 this runs once
        # per layer per image, and attribute lookups through nn.Module cost microseconds each.
        b = self._buffers
        m, v, w, h = b["running_mean"], b["running_var"], b["weight"], b["bias"]
        try:
            key = (m.device, m.data_ptr(), m._version, v.data_ptr(), v._version,
                   None if w is None else (w.data_ptr(), w._version),
                   None if h is None else (h.data_ptr(), h._version))
        except RuntimeError:  # inference tensors have no version counter: compute every time
            key = None
        hit = self._affine_cache.get(dtype)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        result = self._compute_affine(dtype)
        if key is not None and not torch.compiler.is_compiling():
            if hit is None and len(self._affine_cache) >= 4:
                self._affine_cache.clear()
            self._affine_cache[dtype] = (key, result)
        return result

    def _compute_affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        scale = 1.0 / torch.sqrt(self.running_var.double() + self.eps)
        if self.weight is not None:
            scale = self.weight.double() * scale
        shift = -self.running_mean.double() * scale
        if self.bias is not None:
            shift = self.bias.double() + shift
        return scale.to(dtype), shift.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm expects (N, {self.num_features}, ...) input, got "
                             f"{tuple(x.shape)}")
        scale, shift = self.affine(x.dtype)
        # Two separately rounded operations (the op's definition): a fused multiply-add would round
        # once, and runtimes disagree on whether they fuse. One native pass on the CPU.
        return torch.ops.deepshift.channel_affine(x, scale, shift)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ExactGlobalAvgPool(nn.Module):
    """Global average pooling summed in float64 and rounded once (output size 1, shape kept)."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        axes = tuple(range(x.dim() - self.dims, x.dim()))
        count = 1
        for a in axes:
            count *= x.shape[a]
        return (x.double().sum(dim=axes, keepdim=True) / count).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def _is_global(pool: nn.Module) -> bool:
    size = pool.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


def freeze_float_layers_(model: nn.Module) -> nn.Module:
    """Replace BatchNorm and global average pooling modules of ``model`` in place (see module doc).

    Returns the model (or the replacement, when ``model`` itself is such a layer). Functional
    calls (``F.batch_norm``, ``F.adaptive_avg_pool2d`` in a ``forward``) cannot be reached; the
    model zoo uses modules.
    """
    def replacement(module: nn.Module) -> nn.Module | None:
        if type(module) in _BATCHNORMS:  # exactly these: subclasses may compute something else
            if module.running_mean is None:
                return None  # batch statistics even in eval mode: nothing fixed to freeze
            return FrozenBatchNorm.from_batchnorm(module)
        if type(module) in _ADAPTIVE_AVG and _is_global(module):
            return ExactGlobalAvgPool(_ADAPTIVE_AVG.index(type(module)) + 1)
        return None

    def in_same_mode(module: nn.Module) -> nn.Module | None:
        new = replacement(module)
        return None if new is None else new.train(module.training)

    return replace_modules(model, in_same_mode)
