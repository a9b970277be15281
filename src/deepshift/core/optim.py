"""Optimizer helpers for shift networks: parameter groups and keeping PS parameters in range."""

from __future__ import annotations

import torch
from torch import nn

from deepshift.core.config import PSConfig
from deepshift.core.convert import layer_shift_range, shift_parameters, shift_tensors


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, lr_sign: float | None = None,
    lr_shift: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups for a converted model.

    * ``"params"``: every other trainable parameter (including Q's float weights), with
      ``weight_decay``.
    * ``"shift"``: PS shift parameters, no weight decay (decaying a log-domain value towards 0
      would push weights towards 1, not towards 0), learning rate ``lr_shift`` (default ``lr``).
    * ``"sign"``: PS sign parameters, no weight decay, learning rate ``lr_sign`` (default ``lr``).

    Empty groups are left out; frozen parameters (``requires_grad=False``) are skipped.
    Each group carries a ``"name"`` key for logging.

    Example:
        >>> import torch, deepshift
        >>> net = deepshift.convert_(torch.nn.Linear(4, 2), deepshift.PSConfig())
        >>> opt = torch.optim.RAdam(deepshift.param_groups(net, lr=0.01, lr_sign=0.001))
        >>> [g["name"] for g in opt.param_groups]
        ['params', 'shift', 'sign']
    """
    if lr <= 0 or any(v is not None and v <= 0 for v in (lr_sign, lr_shift)):
        raise ValueError(f"learning rates must be > 0, got lr={lr}, lr_sign={lr_sign}, lr_shift={lr_shift}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    shift, sign = [], []
    for _, module, tensor, config in shift_tensors(model):
        if isinstance(config, PSConfig):
            params = shift_parameters(module, tensor)
            shift.append(params["shift"])
            sign.append(params["sign"])
    special = {id(p) for p in shift + sign}
    others = [p for p in model.parameters() if id(p) not in special]
    groups = [
        {"name": "params", "params": others, "lr": lr, "weight_decay": weight_decay},
        {"name": "shift", "params": shift, "lr": lr if lr_shift is None else lr_shift, "weight_decay": 0.0},
        {"name": "sign", "params": sign, "lr": lr if lr_sign is None else lr_sign,
         "weight_decay": 0.0},
    ]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def clamp_parameters_(model: nn.Module) -> nn.Module:
    """Project PS parameters back into their ranges, in place; call it after ``optimizer.step()``.

    ``shift`` is clamped to the layer's ``[p_min, p_max]`` and ``sign`` to ``[-1, 1]``. Forward
    passes already clamp the values they use (and never modify parameters); this step only keeps
    the stored parameters from drifting far outside, where a straight-through gradient would
    need many steps to bring them back. Q layers need nothing.
    """
    for _, module, tensor, config in shift_tensors(model):
        if isinstance(config, PSConfig):
            params = shift_parameters(module, tensor)
            params["shift"].clamp_(*layer_shift_range(module, tensor))
            params["sign"].clamp_(-1.0, 1.0)
    return model
