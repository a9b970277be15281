"""Post-training calibration of a converted model from unlabelled inputs: per-layer windows,
adaptive rounding between neighbouring powers of two, bias correction, BatchNorm statistics."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from deepshift.core.config import PSConfig
from deepshift.core.convert import _shift_parametrization, shift_layers, shift_parameters
from deepshift.core.parametrizations import FixedPointBias, FixedPointInput, ShiftQ
from deepshift.core.quantize import q_shift_sign

# Rectified sigmoid of adaptive rounding (Nagel et al. 2020, "Up or Down?"): its stretch past
# [0, 1] lets the soft choice reach a hard 0 or 1 with a finite variable.
_ZETA, _GAMMA = 1.1, -0.1
# Adam's step size on the rounding variables (tuned on Fashion-MNIST validation, results/ptq.md).
_LR = 3e-2
# Multiply-accumulates of one adaptive-rounding step's forward (its backward costs about as much):
# a step takes as many samples of a batch as fit, at least one, so that the steps of a large model
# (ResNet-50 at 224x224: ~76M per image and layer) stay in minutes on 2 cores while a small one's
# take whole batches of a few dozen samples.
_STEP_MACS = 2**27
# Candidate per-channel factors 2**(j / _SCALES) folded into a following BatchNorm, each scored
# on as many calibration samples as take _SCALE_MACS multiply-accumulates in the layer.
_SCALES = 16
_SCALE_MACS = 2**29
# Memory for the tensors one capture pass keeps (a group of layers' inputs and float outputs).
_CAPTURE_BYTES = 2**31


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def _inputs(batches: Iterable[Any], max_samples: int) -> list[Tensor]:
    """The calibration inputs as a list of batches (up to ``max_samples`` samples), checked."""
    if isinstance(batches, Tensor):
        raise TypeError("batches must be an iterable of input tensors (e.g. a DataLoader or a list), "
                        "not a single tensor: wrap it as [x]")
    out, count = [], 0
    for i, item in enumerate(batches):
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, Tensor):
            raise TypeError(f"calibration batch {i} is a {type(x).__name__}, not a tensor (or a tuple "
                            "whose first item is the input tensor)")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"calibration batch {i} has shape {tuple(x.shape)}: no samples")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"calibration batch {i} holds NaN or infinite values")
        x = x[: max_samples - count]
        out.append(x)
        count += x.shape[0]
        if count >= max_samples:
            break
    if not out:
        raise ValueError("calibrate_ got no calibration inputs: batches is empty or exhausted")
    return out


def _run(model: nn.Module, xs: list[Tensor]) -> None:
    for i, x in enumerate(xs):
        try:
            model(x)
        except _Stop:
            pass
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"the model's forward failed on calibration batch {i} (shape "
                             f"{tuple(x.shape)}, {x.dtype}): {exc}") from exc


def _layer_fn(module: nn.Module):
    """``f(x, weight, bias)``: the layer's forward with another weight."""
    kind = parametrize.type_before_parametrizations(module)
    if kind.forward in (nn.Linear.forward, *(c.forward for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d))):
        if isinstance(module, nn.Linear):
            return F.linear
        return module._conv_forward
    if kind.forward in (c.forward for c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(module.kernel_size) - 1]
        return lambda x, w, b: fn(x, w, b, module.stride, module.padding, module.output_padding,
                                  module.groups, module.dilation)
    # A subclass with its own forward (e.g. a convolution that pads its input first): that forward,
    # run on a plain instance of its class whose weight and bias are the ones given.
    shell = object.__new__(kind)
    shell.__dict__ = dict(module.__dict__)
    shell._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}

    def call(x, w, b):  # forward itself, not the module call: its hooks (input rounding) ran already
        shell._parameters = {"weight": w, "bias": b}
        return kind.forward(shell, x)
    return call


