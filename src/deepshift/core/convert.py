"""Turning a model's matrix weights (linear, convolution, attention and recurrent layers) into shift
weights, and finding them again."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from deepshift.core.config import MAX_SHIFT_LIMIT, PSConfig, QConfig
from deepshift.core.parametrizations import FixedPointBias, FixedPointInput, ShiftPS, ShiftQ
from deepshift.core.quantize import ps_shift_sign, q_shift_sign

INITS = ("weights", "scratch")
# A fixed window that rounds more than this share of a layer's weights down to 2**max_shift
# (their nearest power of two lies above it) is reported when converting.
CLAMP_WARN_SHARE = 0.01
# The paper's code draws PS shifts from scratch in U(-10, -1) below its p_max = 0.
PAPER_SHIFT_INIT = (-10.0, -1.0)
# Q from scratch: trained float weights outgrow a fresh layer's init (PyTorch's default has 1/2.45
# of He's standard deviation), so the "auto" window is placed for the initial weights rescaled to
# He variance 2 / fan_in, and takes the highest placement whose rounding error of them is within
# this share of the least (two more octaves at 4-5 bits; at 2-3 bits no other window comes close).
# Each step was better on Fashion-MNIST validation (results/lowbit.md). PS from scratch draws its
# weights at He scale already and keeps the least-error window (headroom was worse there).
SCRATCH_WINDOW_TOLERANCE = 0.1

# Every nn.ConvNd and nn.ConvTransposeNd (and user subclasses) derives from _ConvNd.
CONVERTIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

FilterFn = Callable[[nn.Module, str], bool]


def is_convertible(module: nn.Module) -> bool:
    """True for Linear and every (transposed) convolution, including subclasses: the layers whose
    ``weight`` becomes a shift weight and that :func:`deepshift.freeze_` turns into integer layers."""
    return isinstance(module, CONVERTIBLE_TYPES)


def matmul_weight_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the weight tensors that ``module`` multiplies its inputs by, which :func:`convert_`
    converts: ``("weight",)`` for Linear and convolutions; ``nn.MultiheadAttention``'s packed
    ``in_proj_weight`` or separate ``q/k/v_proj_weight`` (its ``out_proj`` is a Linear of its own);
    every ``weight_ih/hh/hr`` of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and their cells. Empty for others.

    Example:
        >>> import torch, deepshift
        >>> deepshift.matmul_weight_names(torch.nn.LSTM(4, 8, num_layers=2))
        ('weight_ih_l0', 'weight_hh_l0', 'weight_ih_l1', 'weight_hh_l1')
    """
    if is_convertible(module):
        return ("weight",)
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    if isinstance(module, nn.RNNBase):
        names = []
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse") if module.bidirectional else ("",):
                names += [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
                if getattr(module, "proj_size", 0) > 0:
                    names.append(f"weight_hr_l{layer}{suffix}")
        return tuple(names)
    if isinstance(module, nn.RNNCellBase):
        return ("weight_ih", "weight_hh")
    return ()


def _shift_parametrization(module: nn.Module, name: str = "weight") -> ShiftQ | ShiftPS | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in getattr(module.parametrizations, name):
        if isinstance(p, (ShiftQ, ShiftPS)):
            return p
    return None


def _require_shift(module: nn.Module, name: str) -> ShiftQ | ShiftPS:
    p = _shift_parametrization(module, name)
    if p is None:
        what = type(module).__name__.removeprefix("Parametrized")
        raise ValueError(f"{what}.{name} is not a shift weight (run deepshift.convert_)")
    return p


def is_shift_layer(module: nn.Module) -> bool:
    """True when :func:`convert_` has converted one of ``module``'s matrix weights (its ``weight``,
    or an attention or recurrent layer's projections)."""
    return any(_shift_parametrization(module, n) is not None for n in matmul_weight_names(module))


def layer_shift_range(module: nn.Module, name: str = "weight") -> tuple[int, int]:
    """Inclusive ``(p_min, p_max)`` of a shift weight's shifts (its own window with ``"auto"``);
    ``name`` picks the tensor of an attention or recurrent layer (e.g. ``"in_proj_weight"``)."""
    return _require_shift(module, name).shift_range


def shift_config(module: nn.Module, name: str = "weight") -> QConfig | PSConfig:
    """The config a shift weight was converted with (ValueError for other tensors)."""
    return _require_shift(module, name).config


def convert_(
    model: nn.Module,
    config: QConfig | PSConfig,
    filter_fn: FilterFn | None = None,
    depth: int | None = None,
    init: str = "weights",
    strict: bool = False,
) -> nn.Module:
    """Convert ``model``'s matrix weights to shift weights, in place.

    Every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (and subclasses, any
    groups, dilation, stride or padding mode) that ``filter_fn(module, qualified_name)`` accepts
    becomes a DeepShift-Q or DeepShift-PS layer, and so do the projections of
    ``nn.MultiheadAttention`` and the gate weights of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and their
    cells (:func:`matmul_weight_names`; their own forward, fused fast paths included, then reads the
    shift weights). Weights that already are shift weights are left alone.

    Matrix-shaped float parameters named ``*weight`` in modules ``convert_`` does not know (e.g. a
    hand-written projection) are named in a warning; :func:`float_weights` lists every matrix
    weight left in float, and ``strict=True`` raises instead of converting when there is any
    (including those ``filter_fn`` or ``depth`` leave out), before anything is changed.
    ``act_bits`` (fixed-point activations) applies to Linear and convolution layers; attention and
    recurrent layers compute on float activations with shift weights. :func:`deepshift.freeze_`
    turns a converted ``nn.MultiheadAttention`` into four integer projections (their inputs rounded
    to fixed point there, as every frozen layer's are) and refuses recurrent layers. Models written
    with ``nn.Linear`` projections (as the zoo's transformers are) get ``act_bits`` in training too.

    Two starting points (``init``):

    * ``"weights"`` (default, the paper's "from pretrained"): the current weights are converted
      exactly: Q keeps them as its float weights, PS sets ``shift = round(log2|w|)`` (clamped to
      the window) and ``sign = sign(w)``.
    * ``"scratch"`` (the paper's "from scratch" for a freshly built model): Q starts from the
      model's own initialisation as well; PS draws its parameters as the paper's code does,
      ``sign ~ U(-1, 1)`` (about half the weights start inside the zero band ``|sign| < 0.5``)
      and ``shift ~ U(-10, -1)``, cut to the window's rounding cells ``[p_min - 0.5, p_max + 0.5]``
      (5-bit, ``max_shift=0``: exactly the paper's; 3-bit: ``U(-2.5, -1)``). With ``"auto"`` the
      9-octave interval is placed for the layer's fan-in instead (:func:`scaled_shift_interval`).
      Converting exactly instead would put every PS parameter on an integer, where steps of the
      usual size move no weight to another value for many steps.

    With ``max_shift="auto"`` each layer's window ``[p_max - R, p_max]`` is placed first, from
    that layer's current weights: the ``p_max`` whose rounding of them has the least squared
    error. From scratch it is placed for weights at He scale (PS draws them so; Q's initial weights
    are rescaled to ``2 / fan_in`` variance for the placement only, and Q takes the highest window
    within 10% of the least error: room for float weights to grow). It is stored in the layer's
    state_dict.
    With a fixed ``max_shift``, a layer whose window rounds more than 1% of its weights down to
    ``2**max_shift`` is named in one warning.

    Args:
        model: any module; it is changed in place and returned.
        config: :class:`QConfig` or :class:`PSConfig`.
        filter_fn: optional ``(module, name) -> bool`` choosing which candidates to convert.
        depth: the paper's shift depth: convert only the last ``depth`` candidates in module
            order (counted from the output side, after ``filter_fn``); ``None`` converts all.
        init: ``"weights"`` or ``"scratch"``, see above.
        strict: raise ValueError (naming them) when any matrix weight would stay in float.

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
        >>> net = torch.nn.Linear(784, 512)   # a fresh layer, trained as 3-bit PS from scratch:
        >>> cfg = deepshift.PSConfig(weight_bits=3, max_shift="auto")
        >>> _ = deepshift.convert_(net, cfg, init="scratch")
        >>> deepshift.layer_shift_range(net)  # a window at the layer's scale, not the paper's [-2, 0]
        (-5, -3)
    """
    if not isinstance(config, (QConfig, PSConfig)):
        raise TypeError(f"config must be a QConfig or PSConfig, got {type(config).__name__}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
        raise ValueError(f"depth must be None or an int >= 0, got {depth!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, name) -> bool")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not allowed; choose one of {', '.join(INITS)}")

    candidates = [
        (name, m, todo)
        for name, m in model.named_modules()
        if (todo := _unconverted(m)) and (filter_fn is None or filter_fn(m, name))
    ]
    if depth is not None:
        candidates = candidates[len(candidates) - depth :] if depth else []
    for name, module, todo in candidates:
        for tensor in todo:
            _check_convertible(module, name, tensor)
    chosen = {id(m) for _, m, _ in candidates}
    left = [w for w in float_weights(model) if id(w[1]) not in chosen]
    if strict and left:
        raise ValueError(f"convert_(strict=True): {len(left)} matrix weight(s) would stay in float: "
                         f"{_names(left)}; nothing was converted")
    unknown = [w for w in left if not matmul_weight_names(w[1])]
    clamped = []
    for name, module, todo in candidates:
        for tensor in todo:
            share = _convert_tensor(module, tensor, config, init)
            if share > CLAMP_WARN_SHARE:
                label = name if tensor == "weight" else f"{name}.{tensor}".lstrip(".")
                clamped.append(f"{label or '(root)'} ({100 * share:.1f}%)")
        if config.act_bits is not None and is_convertible(module):
            if module.bias is not None:
                parametrize.register_parametrization(module, "bias", FixedPointBias(config))
            module.register_forward_pre_hook(FixedPointInput(config))
    if clamped:
        warnings.warn(
            f"convert_: max_shift={config.max_shift} rounds more than {100 * CLAMP_WARN_SHARE:g}% of "
            f"the weights of {len(clamped)} layer(s) down to 2**{config.max_shift}: "
            f"{', '.join(clamped[:8])}{', ...' if len(clamped) > 8 else ''}. "
            "Use max_shift='auto' (a window per layer) or a larger max_shift.", stacklevel=2)
    if unknown:
        warnings.warn(
            f"convert_ left {len(unknown)} matrix weight(s) of modules it does not know in float: "
            f"{_names(unknown)}. Express them as nn.Linear / convolutions to convert them; "
            "strict=True makes this an error.", stacklevel=2)
    return model


# Modules whose matrix-shaped weights are looked up, not multiplied (no shift weight there).
_LOOKUP_TYPES = (nn.Embedding, nn.EmbeddingBag)


def float_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every matrix weight of ``model`` left in float: ``(qualified tensor name, module)``.

    The matrix weights of the layers :func:`convert_` converts (:func:`matmul_weight_names`) not
    converted yet, and float parameters of two or more dimensions whose name ends in ``weight`` in
    other modules (embeddings excepted: they are tables, not products).

    Example:
        >>> import torch, deepshift
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> _ = deepshift.convert_(net, deepshift.QConfig(), depth=1)
        >>> [name for name, _ in deepshift.float_weights(net)]
        ['0.weight']
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (parametrize.ParametrizationList, *_LOOKUP_TYPES)):
            continue
        prefix = f"{name}." if name else ""
        if matmul_weight_names(module):
            found += [(prefix + n, module) for n in _unconverted(module)]
            continue
        for n, p in module.named_parameters(recurse=False):
            if n.endswith("weight") and p.dim() >= 2 and p.is_floating_point():
                found.append((prefix + n, module))
    return found


def _unconverted(module: nn.Module) -> tuple[str, ...]:
    """``module``'s matrix weights that exist (attention's unused projections are None) and are
    still float."""
    return tuple(n for n in matmul_weight_names(module)
                 if getattr(module, n, None) is not None and _shift_parametrization(module, n) is None)


def _names(weights: list[tuple[str, nn.Module]], limit: int = 8) -> str:
    listed = ", ".join(f"{n} ({type(m).__name__.removeprefix('Parametrized')})" for n, m in weights[:limit])
    return listed + (f", ... ({len(weights) - limit} more)" if len(weights) > limit else "")


def _check_convertible(module: nn.Module, name: str, tensor: str = "weight") -> None:
    weight = getattr(module, tensor, None)
    what = f"layer {name!r}" if tensor == "weight" else f"{tensor} of layer {name!r}"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"layer {name!r} is lazy and not initialised yet: run one forward pass before convert_"
        )
    if not isinstance(weight, Tensor):
        raise ValueError(f"{what} has no weight tensor to convert")
    if not weight.is_floating_point():
        raise ValueError(f"{what} has a {weight.dtype} weight; shift layers need floats")
    if parametrize.is_parametrized(module, tensor):
        raise ValueError(
            f"{what} already has a parametrization on its weight (e.g. weight_norm); "
            "remove it before convert_"
        )


