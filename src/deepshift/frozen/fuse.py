"""What follows a frozen convolution (BatchNorm, a residual add, ReLU), fused into it for deployment.

A shift convolution's weights must stay signed powers of two, so a following BatchNorm cannot be
folded into them as it is for float models. It can still be applied while the convolution's
output is in cache, together with a residual add and a ReLU after it: :class:`ShiftConvBatchNorm`
does that in the same native call as the convolution, saving up to three passes over the
activations, with the same numbers as the separate operations. :func:`fuse_frozen` finds these
chains in a frozen model with :mod:`torch.fx` and returns a copy that uses them.
"""

from __future__ import annotations

import collections
import copy
import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from deepshift.core.replace import replace_modules
from deepshift.frozen.float_layers import ExactGlobalAvgPool, FrozenBatchNorm
from deepshift.frozen.layers import ShiftConvNd, is_frozen_layer


class ShiftConvBatchNorm(nn.Sequential):
    """A frozen :class:`~deepshift.ShiftConvNd` followed by the :class:`~deepshift.FrozenBatchNorm`
    of its output channels, then optionally a residual add and ReLU:
    ``relu(self[1](self[0](x)) + residual)``. One native call where the fused CPU kernel applies
    (eager mode, float32/float64 CPU input, a residual of the output's shape and dtype, no hooks
    on either child), else the separate torch operations; the results are equal (``torch.equal``)
    either way. Both children keep their state-dict entries (under ``0.`` and ``1.``).

    Example:
        >>> import torch, deepshift
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> _ = deepshift.convert_(net, deepshift.PSConfig(weight_bits=5))
        >>> net = deepshift.freeze_(net)
        >>> fused = deepshift.ShiftConvBatchNorm(net[0], net[1], relu=True)
        >>> x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 6, 6)
        >>> torch.equal(fused(x, r), torch.relu(net(x) + r))
        True
    """

    def __init__(self, conv: ShiftConvNd, bn: FrozenBatchNorm, relu: bool = False):
        if not isinstance(conv, ShiftConvNd) or conv.transposed:
            raise TypeError("ShiftConvBatchNorm needs a frozen, non-transposed ShiftConvNd, got "
                            f"{type(conv).__name__}")
        if not isinstance(bn, FrozenBatchNorm):
            raise TypeError(f"ShiftConvBatchNorm needs a FrozenBatchNorm, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"the BatchNorm has {bn.num_features} features but the conv {conv.out_channels} "
                             "output channels")
        super().__init__(conv, bn)
        self.relu = bool(relu)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        conv, bn = self[0], self[1]
        # Hooks on either child see the separate modules' calls (reports and profilers use them);
        # exporters may swap the children for their own modules.
        if (isinstance(conv, ShiftConvNd) and isinstance(bn, FrozenBatchNorm) and not _hooked(conv)
                and not _hooked(bn) and x.dim() == len(conv.kernel_size) + 2):
            scale, shift = bn.affine(x.dtype)
            return conv.forward_fused(x, scale, shift, residual, self.relu)
        y = bn(conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` that pools large float CPU inputs in channels-last layout and
    returns them contiguous: the same values (a maximum is exact, NaN propagates alike) as torch's
    kernel for contiguous (NCHW) inputs, which at these sizes runs about three times slower (ResNet-50's
    pool over a 64 x 112 x 112 batch-1 input: 3.4 ms against 1.0-1.2 ms including both layout copies,
    on 2 cores of an AMD EPYC; 6.9 against 2.4 ms for ResNet-style 128 x 64 x 16 x 16). Below
    ``MIN_ELEMENTS`` input elements the copies cost more than they save, and other inputs
    (indices asked for, other dtypes or devices, unbatched) take the parent's forward.
    :func:`fuse_frozen` swaps it in for every ``nn.MaxPool2d``.

    Example:
        >>> import torch, deepshift
        >>> pool, x = deepshift.ChannelsLastMaxPool2d(3, 2, 1), torch.randn(1, 64, 112, 112)
        >>> torch.equal(pool(x), torch.nn.MaxPool2d(3, 2, 1)(x))
        True
    """

    MIN_ELEMENTS = 1 << 17

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() != 4 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
                or self.return_indices or x.numel() < self.MIN_ELEMENTS):
            return super().forward(x)
        y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), self.kernel_size, self.stride,
                         self.padding, self.dilation, ceil_mode=self.ceil_mode)
        return y.contiguous()


def _fast_pool(module: nn.Module) -> nn.Module | None:
    # A pool with hooks stays itself, so that they still run (as for the fused layers).
    if type(module) is not nn.MaxPool2d or _hooked(module):
        return None
    fast = ChannelsLastMaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                                 module.return_indices, module.ceil_mode)
    fast.train(module.training)
    return fast


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _Tracer(torch.fx.Tracer):
    # deepshift's inference modules are graph nodes (their forward is not traced through).
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (is_frozen_layer(m)
                or isinstance(m, (FrozenBatchNorm, ExactGlobalAvgPool, ChannelsLastMaxPool2d))
                or super().is_leaf_module(m, qualname))


_ADDS = (operator.add, torch.add)  # fx traces `a += b` as operator.add
_RELUS = (F.relu, torch.relu)


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs
    return node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU


def _may_mutate(node: torch.fx.Node, modules: dict) -> bool:
    """Whether a node may write into one of its inputs (then no computation may move across it)."""
    if node.op == "call_method":
        return str(node.target).endswith("_") or "out" in node.kwargs
    if node.op == "call_function":
        # (fx records `a += b` as an add, and cannot trace item assignment at all.)
        return (bool(node.kwargs.get("inplace")) or "out" in node.kwargs
                or getattr(node.target, "__name__", "").endswith("_"))
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return False


def fuse_frozen(model: nn.Module) -> nn.Module:
    """A copy of the frozen ``model`` in which each frozen conv layer followed by a
    :class:`~deepshift.FrozenBatchNorm` (and then, optionally, a residual add and ReLU) is one
    :class:`ShiftConvBatchNorm`: the BatchNorm, add and ReLU run inside the convolution's native
    call while its output is in cache. ``model`` is not changed and shares nothing with the copy.

    The chains are found by tracing ``model`` with :mod:`torch.fx` (leaf modules: frozen layers,
    FrozenBatchNorm, ExactGlobalAvgPool, torch.nn's own); the copy is a ``torch.fx.GraphModule``.
    A link is fused only where it is the previous value's single use (a conv whose output also
    feeds something else is left alone), neither module is called twice or registered under two
    names, and nothing between the two may write into its inputs. A model fx cannot trace
    (data-dependent control flow) comes back as an unfused copy, with a warning. Max pooling
    layers (``nn.MaxPool2d`` without hooks) become :class:`ChannelsLastMaxPool2d` (faster, same
    values) in either case. Outputs equal the unfused model's (``torch.equal``), and so do ONNX
    exports and savings reports.
    :func:`deepshift.save_packed` refuses a fused model: save the frozen one.

    Example:
        >>> import torch, deepshift
        >>> from deepshift.models import build_model
        >>> net = deepshift.freeze_(deepshift.convert_(build_model("resnet20"), deepshift.QConfig()).eval())
        >>> fast = deepshift.fuse_frozen(net)
        >>> x = torch.randn(2, 3, 32, 32)
        >>> type(fast.conv1).__name__, torch.equal(fast(x), net(x))
        ('ShiftConvBatchNorm', True)
    """
    model = replace_modules(copy.deepcopy(model), _fast_pool)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types on untraceable code (TraceError, TypeError, ...)
        warnings.warn(f"fuse_frozen: torch.fx cannot trace {type(model).__name__} ({exc}); "
                      "returning an unfused copy", stacklevel=2)
        return model
    modules = dict(model.named_modules(remove_duplicate=False))
    # A module registered under two names may be called through either (fx names the first one).
    uses = collections.Counter(id(m) for m in modules.values())
    uses.update(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    fused = {}
    for node in list(graph.nodes):
        chain = _chain(node, modules, uses)
        if chain is None:
            continue
        conv_node, residual, add_node, relu = chain[0], None, None, False
        nxt = _single_user(chain[-1])
        if nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS and len(nxt.args) == 2 \
                and not nxt.kwargs and nxt.args[0] is not nxt.args[1]:
            other = nxt.args[1] if nxt.args[0] is chain[-1] else nxt.args[0]
            if isinstance(other, torch.fx.Node):
                residual, add_node = other, nxt
                chain.append(nxt)
                nxt = _single_user(nxt)
        if nxt is not None and _is_relu(nxt, modules):
            relu = True
            chain.append(nxt)
        # The fused call takes the place of the chain's last node: the conv must not move past a write
        # into something (an in-place ReLU on another branch, say); a shorter chain may still fuse.
        while _writes_between(conv_node, chain[-1], chain, modules) and len(chain) > 2:
            if chain.pop() is add_node:
                residual = None
            else:
                relu = False
        last = chain[-1]
        if _writes_between(conv_node, last, chain, modules):
            continue
        with graph.inserting_before(last):
            args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
            new = graph.call_module(conv_node.target, args)
        last.replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        conv, bn = modules[conv_node.target], modules[chain[1].target]
        fused[conv_node.target] = ShiftConvBatchNorm(conv, bn, relu)
    graph.lint()
    result = torch.fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Fused")
    for target, module in fused.items():
        parent, _, name = target.rpartition(".")
        setattr(result.get_submodule(parent), name, module)
    result.delete_all_unused_submodules()
    return result


def _writes_between(first: torch.fx.Node, last: torch.fx.Node, chain: list, modules: dict) -> bool:
    node = first.next
    while node is not last:
        if node not in chain and _may_mutate(node, modules):
            return True
        node = node.next
    return False


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chain(node: torch.fx.Node, modules: dict, uses: collections.Counter) -> list | None:
    """[conv node, bn node] when ``node`` is a fusable FrozenBatchNorm call on a frozen conv's output."""
    bn = modules.get(node.target) if node.op == "call_module" else None
    if not isinstance(bn, FrozenBatchNorm) or len(node.args) != 1 or node.kwargs:
        return None
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
        return None
    conv = modules[src.target]
    # One name and one call each: 2 uses.
    if (isinstance(conv, ShiftConvNd) and not conv.transposed and conv.out_channels == bn.num_features
            and uses[id(conv)] == 2 and uses[id(bn)] == 2 and len(src.args) == 1 and not src.kwargs):
        return [src, node]
    return None
