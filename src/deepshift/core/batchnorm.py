"""BatchNorm scales as sums of signed powers of two, and a short fine-tune that trains with them.

An integer-only model (:func:`deepshift.integer_only`) turns each BatchNorm's per-channel scale
``gamma / sqrt(running_var + eps)`` into a sum of ``scale_terms`` signed powers of two (each term
a shift of the conv's sums). With three terms the rounding costs nothing measurable; with one or
two it can cost points (results/integer.md: a 5-bit ResNet-20 loses 17 points with one term).
:func:`finetune_batchnorm_` trains the model for a few hundred steps with exactly those rounded
scales in its forward (straight-through gradients), so the weights and the BatchNorm biases
absorb the rounding, and leaves every scale at its rounded value: the float model, its frozen
form and its integer-only form then compute the same function.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Terms of a power-of-two sum more than this many bits below its leading term are dropped: a scale
# computed from float32 weight and variance is known to about 2**-24 of itself, so smaller terms
# are its rounding noise. Compared on the terms' exponents (exact), so that a fine-tuned k-term scale
# stored as a float32 weight decomposes again into the same k terms.
_TERM_SPAN = 20


def power_terms(values: Tensor, terms: int) -> tuple[Tensor, Tensor]:
    """Each of ``values`` as a sum of up to ``terms`` signed powers of two, greedily (the largest
    first, each the power of two nearest to what remains): ``(signs, exponents)``, both
    ``(terms, len(values))`` int64 on the CPU, ``signs`` in {-1, 0, 1}. Zero gets no terms.

    Example:
        >>> import torch
        >>> signs, exps = power_terms(torch.tensor([0.75, 3.0, -0.3]), 2)
        >>> terms_value(signs, exps).tolist()   # 1 - 1/4, 4 - 1, -(1/4 + 1/16)
        [0.75, 3.0, -0.3125]
    """
    rest = values.detach().double().cpu().reshape(-1).clone()
    signs = torch.zeros(terms, rest.numel(), dtype=torch.int64)
    exps = torch.zeros(terms, rest.numel(), dtype=torch.int64)
    lead = None  # the first term's exponent
    for k in range(terms):
        mag = rest.abs()
        live = mag > 0
        lo = torch.floor(torch.log2(torch.where(live, mag, 1.0)))
        # The nearer of 2**lo and 2**(lo + 1) (in value, not in log: what is left is subtracted).
        e = torch.where(mag - torch.exp2(lo) > torch.exp2(lo + 1) - mag, lo + 1, lo)
        if lead is not None:  # a term below the span is rounding noise of a float32 value
            live &= e >= lead - _TERM_SPAN
        s = torch.where(live, torch.sign(rest), 0.0)
        signs[k] = s.to(torch.int64)
        exps[k] = torch.where(live, e, 0.0).to(torch.int64)
        rest = rest - s * torch.exp2(e)
        if lead is None:
            lead = e
    return signs, exps


def terms_value(signs: Tensor, exps: Tensor) -> Tensor:
    """The float64 values that :func:`power_terms` represents."""
    return (signs.double() * torch.exp2(exps.double())).sum(0)


def _std(norm: nn.Module) -> Tensor:
    return torch.sqrt(norm.running_var.double() + norm.eps)


def batchnorm_scale(norm: nn.Module) -> Tensor:
    """The eval-mode per-channel scale ``weight / sqrt(running_var + eps)`` of a BatchNorm (or a
    :class:`~deepshift.FrozenBatchNorm`), float64, as the integer-only conversion computes it."""
    std = _std(norm)
    return (norm.weight.double() if norm.weight is not None else torch.ones_like(std)) / std


def _check_terms(scale_terms) -> None:
    if isinstance(scale_terms, bool) or not isinstance(scale_terms, int) or not 1 <= scale_terms <= 8:
        raise ValueError(f"scale_terms must be an int in [1, 8], got {scale_terms!r}")


def check_finetune_args(scale_terms, steps, lr) -> None:
    """:func:`finetune_batchnorm_`'s checks of its settings (ValueError), for callers that want them
    before loading data (``deepshift finetune-bn``)."""
    _check_terms(scale_terms)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        if m.running_var is None:
            raise ValueError(f"{type(m).__name__} without running statistics (track_running_stats="
                             "False) has no fixed scale to round")
    return norms


def _rounded_weight(norm: nn.modules.batchnorm._BatchNorm, scale_terms: int) -> Tensor:
    """The BatchNorm weight whose scale is the ``scale_terms``-term rounding of the current one."""
    std = _std(norm)
    target = terms_value(*power_terms(batchnorm_scale(norm), scale_terms)).to(std.device)
    return (target * std).to(norm.running_var.dtype)


def _rounded_forward(norm: nn.modules.batchnorm._BatchNorm, scale_terms: int, x: Tensor) -> Tensor:
    # Eval-mode BatchNorm (the running statistics are what the integer model uses, so they stay
    # fixed) with the rounded scale; the weight's gradient passes straight through the rounding
    # (the scale is linear in the weight). ``target + (w - w.detach())`` is ``target`` exactly.
    target = _rounded_weight(norm, scale_terms)
    w = target if norm.weight is None else target + (norm.weight - norm.weight.detach())
    return F.batch_norm(x, norm.running_mean, norm.running_var, w, norm.bias, False, 0.0, norm.eps)


def round_batchnorm_scales_(model: nn.Module, scale_terms: int) -> nn.Module:
    """Set every BatchNorm's weight so that its scale is a sum of ``scale_terms`` signed powers of
    two (the rounding :func:`deepshift.integer_only` applies), in place; no training.
    BatchNorms without affine weights keep their scale (the integer conversion rounds it alike)."""
    _check_terms(scale_terms)
    with torch.no_grad():
        for norm in _norms(model):
            if norm.weight is not None:
                norm.weight.copy_(_rounded_weight(norm, scale_terms))
    return model


def finetune_batchnorm_(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    scale_terms: int,
    steps: int = 1000,
    lr: float = 1e-4,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    progress: bool = False,
) -> dict[str, Any]:
    """BatchNorm-aware fine-tune, in place: train ``model`` for ``steps`` optimizer steps with
    every BatchNorm's scale rounded to ``scale_terms`` signed powers of two in the forward, then
    leave each scale at its rounded value.

    Made for a converted (shift) model before :func:`deepshift.freeze_` and
    :func:`deepshift.integer_only` with the same ``scale_terms``: the integer-only model's
    BatchNorm steps then compute the scales the fine-tune trained with. Every trainable parameter
    learns (shift weights through their own straight-through rounding, BatchNorm weights and
    biases) with Adam at ``lr``, PS parameters kept in range (:func:`deepshift.clamp_parameters_`);
    the BatchNorms stay in eval mode (their running statistics are constants of the integer model)
    and the other modules train. ``batches`` yields ``(input, target)`` pairs and is iterated again
    when exhausted (an iterator is read once). The defaults (1000 steps, lr 1e-4) were chosen on the
    validation split of a Fashion-MNIST ResNet-20 with one term (results/integer.md). Returns
    ``{"steps", "first_loss", "last_loss", "seconds"}`` (the losses averaged over the first and last
    tenth of the steps).

    Example:
        >>> import torch, deepshift
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
        ...                           torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
        >>> _ = deepshift.convert_(net, deepshift.QConfig(weight_bits=5))
        >>> data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(4)]
        >>> info = deepshift.finetune_batchnorm_(net, data, scale_terms=1, steps=8)
        >>> s = net[1].weight / torch.sqrt(net[1].running_var + net[1].eps)
        >>> bool(torch.allclose(s.abs(), torch.exp2(torch.round(s.abs().log2()))))   # one power of two
        True
    """
    check_finetune_args(scale_terms, steps, lr)
    from deepshift.core.optim import clamp_parameters_, param_groups
    from deepshift.frozen.layers import is_frozen_layer

    if any(is_frozen_layer(m) for m in model.modules()):
        raise ValueError("finetune_batchnorm_ needs a trainable (converted, not frozen) model: fine-tune "
                         "before freeze_")
    norms = _norms(model)
    if not norms:
        raise ValueError("the model has no BatchNorm (nn.BatchNorm1d/2d/3d): its integer-only form has "
                         "no scales to round, so there is nothing to fine-tune")
    modes = {m: m.training for m in model.modules()}
    opt = torch.optim.Adam(param_groups(model, lr=lr))
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for norm in norms:
        norm.eval()
        # an instance attribute: nn.Module.__call__ finds it before the class's forward
        norm.forward = lambda x, norm=norm: _rounded_forward(norm, scale_terms, x)
    try:
        from tqdm import tqdm

        bar = tqdm(total=steps, disable=not progress, leave=False,
                   desc=f"BatchNorm fine-tune ({scale_terms} term{'s' * (scale_terms > 1)})")
        while len(losses) < steps:
            before = len(losses)
            for x, y in batches:
                loss = loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tune diverged at step {len(losses) + 1} (loss "
                                             f"{float(loss)}); lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                clamp_parameters_(model)
                losses.append(float(loss.detach()))
                bar.update(1)
                if len(losses) == steps:
                    break
            if len(losses) == before:
                raise ValueError("batches yielded no batch")
            if iter(batches) is batches:  # an iterator: read once
                break
        bar.close()
    finally:
        for norm in norms:
            del norm.forward
        for m, was in modes.items():
            m.train(was)
    round_batchnorm_scales_(model, scale_terms)
    tenth = max(1, len(losses) // 10)
    return {"steps": len(losses), "first_loss": sum(losses[:tenth]) / tenth,
            "last_loss": sum(losses[-tenth:]) / tenth, "seconds": time.perf_counter() - t0}
