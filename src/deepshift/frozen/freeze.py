"""``freeze_``: trained shift layers -> multiplication-free inference layers with packed codes."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from deepshift.core.config import PSConfig
from deepshift.core.convert import is_shift_layer, shift_and_sign, shift_layers, shift_tensors
from deepshift.core.quantize import to_fixed_point_int
from deepshift.core.replace import replace_modules
from deepshift.frozen.attention import ShiftMultiheadAttention, check_supported
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
    if isinstance(module, nn.Linear):
        return _freeze_weight(module, "weight", module.bias, act_bits, lambda common: ShiftLinear(
            FrozenSpec(kind="linear", **common)))
    if isinstance(module, nn.modules.conv._ConvNd):
        padding = module.padding
        return _freeze_weight(module, "weight", module.bias, act_bits, lambda common: ShiftConvNd(FrozenSpec(
            kind="conv", **common, transposed=bool(module.transposed), groups=module.groups,
            stride=tuple(module.stride), padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(module.dilation), output_padding=tuple(module.output_padding),
            padding_mode=module.padding_mode,
        )))
    raise TypeError(f"cannot freeze {type(module).__name__}")


def _freeze_weight(module: nn.Module, tensor: str, bias: torch.Tensor | None,
                   act_bits: tuple[int, int] | None, make, rows: slice | None = None) -> _FrozenShift:
    """Frozen layer of shift weight ``module.<tensor>`` (its ``rows`` only, if given) and ``bias``;
    ``make(fields)`` builds the layer from the spec fields common to every kind."""
    from deepshift.core.convert import layer_shift_range, shift_config

    cfg = shift_config(module, tensor)
    shift_range = layer_shift_range(module, tensor)
    if cfg.auto_range:
        # The frozen layer records its own window: the packed file and reports carry the offset.
        cfg = replace(cfg, max_shift=shift_range[1])
    bits = cfg.act_bits or act_bits or DEFAULT_ACT_BITS
    bits = (int(bits[0]), int(bits[1]))
    # Validate the pair the same way configs do.
    type(cfg)(weight_bits=cfg.weight_bits, act_bits=bits)
    shift, sign = shift_and_sign(module, tensor)
    if rows is not None:
        shift, sign = shift[rows], sign[rows]
    has_zero = isinstance(cfg, PSConfig)
    used = shift[sign != 0]
    # Codes are relative to the lowest shift the layer actually uses: the integer accumulator
    # then spans only the used shifts, usually far narrower than the configured range.
    shift_lo = int(used.min()) if used.numel() else shift_range[0]
    shift_hi = int(used.max()) if used.numel() else shift_lo
    codes = encode_codes(shift, sign, cfg.weight_bits, has_zero, shift_lo)
    weight_shape = list(shift.shape)
    terms = fan_in(weight_shape, getattr(module, "transposed", False), getattr(module, "groups", 1))
    frozen = make(dict(
        weight_shape=tuple(weight_shape), weight_bits=cfg.weight_bits, has_zero=has_zero, shift_lo=shift_lo,
        shift_hi=shift_hi, act_bits=bits, act_rounding=cfg.act_rounding, method=cfg.method,
        accumulator=choose_accumulator(terms, bits, shift_lo, shift_hi, bias is not None),
        bias=bias is not None, config=cfg.to_dict(),
    ))
    device = shift.device
    frozen.codes = pack_codes(codes, cfg.weight_bits).to(device)
    if bias is not None:
        # The parametrized (already rounded, if trained with act_bits) bias.
        bias_q = to_fixed_point_int(bias.detach().to(torch.float64), bits, cfg.act_rounding)
        frozen.bias_int = bias_q.to(torch.int32).to(device)
    return frozen.train(module.training)


@torch.no_grad()
def freeze_attention(mha: nn.MultiheadAttention, act_bits: tuple[int, int] | None = None,
                     frozen: dict[int, _FrozenShift] | None = None) -> ShiftMultiheadAttention:
    """The :class:`~deepshift.frozen.attention.ShiftMultiheadAttention` of a (partly) converted
    ``nn.MultiheadAttention``: converted projections frozen, float ones kept as ``nn.Linear``.
    ``frozen`` maps ``id(out_proj)`` to its frozen layer when :func:`freeze_` made it already."""
    check_supported(mha)
    split = ShiftMultiheadAttention.from_float(mha)
    e = mha.embed_dim
    names = ("q_proj", "k_proj", "v_proj")
    for i, name in enumerate(names):
        tensor, rows = (("in_proj_weight", slice(i * e, (i + 1) * e)) if mha._qkv_same_embed_dim
                        else (f"{name}_weight", None))
        if tensor in matmul_shift_tensors(mha):
            bias = None if mha.in_proj_bias is None else mha.in_proj_bias[i * e:(i + 1) * e]
            setattr(split, name, _freeze_weight(mha, tensor, bias, act_bits, lambda common: ShiftLinear(
                FrozenSpec(kind="linear", **common)), rows))
    if is_shift_layer(mha.out_proj):
        done = (frozen or {}).get(id(mha.out_proj))
        split.out_proj = done if done is not None else freeze_layer(mha.out_proj, act_bits)
    return split


def matmul_shift_tensors(module: nn.Module) -> set[str]:
    """Names of ``module``'s own tensors that are shift weights."""
    return {tensor for name, _, tensor, _ in shift_tensors(module) if name == ""}


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

    A converted ``nn.MultiheadAttention`` becomes a
    :class:`~deepshift.frozen.attention.ShiftMultiheadAttention` whose query, key, value and output
    projections are frozen layers (its float arithmetic between them is ``nn.MultiheadAttention``'s);
    recurrent layers' shift weights cannot be frozen (ValueError, nothing changed).

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
    frozen: dict[int, nn.Module] = {id(module): freeze_layer(module, act_bits) for _, module, _ in layers}
    # A converted nn.MultiheadAttention (its in-projection or its out_proj) becomes one module
    # with four projection layers: it reads out_proj.weight itself, so freezing out_proj alone
    # would break it.
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and (
                matmul_shift_tensors(module) or is_shift_layer(module.out_proj)):
            frozen[id(module)] = freeze_attention(module, act_bits, frozen)
    if id(model) in frozen:
        return frozen[id(model)]
    if float_layers:
        model = freeze_float_layers_(model)
    return without_attention_fast_path(replace_modules(model, lambda m: frozen.get(id(m))))


def without_attention_fast_path(model: nn.Module) -> nn.Module:
    """Turn off ``nn.TransformerEncoder``'s nested-tensor fast path where it holds a
    :class:`ShiftMultiheadAttention` (that path reads packed float attention weights)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, ShiftMultiheadAttention) for m in module.modules()):
            module.use_nested_tensor = False
    return model


def _refuse_unfreezable(model: nn.Module) -> None:
    """ValueError, before anything changes, for shift weights the integer layers cannot hold."""
    others = [f"{name}.{tensor}".lstrip(".") for name, module, tensor, _ in shift_tensors(model)
              if tensor != "weight" and not isinstance(module, nn.MultiheadAttention)]
    if others:
        listed = ", ".join(others[:6]) + (f", ... ({len(others) - 6} more)" if len(others) > 6 else "")
        raise ValueError(
            f"freeze_ cannot freeze converted recurrent weights ({listed}): the integer layers cover "
            "Linear, convolutions and attention. Evaluate the converted model as it is (its weights are "
            "exact powers of two), or convert_ with a filter_fn that leaves these modules out.")
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and (
                matmul_shift_tensors(module) or is_shift_layer(module.out_proj)):
            check_supported(module)


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