def _capture(model: nn.Module, modules: list[nn.Module], xs: list[Tensor], outputs: bool
             ) -> dict[int, list[Tensor]]:
    """What each of ``modules`` receives (its input, after its fixed-point rounding if any) or, with
    ``outputs``, returns, per batch of ``xs``, by module id: one forward pass per batch that stops
    once every module has run (a module called twice keeps its first call). A module that does not
    run on every batch is left out."""
    seen: dict[int, list[Tensor]] = {id(m): [] for m in modules}
    batch = [0]

    def record(mod, value):
        kept = seen[id(mod)]
        if len(kept) == batch[0]:
            kept.append(value.detach())
            if all(len(v) > batch[0] for v in seen.values()):
                raise _Stop

    if outputs:
        handles = [m.register_forward_hook(lambda mod, _args, out: record(mod, out)) for m in modules]
    else:  # pre-hooks run after convert_'s rounding hook, registered first
        handles = [m.register_forward_pre_hook(lambda mod, args: record(mod, args[0])) for m in modules]
    try:
        with torch.no_grad():
            for i, x in enumerate(xs):
                batch[0] = i
                _run(model, [x])
    finally:
        for h in handles:
            h.remove()
    return {key: v for key, v in seen.items() if len(v) == len(xs)}


def _groups(order: list[int], in_bytes: dict[int, int], feeds: dict[int, set[int]] | None,
            budget: int) -> list[list[int]]:
    """Layers (ids, in calibration order) in runs whose inputs one capture pass can serve: with
    ``feeds`` (the layers whose outputs reach each one), a run holds no layer that another in it
    feeds, so calibrating one leaves the others' inputs as captured; without it (the float model,
    which never changes) any run; each run's captured bytes within ``budget``."""
    out: list[list[int]] = []
    used = 0
    for key in order:
        size = in_bytes.get(key, 0)
        group = out[-1] if out else None
        linked = feeds is not None and (key not in feeds or any(
            k not in feeds or k in feeds[key] or key in feeds[k] for k in group or ()))
        if group is None or used + size > budget or linked:
            out.append([key])
            used = size
        else:
            group.append(key)
            used += size
    return out


def _channel_dims(y: Tensor, module: nn.Module) -> tuple[int, ...]:
    # Every dimension but the output channels': the last for Linear, the second for convolutions.
    keep = y.dim() - 1 if isinstance(module, nn.Linear) else 1
    return tuple(d for d in range(y.dim()) if d != keep)


def _typical_error(outputs: list[Tensor], targets: list[Tensor], dims: tuple[int, ...]) -> Tensor:
    """The median output error per channel (``dims``: the others), what bias correction adds.

    Not the mean: in a transformer a few positions (the separator tokens) carry outputs hundreds of
    times larger than the rest in a few channels, and their errors would set those channels' mean
    error, which the bias then adds at every position: all-MiniLM-L6-v2 at 4 bits fell from 0.89
    to 0.64 mean cosine to the float embedding with the mean, and rose to 0.93 with the median."""
    channel = next(d for d in range(targets[0].dim()) if d not in dims)
    errors = torch.cat([(t - y).movedim(channel, -1).reshape(-1, t.shape[channel])
                        for y, t in zip(outputs, targets, strict=True)])
    return errors.median(0).values


def _outputs(fn, xs, weight, bias, targets) -> tuple[list[Tensor], float]:
    """The layer's outputs with ``weight`` and their summed squared error against ``targets``."""
    with torch.no_grad():
        ys = [fn(x, weight, bias) for x in xs]
        return ys, sum(float((y - t).square().sum()) for y, t in zip(ys, targets, strict=True))