def _convert_tensor(module: nn.Module, tensor: str, config: QConfig | PSConfig, init: str) -> float:
    """Convert one weight tensor in place; returns the share of its weights clamped by a fixed
    window."""
    param = ShiftQ(config) if isinstance(config, QConfig) else ShiftPS(config)
    weight = getattr(module, tensor).detach()
    clamped = 0.0
    scratch_ps = init == "scratch" and isinstance(config, PSConfig)
    if scratch_ps:
        interval = PAPER_SHIFT_INIT if not config.auto_range else scaled_shift_interval(_init_fan_in(weight))
    if config.auto_range:
        if scratch_ps:
            # The window for weights drawn as the init below draws them: rounded shifts and signs.
            draw = torch.empty_like(weight).uniform_(*interval).round_()
            sample = torch.empty_like(weight).uniform_(-1.0, 1.0).round_().mul_(torch.exp2(draw))
            param.set_max_shift_(auto_max_shift(sample[sample != 0], config))
        elif init == "scratch":
            param.set_max_shift_(auto_max_shift(he_scaled(weight), config, SCRATCH_WINDOW_TOLERANCE))
        else:
            param.set_max_shift_(auto_max_shift(weight, config))
    elif init == "weights" and weight.numel():
        # Magnitudes whose nearest power of two (in log scale) lies above the window.
        top = 2.0 ** param.shift_range[1] * math.sqrt(2.0)
        clamped = float((weight.abs() > top).float().mean())
    parametrize.register_parametrization(module, tensor, param)
    if isinstance(config, PSConfig):
        originals = getattr(module.parametrizations, tensor)
        if scratch_ps:
            shift, sign = originals.original0, originals.original1
            with torch.no_grad():
                shift.copy_(scratch_shift_init(shift.shape, param.shift_range, interval, shift.dtype,
                                               shift.device))
                sign.uniform_(-1.0, 1.0)
        if config.freeze_sign:
            originals.original1.requires_grad_(False)
    return clamped


