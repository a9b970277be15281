"""``freeze_``: trained shift layers -> multiplication-free inference layers with packed codes."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from deepshift.core.config import PSConfig
from deepshift.core.convert import shift_and_sign, shift_layers, shift_tensors
from deepshift.core.quantize import to_fixed_point_int
from deepshift.core.replace import replace_modules
from deepshift.frozen.float_layers import freeze_float_layers_
from deepshift.frozen.layers import ShiftConvNd, ShiftLinear, _FrozenShift, choose_accumulator
from deepshift.frozen.spec import FrozenSpec
from deepshift.ops.codes import encode_codes, pack_codes
from deepshift.ops.reference import fan_in

DEFAULT_ACT_BITS: tuple[int, int] = (8, 8)
"""Fixed point used by :func:`freeze_` for layers trained without ``act_bits``: 16-bit inputs
with 8 integer bits (sign included) and 8 fraction bits, i.e. a range of [-128, 128) in steps of
1/256. Wide enough for normalised activations, narrow enough that most accumulators fit int64
comfortably (and small layers int32). Pass ``act_bits`` to :func:`freeze_` to choose another."""


@torch.no_grad()
def freeze_layer(module: nn.Module, act_bits: tuple[int, int] | None = None) -> _FrozenShift:
    """The frozen (inference) equivalent of one shift layer; the layer itself is not changed.

    The layer's own ``act_bits`` win; otherwise ``act_bits`` (default :data:`DEFAULT_ACT_BITS`).
    """
    from deepshift.core.convert import layer_shift_range, shift_config

    cfg = shift_config(module)
    shift_range = layer_shift_range(module)
    if cfg.auto_range:
        # The frozen layer records its own window: the packed file and reports carry the offset.
        cfg = replace(cfg, max_shift=shift_range[1])
    bits = cfg.act_bits or act_bits or DEFAULT_ACT_BITS
    bits = (int(bits[0]), int(bits[1]))
    # Validate the pair the same way configs do.
    type(cfg)(weight_bits=cfg.weight_bits, act_bits=bits)
    shift, sign = shift_and_sign(module)
    has_zero = isinstance(cfg, PSConfig)
    used = shift[sign != 0]
    # Codes are relative to the lowest shift the layer actually uses: the integer accumulator
    # then spans only the used shifts, usually far narrower than the configured range.
    shift_lo = int(used.min()) if used.numel() else shift_range[0]
    shift_hi = int(used.max()) if used.numel() else shift_lo
    codes = encode_codes(shift, sign, cfg.weight_bits, has_zero, shift_lo)
    bias = module.bias  # the parametrized (already rounded, if trained with act_bits) bias
    weight_shape = list(shift.shape)
    terms = fan_in(weight_shape, getattr(module, "transposed", False), getattr(module, "groups", 1))
    common = dict(
        weight_shape=tuple(weight_shape), weight_bits=cfg.weight_bits, has_zero=has_zero, shift_lo=shift_lo,
        shift_hi=shift_hi, act_bits=bits, act_rounding=cfg.act_rounding, method=cfg.method,
        accumulator=choose_accumulator(terms, bits, shift_lo, shift_hi, bias is not None),
        bias=bias is not None, config=cfg.to_dict(),
    )
    if isinstance(module, nn.Linear):
        frozen: _FrozenShift = ShiftLinear(FrozenSpec(kind="linear", **common))
    elif isinstance(module, nn.modules.conv._ConvNd):
        padding = module.padding
        frozen = ShiftConvNd(FrozenSpec(
            kind="conv", **common, transposed=bool(module.transposed), groups=module.groups,
            stride=tuple(module.stride), padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(module.dilation), output_padding=tuple(module.output_padding),
            padding_mode=module.padding_mode,
        ))
    else:
        raise TypeError(f"cannot freeze {type(module).__name__}")
    device = shift.device
    frozen.codes = pack_codes(codes, cfg.weight_bits).to(device)
    if bias is not None:
        bias_q = to_fixed_point_int(bias.detach().to(torch.float64), bits, cfg.act_rounding)
        frozen.bias_int = bias_q.to(torch.int32).to(device)
    return frozen.train(module.training)


def freeze_(model: nn.Module, act_bits: tuple[int, int] | None = None,
            float_layers: bool = True) -> nn.Module:
    """Replace every shift layer of ``model`` with a multiplication-free inference layer, in place.

    Each shift layer (see :func:`deepshift.convert_`) becomes a :class:`~deepshift.ShiftLinear` or
    :class:`~deepshift.ShiftConvNd` holding its weights as packed ``weight_bits``-bit codes (no
    float weight). Inputs are rounded to fixed point: a layer trained with ``act_bits`` keeps
    them; other layers use ``act_bits`` (post-training activation quantization), default
    :data:`DEFAULT_ACT_BITS` = (8, 8). Biases are rounded to the same fixed point. The frozen
    layer's output equals the float64 evaluation of the converted layer (with those
    ``act_bits``, eval mode) exactly, up to one final rounding to the input's dtype.

    With ``float_layers`` (the default), BatchNorm and global average pooling modules become
    their runtime-independent forms (:mod:`deepshift.frozen.float_layers`: eval-mode BatchNorm as a
    separate multiply and add, pooling summed in float64), so that an exported ONNX graph
    reproduces the frozen model bit for bit. BatchNorm then stays in eval mode for good.

    Forward hooks registered on the replaced layers are not carried over. Layers are found
    through ``named_modules``; if ``model`` itself is a shift layer the frozen layer is
    returned, so always use the return value. A model without shift layers is returned as is.

    Example:
        >>> import torch, deepshift
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> _ = deepshift.convert_(net, deepshift.PSConfig(weight_bits=5, act_bits=(8, 8)))
        >>> net.eval()(torch.ones(1, 4)).shape
        torch.Size([1, 2])
        >>> ref = net.double()(torch.ones(1, 4, dtype=torch.float64))
        >>> net = deepshift.freeze_(net)
        >>> type(net[0]).__name__
        'ShiftLinear'
        >>> torch.equal(net(torch.ones(1, 4, dtype=torch.float64)), ref)
        True
    """
    if act_bits is not None:
        act_bits = (int(act_bits[0]), int(act_bits[1]))
    _refuse_unfreezable(model)
    layers = shift_layers(model)
    frozen = {id(module): freeze_layer(module, act_bits) for _, module, _ in layers}
    if id(model) in frozen:
        return frozen[id(model)]
    if float_layers:
        model = freeze_float_layers_(model)
    return replace_modules(model, lambda m: frozen.get(id(m)))


def _refuse_unfreezable(model: nn.Module) -> None:
    """ValueError, before anything changes, for shift weights the integer layers cannot hold."""
    others = [f"{name}.{tensor}".lstrip(".")
              for name, _, tensor, _ in shift_tensors(model) if tensor != "weight"]
    if others:
        listed = ", ".join(others[:6]) + (f", ... ({len(others) - 6} more)" if len(others) > 6 else "")
        raise ValueError(
            f"freeze_ cannot freeze converted attention or recurrent weights ({listed}): the integer "
            "layers cover Linear and convolutions. Evaluate the converted model as it is (its weights "
            "are exact powers of two), or convert_ with a filter_fn that leaves these modules out.")


def frozen_copy(model: nn.Module, act_bits: tuple[int, int] | None = None) -> nn.Module:
    """The frozen model that export and reports work on; ``model`` itself is never changed.

    A model with converted shift layers is frozen as a deep copy (:func:`freeze_` with
    ``act_bits``; a ``zoo_spec`` is kept); a model without (frozen already, or float) is returned
    as is. Freezing is the one-way gate between training and deployment: the packed format, ONNX
    and the savings report read frozen layers only.
    """
    if not shift_tensors(model):
        return model
    frozen = freeze_(copy.deepcopy(model), act_bits=act_bits)
    zoo = getattr(model, "zoo_spec", None)
    if zoo is not None and getattr(frozen, "zoo_spec", None) is None:
        frozen.zoo_spec = zoo
    return frozen