def _neighbours(w: Tensor, shift_range: tuple[int, int], ps: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Sign and the two representable magnitudes around ``|w|`` (equal where only one applies)."""
    p_min, p_max = shift_range
    mag = w.abs()
    low_exp = torch.floor(torch.log2(mag.clamp(2.0**p_min, 2.0**p_max))).clamp(p_min, p_max)
    low = torch.exp2(low_exp)
    high = torch.exp2((low_exp + 1).clamp(max=p_max))
    below = mag < 2.0**p_min
    if ps:  # PS also holds zero: weights below the window lie between 0 and 2**p_min
        low = torch.where(below, torch.zeros_like(low), low)
        high = torch.where(below, torch.full_like(high, 2.0**p_min), high)
        high = torch.where(mag == 0, torch.zeros_like(high), high)
    else:
        high = torch.where(below, low, high)
    sign = torch.where(w < 0, -1.0, 1.0).to(w.dtype)
    if ps:
        sign = torch.where(mag == 0, torch.zeros_like(sign), sign)
    return sign, low, high


def _samples_within(xs: list[Tensor], targets: list[Tensor], w: Tensor, macs: int) -> tuple[int, bool]:
    """How many samples one pass over the layer may take to stay near ``macs`` multiply-
    accumulates (at least one), and whether the inputs have a sample dimension to take them from."""
    # Per sample: output elements x weights each one reads (the fan-in).
    per_sample = targets[0][0].numel() * (w[0].numel() if w.dim() > 1 else 1)
    # A Linear's leading dimensions are rows; a convolution's input is batched when it has the
    # weight's number of dimensions (an unbatched one has no sample dimension to subset).
    batched = xs[0].dim() >= 2 and (w.dim() == 2 or xs[0].dim() == w.dim())
    return max(1, macs // max(per_sample, 1)), batched


def _adaptive_round(fn, xs, targets, w: Tensor, bias, shift_range, ps: bool, iters: int,
                    generator: torch.Generator) -> Tensor:
    """Chooses, for each weight, the power of two just below or just above it (or zero, PS) that
    minimises the layer's output error on ``xs``: adaptive rounding's soft relaxation, annealed to a
    hard choice."""
    sign, low, high = _neighbours(w, shift_range, ps)
    span = high - low
    movable = span > 0
    frac = torch.where(movable, (w.abs() - low) / torch.where(movable, span, 1.0), torch.zeros_like(w))
    # The variable whose rectified sigmoid starts at the weight's own position between the two.
    p = ((frac.clamp(0, 1) - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=_LR)
    scale = sum(float(t.square().mean()) for t in targets) / len(targets) or 1.0
    take, batched = _samples_within(xs, targets, w, _STEP_MACS)
    warmup = iters // 5
    for step in range(iters):
        i = int(torch.randint(len(xs), (1,), generator=generator))
        x, t = xs[i], targets[i]
        if batched and x.shape[0] > take:  # a random subset of the batch: same rows of input, target
            rows = torch.randperm(x.shape[0], generator=generator)[:take]
            x, t = x[rows], t[rows]
        h = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)
        wq = sign * (low + h * span)
        loss = (fn(x, wq, bias) - t).square().mean() / scale
        if step >= warmup:  # then push every choice to 0 or 1, ever harder (beta 20 -> 2)
            beta = 2 + 18 * (1 - (step - warmup) / max(iters - warmup, 1))
            loss = loss + 0.01 * (1 - (2 * h - 1).abs().pow(beta)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA) >= 0.5
        return sign * torch.where(hard, high, low)


def _write(module: nn.Module, weight: Tensor) -> None:
    """Stores exact powers of two (or zeros, PS) as the layer's parameters."""
    params = shift_parameters(module)
    with torch.no_grad():
        if "weight" in params:  # Q: float weights that round to themselves
            params["weight"].copy_(weight)
        else:
            mag = weight.abs()
            p_min = _shift_parametrization(module).shift_range[0]
            params["shift"].copy_(torch.where(mag > 0, torch.log2(mag.clamp_min(2.0**p_min)), float(p_min)))
            params["sign"].copy_(torch.sign(weight))


def _float_copy(model: nn.Module) -> nn.Module:
    """The float model behind a converted DeepShift-Q model: its float weights and biases, float
    activations (the fixed-point rounding hooks removed)."""
    float_model = copy.deepcopy(model)
    for module in list(float_model.modules()):
        if isinstance(module, parametrize.ParametrizationList):
            # Identity in place of the rounding (not remove_parametrizations, which edits the
            # parametrized class that copies share with the original).
            for i, step in enumerate(module):
                if isinstance(step, (ShiftQ, FixedPointBias)):
                    module[i] = nn.Identity()
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, FixedPointInput):
                del module._forward_pre_hooks[key]
    return float_model.eval()