def scratch_shift_init(shape, shift_range: tuple[int, int], interval: tuple[float, float] = PAPER_SHIFT_INIT,
                       dtype=torch.float32, device=None) -> Tensor:
    """PS shifts from scratch: ``U(interval)`` intersected with the window's rounding cells.

    The cells are ``[p_min - 0.5, p_max + 0.5]``; when the intersection is empty (the window
    lies outside the interval, or 2-bit PS's single shift above it), the shifts fill the cells.
    """
    p_min, p_max = shift_range
    lo, hi = max(interval[0], p_min - 0.5), min(interval[1], p_max + 0.5)
    if hi <= lo:
        lo, hi = p_min - 0.5, p_max + 0.5
    return torch.empty(shape, dtype=dtype, device=device).uniform_(lo, hi)


def he_scaled(weight: Tensor) -> Tensor:
    """``weight`` rescaled to He's variance ``2 / fan_in`` (unchanged when it is all zero)."""
    std = float(weight.detach().double().std()) if weight.numel() > 1 else 0.0
    if not math.isfinite(std) or std == 0.0:
        return weight
    return weight * (math.sqrt(2.0 / max(_init_fan_in(weight), 1)) / std)


def _init_fan_in(weight: Tensor) -> int:
    """Fan-in as torch.nn.init counts it (the convention its initialisers scale by)."""
    return nn.init._calculate_fan_in_and_fan_out(weight)[0] if weight.dim() >= 2 else weight.numel()


