"""A printable per-layer table of a converted model's shift layers (the training-time view)."""

from __future__ import annotations

from torch import nn

from deepshift.core.convert import float_weights, layer_shift_range, shift_and_sign, shift_tensors


def summary(model: nn.Module) -> str:
    """One line per shift weight: name, type, weight shape, method, bits, range, zeros, act bits.

    "shifts used" is the range of shift values actually present in the evaluation weights; the
    totals line counts the weights held as shifts and the parameters left in float, and a last
    line names the matrix weights left in float (:func:`deepshift.float_weights`), if any.

    Example:
        >>> import torch, deepshift
        >>> net = deepshift.convert_(torch.nn.Sequential(torch.nn.Linear(4, 3)), deepshift.QConfig())
        >>> print(deepshift.summary(net).splitlines()[0].split()[:3])
        ['layer', 'type', 'weight']
    """
    header = ("layer", "type", "weight shape", "method", "bits", "range", "shifts used", "zeros",
              "act bits")
    rows = []
    shift_weights = 0
    shift_param_ids = set()
    for name, module, tensor, cfg in shift_tensors(model):
        shift, sign = shift_and_sign(module, tensor)
        nonzero = sign != 0
        used = (f"[{int(shift[nonzero].min())}, {int(shift[nonzero].max())}]"
                if bool(nonzero.any()) else "-")
        lo, hi = layer_shift_range(module, tensor)
        label = name if tensor == "weight" else f"{name}.{tensor}".lstrip(".")
        rows.append((
            label or "(root)", type(module).__name__.removeprefix("Parametrized"),
            "x".join(str(d) for d in shift.shape), cfg.method.upper(), str(cfg.weight_bits),
            f"[{lo}, {hi}]", used, f"{100.0 * float((~nonzero).float().mean()):.1f}%",
            "-" if cfg.act_bits is None or tensor != "weight" else f"{cfg.act_bits[0]}.{cfg.act_bits[1]}",
        ))
        shift_weights += shift.numel()
        shift_param_ids.update(id(p) for p in getattr(module.parametrizations, tensor).parameters())
    float_params = sum(p.numel() for p in model.parameters() if id(p) not in shift_param_ids)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    lines.append(f"{len(rows)} shift tensors, {shift_weights} shift weights, "
                 f"{float_params} float parameters")
    left = float_weights(model)
    if left:
        lines.append(f"{len(left)} matrix weights left in float: " + ", ".join(n for n, _ in left))
    return "\n".join(lines)