@dataclass
class _Probe:
    """What one small forward pass tells about the layers (by module id)."""

    norm_after: dict[int, nn.Module] = field(default_factory=dict)  # the BatchNorm on its output
    in_bytes: dict[int, int] = field(default_factory=dict)  # its input's size
    out_bytes: dict[int, int] = field(default_factory=dict)  # its output's size
    feeds: dict[int, set[int]] = field(default_factory=dict)  # the layers whose outputs reach its input


def _probe(model: nn.Module, layers: list[nn.Module], x: Tensor) -> _Probe:
    """One forward pass on ``x`` that finds, whatever the model's code: the BatchNorm (in eval,
    running statistics) that takes each layer's output directly, by the output tensor's identity;
    which layers' outputs reach each layer's input (each output enters the graph as its own leaf,
    so a gradient from an input finds the nearest layers it depends on); the tensors' sizes."""
    found = _Probe()
    # The layers' output tensors, held for the whole pass: a freed one's id() could be taken by a
    # later tensor (say, an unconverted layer's output) and pair a BatchNorm with the wrong layer.
    outputs: dict[int, tuple[Tensor, nn.Module]] = {}
    leaves: dict[int, Tensor] = {}

    def after_layer(mod, args, out):
        key = id(mod)
        if key in leaves:  # called again: keep its first call
            return None
        inp = args[0]
        direct: set[int] = set()
        if inp.requires_grad and leaves:
            keys = list(leaves)
            grads = torch.autograd.grad(inp.sum(), [leaves[k] for k in keys], allow_unused=True,
                                        retain_graph=True)
            direct = {k for k, g in zip(keys, grads, strict=True) if g is not None}
        found.feeds[key] = direct.union(*(found.feeds[k] for k in direct))
        found.in_bytes[key] = inp.numel() * inp.element_size()
        found.out_bytes[key] = out.numel() * out.element_size()
        leaves[key] = out.detach().requires_grad_(True)
        result = leaves[key].clone()  # not the leaf itself: the model may change it in place
        outputs[id(result)] = (result, mod)
        return result

    def before_norm(mod, args):
        tensor, layer = outputs.get(id(args[0]), (None, None))
        if tensor is args[0] and mod.running_mean is not None and not mod.training:
            found.norm_after[id(layer)] = mod

    handles = [m.register_forward_hook(after_layer) for m in layers]
    handles += [m.register_forward_pre_hook(before_norm) for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.enable_grad():
            _run(model, [x])
    finally:
        for h in handles:
            h.remove()
    return found


def _match_batchnorm(norm: nn.Module, outputs: list[Tensor], targets: list[Tensor], dims: tuple[int, ...],
                     variance: bool) -> None:
    """Sets the statistics of the BatchNorm after a converted layer so that it normalises the
    layer's outputs (on the calibration inputs) as it normalised the float layer's: a channel whose
    outputs moved by ``d`` and scaled by ``r`` gets ``mean + d`` (``mean`` moved within the spread
    ``r``) and ``var * r**2``. With outputs equal to the float ones nothing changes."""
    def moments(ts):
        flat = torch.cat([t.movedim(1 if t.dim() > 1 else 0, 0).reshape(t.shape[1 if t.dim() > 1 else 0], -1)
                          for t in ts], dim=1).double()
        return flat.mean(1), flat.std(1, unbiased=False)

    if dims != tuple(d for d in range(outputs[0].dim()) if d != 1):
        return  # a Linear's channels are last: BatchNorm1d over (N, C) only
    m_q, s_q = moments(outputs)
    m_f, s_f = moments(targets)
    ratio = torch.where(s_f > 1e-12, s_q / s_f.clamp_min(1e-12), torch.ones_like(s_f)) if variance \
        else torch.ones_like(s_f)
    mean = norm.running_mean.double()
    norm.running_mean.copy_(m_q - (m_f - mean) * ratio)
    if variance:
        norm.running_var.copy_(norm.running_var.double() * ratio.square())


def calibrate_(
    model: nn.Module,
    batches: Iterable[Any],
    reference: nn.Module | None = None,
    max_samples: int = 256,
    iters: int = 300,
    adaptive: bool = True,
    bias_correction: bool = True,
    batchnorm: bool = True,
    channel_scales: bool = False,
    seed: int = 0,
    progress: bool = True,
    stats: list[dict[str, Any]] | None = None,
) -> nn.Module:
    """Post-training calibration of a converted model from unlabelled inputs, in place.

    For each shift layer (Linear and convolutions, in module order), with the float model's output
    of that layer as the target and the inputs the layer receives from the layers calibrated before
    it (so each layer also makes up for their error):

    * **channel scales** (with ``channel_scales``): where a BatchNorm takes the layer's output, each
      output channel's weights are multiplied by the factor in [1/2, 2) whose rounding gives that
      channel the least output error, and the BatchNorm's statistics by the same factor;
    * **window**: with ``max_shift="auto"``, the ``p_max`` (as placed, one below, one above) whose
      rounding gives the least output error (for PS, rounding that makes weights nearer 0 than the
      window's lowest power zero: at 2 bits, weights 0 and +-2**p, this window is often a step
      above the one that suits +-2**p alone);
    * **adaptive rounding**: each weight takes the power of two just below or just above it (or
      zero, PS) so as to minimise the layer's output error (a soft relaxation annealed to a hard
      choice, as AdaRound does, here between neighbouring powers of two); kept only where its error
      is below plain rounding's, so no layer's error grows;
    * **bias correction**: the median output error per channel goes into the layer's bias (the
      median, so that a few outlier positions, like a transformer's separator tokens, do not set
      it for all);
    * **BatchNorm statistics**: a BatchNorm that takes the layer's output gets the statistics that
      normalise the converted layer's outputs as the float ones were normalised (their mean shift,
      and with ``batchnorm=True`` their change of spread, on the calibration inputs).

    Weights stay exact signed powers of two within each layer's window; the result depends only on
    the inputs and ``seed``. Layers that do not feed each other (found by one small gradient pass)
    share a capture pass; each adaptive-rounding step reads a random part of one batch, as many
    samples as keep a step's cost near 2**27 multiply-accumulates (a whole batch for small models).
    Every position of every input counts: pass sequence batches without padding (e.g. texts of
    equal length together), or padded positions pull the bias corrections towards them.

    The float model is ``reference`` (the model the converted one came from, same module names),
    which PS needs: PS keeps no float weights; a DeepShift-Q model without ``reference`` uses its
    own float weights. Attention and recurrent shift weights keep their plain rounding.

    Args:
        model: a converted (:func:`deepshift.convert_`), not frozen, model.
        batches: an iterable of input tensors, or of tuples whose first item is the input (a
            ``DataLoader`` of ``(x, y)`` works; labels are not used).
        reference: the float model (required for PS).
        max_samples: how many samples to use (the first ones ``batches`` yields). More help a large
            CNN: 1,024 rather than 256 bring EfficientNet-Lite0 at 5 bits within 1 point of float
            (results/ptq.md), calibrating 2-3x as long.
        iters: optimisation steps of adaptive rounding per layer.
        channel_scales: where a BatchNorm takes a layer's output, give each output channel the
            factor in [1/2, 2) that brings its weights nearest to powers of two and fold its inverse
            into the BatchNorm (the model's function is unchanged; the weights stay powers of two).
            Off by default: on a Fashion-MNIST ResNet-20 (``deepshift calibrate`` with and without
            ``--channel-scales``, validation top-1, float 90.93) it took 3-bit from 89.72 to 90.20
            but 5-bit from 90.13 to 89.77, and EfficientNet-Lite0 5-bit calibrated 3.6x slower for
            no gain in its probe accuracy (83.25 on test either way).
        adaptive, bias_correction, batchnorm: switch each step off (``batchnorm=False`` keeps the
            BatchNorm variances; bias correction still moves the means of BatchNorms after layers
            without a bias).
        seed: seeds the choice of batches in each step.
        progress: a progress bar over the layers (tqdm).
        stats: a list to append ``{"layer", "plain", "calibrated"}`` per layer (squared output error
            on the calibration inputs, summed).

    Raises ValueError / TypeError with the model left as it was (the work is done on a copy; an
    interrupted run, Ctrl-C included, changes nothing): no shift layers, frozen layers, empty or
    exhausted ``batches``, NaN or infinite inputs, inputs the model cannot take, PS without
    ``reference``.

    Example:
        >>> import torch, deepshift
        >>> _ = torch.manual_seed(0); net = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> _ = deepshift.convert_(net, deepshift.QConfig(weight_bits=3, max_shift="auto"))
        >>> errors = []
        >>> _ = deepshift.calibrate_(net, [torch.randn(64, 8)], progress=False, stats=errors)
        >>> errors[0]["calibrated"] <= errors[0]["plain"]
        True
    """
    from tqdm import tqdm

    from deepshift.frozen.layers import is_frozen_layer

    if any(is_frozen_layer(m) for m in model.modules()):
        raise ValueError("calibrate_ needs a converted model that is not frozen: calibrate before freeze_")
    layers = shift_layers(model)
    if not layers:
        raise ValueError("calibrate_ found no shift layers: convert_ the model first")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    ps_layers = [name for name, _, cfg in layers if isinstance(cfg, PSConfig)]
    if ps_layers and reference is None:
        raise ValueError("calibrate_ needs reference= (the float model) for DeepShift-PS layers "
                         f"({', '.join(ps_layers[:4])}): PS keeps no float weights")
    xs = _inputs(batches, max_samples)
    if reference is not None:
        for name, module, _ in layers:
            try:
                w = reference.get_submodule(name).weight
            except AttributeError as exc:
                raise ValueError(f"reference has no layer {name!r} with a weight") from exc
            if not isinstance(w, Tensor) or w.shape != module.weight.shape:
                raise ValueError(f"reference layer {name!r} has a weight of another shape "
                                 f"({getattr(w, 'shape', None)} vs {tuple(module.weight.shape)})")
        float_model = copy.deepcopy(reference).eval()
    else:
        float_model = _float_copy(model)
    work = copy.deepcopy(model).eval()
    steps = _Steps(adaptive, iters, bias_correction, batchnorm, channel_scales,
                   torch.Generator().manual_seed(seed), stats)
    work_layers = shift_layers(work)
    probe_x = xs[0][:2]
    probe = _probe(work, [m for _, m, _ in work_layers], probe_x)
    # Captured tensors scale with the calibration inputs.
    scale = sum(x.numel() for x in xs) / max(probe_x.numel(), 1)
    order = [id(m) for _, m, _ in work_layers]
    in_bytes = {k: int(v * scale) for k, v in probe.in_bytes.items()}
    out_bytes = {k: int(v * scale) for k, v in probe.out_bytes.items()}
    # A layer's inputs come from the layers calibrated before it (captured again after each
    # group of layers that do not feed each other); its targets, the float model's outputs, are
    # captured for as many layers as fit in memory at once.
    work_groups = _groups(order, in_bytes, probe.feeds, _CAPTURE_BYTES)
    float_groups = _groups(order, out_bytes, None, _CAPTURE_BYTES)
    float_group_of = {key: i for i, group in enumerate(float_groups) for key in group}
    by_id = {id(m): (name, m, cfg) for name, m, cfg in work_layers}
    float_of = {id(m): float_model.get_submodule(name) for name, m, _ in work_layers}
    targets: dict[int, list[Tensor]] = {}
    bar = tqdm(total=len(work_layers), desc="calibrate", disable=not progress, leave=False)
    for group in work_groups:
        for key in group:
            if key not in targets:
                keys = float_groups[float_group_of[key]]
                captured = _capture(float_model, [float_of[k] for k in keys], xs, outputs=True)
                targets.update({k: captured[id(float_of[k])] for k in keys if id(float_of[k]) in captured})
        inputs = _capture(work, [by_id[k][1] for k in group], xs, outputs=False)
        for key in group:
            name, module, cfg = by_id[key]
            bar.set_postfix_str(name)
            bar.update()
            if key in inputs and key in targets:
                _calibrate_layer(module, cfg, float_of[key], inputs.pop(key), targets.pop(key),
                                 probe.norm_after.get(key), steps, name)
    bar.close()
    model.load_state_dict(work.state_dict())
    return model


@dataclass
class _Steps:
    """calibrate_'s settings shared by every layer (see its arguments)."""

    adaptive: bool
    iters: int
    bias_correction: bool
    batchnorm: bool
    channel_scales: bool
    generator: torch.Generator
    stats: list[dict] | None


def _nearest(w: Tensor, shift_range: tuple[int, int]) -> Tensor:
    """Plain rounding: each weight's nearest power of two (in the log domain) within the window."""
    shift, sign = q_shift_sign(w, shift_range)
    return sign * torch.exp2(shift)


def _rounded(w: Tensor, shift_range: tuple[int, int], ps: bool) -> Tensor:
    """Plain rounding, and for PS zero where a weight lies nearer 0 than the window's lowest power."""
    q = _nearest(w, shift_range)
    if ps:
        q = torch.where(w.abs() < 2.0 ** (shift_range[0] - 1), torch.zeros_like(q), q)
    return q


def _per_channel(values: Tensor, like: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``values`` (one per output channel) shaped to broadcast against the output ``like``."""
    return values.reshape([-1 if d not in dims else 1 for d in range(like.dim())])


def _channel_scales(fn, xs, targets, w: Tensor, bias, shift_range, dims, norm: nn.Module) -> Tensor:
    """Per output channel, the factor ``a`` in [1/2, 2) (steps of 2**(1/16)) whose plain rounding of
    ``a * w`` gives that channel the least output error, measured after dividing by ``a`` again (what
    the BatchNorm after the layer does once it absorbs ``a``). Within [1, 2) the factor moves the
    weights against the powers of two; below 1 it also pulls a channel's largest weights under the
    layer's window top. ``a = 1`` is a candidate, so no channel's error grows."""
    # A factor below 1 must leave the BatchNorm a variance >= 0: a**2 * (var + eps) >= eps.
    lowest = (norm.eps / (norm.running_var.double() + norm.eps)).sqrt()
    # The samples that fit _SCALE_MACS per candidate (at least one batch's first sample): a
    # channel's error over many positions of a few dozen images ranks the factors as well as all.
    budget, batched = _samples_within(xs, targets, w, _SCALE_MACS)
    if batched:
        picked, count = [], 0
        for x, t in zip(xs, targets, strict=True):
            take = min(x.shape[0], budget - count)
            picked.append((x[:take], t[:take]))
            count += take
            if count >= budget:
                break
        xs, targets = [p[0] for p in picked], [p[1] for p in picked]
    best = best_error = None
    with torch.no_grad():
        for j in [0, *range(-_SCALES, 0), *range(1, _SCALES)]:
            a = 2.0 ** (j / _SCALES)
            wq = _nearest(w * a, shift_range)
            b = None if bias is None else bias * a
            error = sum(((fn(x, wq, b) / a - t).square()).sum(dims) for x, t in zip(xs, targets, strict=True))
            if best is None:
                best, best_error = torch.ones_like(error), error
            else:
                better = (error < best_error) & (lowest.to(error.device) <= a)
                best = torch.where(better, torch.full_like(best, a), best)
                best_error = torch.where(better, error, best_error)
    return best


def _scale_batchnorm(norm: nn.Module, scale: Tensor) -> None:
    """The BatchNorm after a layer whose outputs were multiplied by ``scale`` (per channel) computes
    what it did: its mean and its standard deviation sqrt(var + eps) multiply by the same factor."""
    with torch.no_grad():
        var = norm.running_var.double()
        s = scale.double()
        norm.running_mean.copy_(norm.running_mean.double() * s)
        norm.running_var.copy_(s.square() * (var + norm.eps) - norm.eps)


def _calibrate_layer(module, cfg, float_layer, inputs, targets, norm, steps: _Steps, name: str) -> None:
    """One layer: channel scales, window, adaptive rounding, bias correction, the BatchNorm after it."""
    param = _shift_parametrization(module)
    fn = _layer_fn(module)
    w = float_layer.weight.detach().to(module.weight.dtype)
    bias = None if module.bias is None else module.bias.detach()
    dims = _channel_dims(targets[0], module)
    # Plain rounding in the weight-placed window: what convert_ alone gives, the baseline no
    # calibrated layer may be worse than.
    start_range = param.shift_range
    plain = _nearest(w, start_range)
    plain_outputs, plain_error = _outputs(fn, inputs, plain, bias, targets)

    scale = None
    # A BatchNorm that takes the layer's output can absorb a per-channel factor: the weights of
    # channel c become a_c * w (rounded to powers of two), the BatchNorm divides by a_c again. A
    # depthwise channel has 9 or 25 weights; the factor that puts them nearest to powers of two
    # cuts its rounding error several times (EfficientNet-Lite0, results/ptq.md).
    if norm is not None and steps.channel_scales and not getattr(module, "transposed", False):
        scale = _channel_scales(fn, inputs, targets, w, bias, start_range, dims, norm)
        w = w * scale.reshape([-1] + [1] * (w.dim() - 1))
        base = fn

        def fn(x, weight, b, base=base):  # the layer's output in the original units
            y = base(x, weight, None if b is None else b * scale)
            return y / _per_channel(scale, y, dims)

    # Without channel scales, the weight-placed window's plain rounding is `plain`, evaluated above.
    def is_plain(rng) -> bool:
        return scale is None and tuple(rng) == tuple(start_range)

    ps = isinstance(cfg, PSConfig)
    tops = [start_range[1]]
    if cfg.auto_range:  # the window with the least output error, near the weight-placed one
        tops += [start_range[1] - 1, start_range[1] + 1]
    # Each window is scored by its plain rounding's output error; PS's rounding includes its zeros:
    # at 2 bits (weights 0 and +-2**p) the window that suits ternary weights lies a step above the
    # one that suits +-2**p alone, and scoring PS windows without zeros (as Q rounds) left
    # Fashion-MNIST mnist-conv 6.8 points below float on validation, against 2.2 (results/ptq.md).
    best = None
    for p_max in tops:
        rng = cfg.range_below(p_max)
        if is_plain(rng) and not ps:
            candidate, ys, error = plain, plain_outputs, plain_error
        else:
            candidate = _rounded(w, rng, ps)
            ys, error = _outputs(fn, inputs, candidate, bias, targets)
        if best is None or (error, p_max) < best[:2]:
            best = (error, p_max, candidate, ys)
    chosen_error, p_max, chosen, outputs = best
    if cfg.auto_range:
        param.set_max_shift_(p_max)
    if steps.adaptive and steps.iters > 0:
        candidate = _adaptive_round(fn, inputs, targets, w, bias, param.shift_range, ps, steps.iters,
                                    steps.generator)
        candidate_outputs, error = _outputs(fn, inputs, candidate, bias, targets)
        if error < chosen_error:
            chosen, chosen_error, outputs = candidate, error, candidate_outputs
    if chosen_error > plain_error:  # never worse than convert_ alone
        param.set_max_shift_(start_range[1])
        chosen, chosen_error, outputs, scale = plain, plain_error, plain_outputs, None
    _write(module, chosen)
    if steps.stats is not None:
        steps.stats.append({"layer": name, "plain": plain_error, "calibrated": chosen_error})
    with torch.no_grad():
        if module.bias is not None and (steps.bias_correction or scale is not None):
            # fixed point: the float original behind the rounding
            stored = module.parametrizations.bias.original if parametrize.is_parametrized(module, "bias") \
                else module.bias
            if steps.bias_correction:
                delta = _typical_error(outputs, targets, dims)
                stored.add_(delta)
                outputs = [y + _per_channel(delta, y, dims) for y in outputs]
            if scale is not None:  # the layer's own units: the BatchNorm after it divides by scale
                stored.mul_(scale)
        if norm is not None and (steps.batchnorm or steps.bias_correction):
            _match_batchnorm(norm, outputs, targets, dims, variance=steps.batchnorm)
        if scale is not None:
            _scale_batchnorm(norm, scale)