def scaled_shift_interval(fan_in: int) -> tuple[float, float]:
    """The paper's 9-octave shift interval, placed for a layer's scale (``max_shift="auto"``).

    With ``shift ~ U(t - 9, t)`` and ``sign ~ U(-1, 1)`` (half the weights zero), the weights'
    mean square is ``(4**t - 4**(t - 9)) / (2 * 9 * ln 4)``; ``t`` makes it ``2 / fan_in``, the
    variance that keeps a ReLU network's activations at scale (He et al. 2015). The paper's
    ``U(-10, -1)`` is about this for its MNIST layers (fan-in 784: ``t = -2``); a fixed offset
    from the layer's largest initial weight is not: multiplicative updates then need thousands
    of steps to grow a network that starts too small.
    """
    width = PAPER_SHIFT_INIT[1] - PAPER_SHIFT_INIT[0]
    mean_square = 2.0 / max(int(fan_in), 1)
    t = 0.5 * math.log2(mean_square * 2 * width * math.log(4.0) / (1 - 4.0**-width))
    return (t - width, t)


@torch.no_grad()
def auto_max_shift(weight: Tensor, config: QConfig | PSConfig, tolerance: float = 0.0) -> int:
    """The ``p_max`` whose window rounds ``weight`` with the least squared error.

    With ``tolerance > 0``: the highest ``p_max`` whose error is at most ``1 + tolerance`` times
    the least (headroom for weights that will grow; used from scratch).

    Candidates run from two above to ``R + 1`` below ``round(log2 max|w|)`` (``R + 1`` is the
    window's width), within ``[-16, 16]``; among equal errors (weights that are already powers
    of two fit several windows) the one nearest ``round(log2 max|w|)`` wins. An all-zero (or
    empty) weight gets 0.
    """
    w = weight.detach().to(torch.float64)
    finite = w[torch.isfinite(w)]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    if top == 0.0:
        return 0
    m = round(math.log2(top))
    width = config.num_shifts
    scored = []
    for p_max in range(max(m - width - 1, -MAX_SHIFT_LIMIT), min(m + 2, MAX_SHIFT_LIMIT) + 1):
        shift, sign = q_shift_sign(finite, config.range_below(p_max))
        err = float((finite - sign * torch.exp2(shift)).square().sum())
        scored.append((err, abs(p_max - m), -p_max))
    if not scored:
        return max(-MAX_SHIFT_LIMIT, min(m, MAX_SHIFT_LIMIT))
    least = min(scored)
    if tolerance > 0:
        return max(-s[2] for s in scored if s[0] <= least[0] * (1 + tolerance))
    return -least[2]


