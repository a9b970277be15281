"""Turning a model's convolution and linear layers into shift layers, and finding them again."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import PSConfig, QConfig
from .parametrizations import FixedPointBias, FixedPointInput, ShiftPS, ShiftQ
from .quantize import ps_shift_sign, q_shift_sign

# Every nn.ConvNd and nn.ConvTransposeNd (and user subclasses) derives from _ConvNd.
CONVERTIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

FilterFn = Callable[[nn.Module, str], bool]


def is_convertible(module: nn.Module) -> bool:
    """True for Linear and every (transposed) convolution, including subclasses."""
    return isinstance(module, CONVERTIBLE_TYPES)


def _shift_parametrization(module: nn.Module) -> ShiftQ | ShiftPS | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, (ShiftQ, ShiftPS)):
            return p
    return None


def is_shift_layer(module: nn.Module) -> bool:
    """True when ``module``'s weight has been converted by :func:`convert_`."""
    return _shift_parametrization(module) is not None


def shift_config(module: nn.Module) -> QConfig | PSConfig:
    """The config a shift layer was converted with (ValueError for other modules)."""
    p = _shift_parametrization(module)
    if p is None:
        raise ValueError(f"{type(module).__name__} is not a shift layer (run deepshift.convert_)")
    return p.config


def convert_(
    model: nn.Module,
    config: QConfig | PSConfig,
    filter_fn: FilterFn | None = None,
    depth: int | None = None,
) -> nn.Module:
    """Convert ``model``'s linear and convolution layers to shift layers, in place.

    Every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (and subclasses, any
    groups, dilation, stride or padding mode) that ``filter_fn(module, qualified_name)`` accepts
    becomes a DeepShift-Q or DeepShift-PS layer. The current weights are the starting point, so
    converting a trained float model is the paper's "from pretrained" and converting a freshly
    built one is "from scratch". Layers that already are shift layers are left alone.

    Args:
        model: any module; it is changed in place and returned.
        config: :class:`QConfig` or :class:`PSConfig`.
        filter_fn: optional ``(module, name) -> bool`` choosing which candidates to convert.
        depth: the paper's shift depth: convert only the last ``depth`` candidates in module
            order (counted from the output side, after ``filter_fn``); ``None`` converts all.

    Build the optimizer *after* converting: PS creates new parameters. To load a checkpoint of a
    converted model, build the model, ``convert_`` it with the same config, then
    ``load_state_dict``.

    Example:
        >>> import torch, deepshift
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(),
        ...                           torch.nn.Linear(8 * 26 * 26, 10))
        >>> _ = deepshift.convert_(net, deepshift.PSConfig(weight_bits=5))
        >>> [name for name, _, _ in deepshift.shift_layers(net)]
        ['0', '2']
    """
    if not isinstance(config, (QConfig, PSConfig)):
        raise TypeError(f"config must be a QConfig or PSConfig, got {type(config).__name__}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
        raise ValueError(f"depth must be None or an int >= 0, got {depth!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, name) -> bool")

    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if is_convertible(m)
        and not is_shift_layer(m)
        and (filter_fn is None or filter_fn(m, name))
    ]
    if depth is not None:
        candidates = candidates[len(candidates) - depth :] if depth else []
    for name, module in candidates:
        _check_convertible(module, name)
    for _, module in candidates:
        _convert_module(module, config)
    return model


def _check_convertible(module: nn.Module, name: str) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"layer {name!r} is lazy and not initialised yet: run one forward pass before convert_"
        )
    if not isinstance(weight, Tensor):
        raise ValueError(f"layer {name!r} has no weight tensor to convert")
    if not weight.is_floating_point():
        raise ValueError(f"layer {name!r} has a {weight.dtype} weight; shift layers need floats")
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(
            f"layer {name!r} already has a parametrization on its weight (e.g. weight_norm); "
            "remove it before convert_"
        )


def _convert_module(module: nn.Module, config: QConfig | PSConfig) -> None:
    if isinstance(config, QConfig):
        parametrize.register_parametrization(module, "weight", ShiftQ(config))
    else:
        parametrize.register_parametrization(module, "weight", ShiftPS(config))
        if config.freeze_sign:
            module.parametrizations.weight.original1.requires_grad_(False)
    if config.act_bits is not None:
        if module.bias is not None:
            parametrize.register_parametrization(module, "bias", FixedPointBias(config))
        module.register_forward_pre_hook(FixedPointInput(config))


def shift_layers(model: nn.Module) -> list[tuple[str, nn.Module, QConfig | PSConfig]]:
    """``(qualified_name, module, config)`` of every shift layer in ``model``, in module order."""
    return [
        (name, m, p.config)
        for name, m in model.named_modules()
        if (p := _shift_parametrization(m)) is not None
    ]


def shift_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The stored parameters behind a shift layer's weight.

    Q: ``{"weight": float weight}``; PS: ``{"shift": ..., "sign": ...}``.
    """
    p = _shift_parametrization(module)
    if p is None:
        raise ValueError(f"{type(module).__name__} is not a shift layer")
    originals = module.parametrizations.weight
    if isinstance(p, ShiftQ):
        return {"weight": originals.original}
    return {"shift": originals.original0, "sign": originals.original1}


@torch.no_grad()
def shift_and_sign(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Integer shift ``p`` and sign ``s`` (both int16 tensors) of a shift layer at evaluation.

    ``effective_weight(module) == s * 2**p`` exactly; ``s`` is 0 only for PS zero weights.
    """
    p = _shift_parametrization(module)
    if p is None:
        raise ValueError(f"{type(module).__name__} is not a shift layer")
    params = shift_parameters(module)
    if isinstance(p, ShiftQ):
        shift, sign = q_shift_sign(params["weight"], p.config.shift_range)
    else:
        shift, sign = ps_shift_sign(params["shift"], params["sign"], p.config.shift_range)
    return shift.to(torch.int16), sign.to(torch.int16)


@torch.no_grad()
def effective_weight(module: nn.Module) -> Tensor:
    """The exact power-of-two weight tensor a shift layer uses at evaluation (no grad).

    Deterministic whatever the module's mode: stochastic rounding only ever happens inside a
    training-mode forward pass.

    Example:
        >>> import torch, deepshift
        >>> layer = deepshift.convert_(torch.nn.Linear(4, 2), deepshift.QConfig())
        >>> w = deepshift.effective_weight(layer)
        >>> bool(((w.abs().log2() % 1) == 0).all())
        True
    """
    shift, sign = shift_and_sign(module)
    dtype = next(iter(shift_parameters(module).values())).dtype
    return sign.to(dtype) * torch.exp2(shift.to(dtype))


def iter_shift_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(kind, parameter)`` for every PS shift/sign parameter in ``model`` (kind: shift|sign)."""
    for _, module, config in shift_layers(model):
        if isinstance(config, PSConfig):
            yield from shift_parameters(module).items()