def shift_layers(model: nn.Module) -> list[tuple[str, nn.Module, QConfig | PSConfig]]:
    """``(qualified_name, module, config)`` of every converted Linear and convolution layer in
    ``model``, in module order (the layers :func:`deepshift.freeze_` turns into integer layers;
    :func:`shift_tensors` lists attention and recurrent weights too)."""
    return [
        (name, m, p.config)
        for name, m in model.named_modules()
        if (p := _shift_parametrization(m)) is not None
    ]


def shift_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str, QConfig | PSConfig]]:
    """``(qualified module name, module, tensor name, config)`` of every shift weight in ``model``:
    the ``weight`` of Linear and convolution layers, attention projections, recurrent gate weights.

    Example:
        >>> import torch, deepshift
        >>> net = deepshift.convert_(torch.nn.GRU(4, 8), deepshift.PSConfig())
        >>> [t for _, _, t, _ in deepshift.shift_tensors(net)]
        ['weight_ih_l0', 'weight_hh_l0']
    """
    return [
        (name, m, n, p.config)
        for name, m in model.named_modules()
        for n in matmul_weight_names(m)
        if (p := _shift_parametrization(m, n)) is not None
    ]


def shift_parameters(module: nn.Module, name: str = "weight") -> dict[str, nn.Parameter]:
    """The stored parameters behind a shift weight (``name``: see :func:`matmul_weight_names`).

    Q: ``{"weight": float weight}``; PS: ``{"shift": ..., "sign": ...}``.
    """
    p = _require_shift(module, name)
    originals = getattr(module.parametrizations, name)
    if isinstance(p, ShiftQ):
        return {"weight": originals.original}
    return {"shift": originals.original0, "sign": originals.original1}


@torch.no_grad()
def shift_and_sign(module: nn.Module, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Integer shift ``p`` and sign ``s`` (both int16 tensors) of a shift weight at evaluation.

    ``effective_weight(module, name) == s * 2**p`` exactly; ``s`` is 0 only for PS zero weights.
    """
    p = _require_shift(module, name)
    params = shift_parameters(module, name)
    if isinstance(p, ShiftQ):
        shift, sign = q_shift_sign(params["weight"], p.shift_range)
    else:
        shift, sign = ps_shift_sign(params["shift"], params["sign"], p.shift_range)
    return shift.to(torch.int16), sign.to(torch.int16)


@torch.no_grad()
def effective_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """The exact power-of-two weight tensor a shift layer uses at evaluation (no grad); ``name``
    picks an attention or recurrent layer's tensor.

    Deterministic whatever the module's mode: stochastic rounding only ever happens inside a
    training-mode forward pass.

    Example:
        >>> import torch, deepshift
        >>> layer = deepshift.convert_(torch.nn.Linear(4, 2), deepshift.QConfig())
        >>> w = deepshift.effective_weight(layer)
        >>> bool(((w.abs().log2() % 1) == 0).all())
        True
    """
    shift, sign = shift_and_sign(module, name)
    dtype = next(iter(shift_parameters(module, name).values())).dtype
    return sign.to(dtype) * torch.exp2(shift.to(dtype))
