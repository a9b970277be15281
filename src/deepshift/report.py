"""What a shift network saves: per-layer operations, bytes and an energy estimate, plus plots.

Operation counts come from one forward pass (hooks record every layer's input and output
shapes), so they are exact for the given input shape. Energies are per-operation figures from a
published 45 nm table (:data:`ENERGY_45NM_PJ`); pass your own table to :func:`savings_report`
to model other hardware.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deepshift.frozen.attention import ShiftMultiheadAttention
from deepshift.frozen.float_layers import ExactGlobalAvgPool, FrozenBatchNorm
from deepshift.frozen.freeze import frozen_copy
from deepshift.frozen.integer import is_deployed_shift_layer
from deepshift.frozen.layers import _FrozenShift, is_frozen_layer
from deepshift.models.transformer import SelfAttention
from deepshift.ops.codes import decode_codes

_BATCHNORM = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)
_AVG_POOL = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, ExactGlobalAvgPool)

REPORT_VERSION = 2  # 2: attention_mults

# Energy per operation in picojoules, 45 nm, 0.9 V. Source: M. Horowitz, "Computing's energy
# problem (and what we can do about it)", ISSCC 2014, Figure 1.1.9 (the same table the DeepShift
# paper and most efficiency papers quote). "shift" is not in that table: a barrel shift is
# assumed to cost what a 32-bit integer add costs (an assumption; substitute your own).
# "dram_byte" is the table's 1.3 nJ per 64-bit DRAM access divided by 8 (its low end).
ENERGY_45NM_PJ: dict[str, float] = {
    "int8_add": 0.03,
    "int32_add": 0.1,
    "fp16_add": 0.4,
    "fp32_add": 0.9,
    "int8_mult": 0.2,
    "int32_mult": 3.1,
    "fp16_mult": 1.1,
    "fp32_mult": 3.7,
    "shift": 0.1,
    "dram_byte": 1300.0 / 8,
}
ENERGY_SOURCE = "Horowitz, ISSCC 2014, 45 nm (shift assumed = int32 add)"


@dataclass
class LayerReport:
    """One shift layer. ``macs`` are multiply-accumulates per input sample that became shift-adds."""

    name: str
    type: str
    weight_shape: list[int]
    method: str
    weight_bits: int
    shift_range: list[int]
    shifts_used: list[int] | None
    zero_fraction: float
    macs: int
    float32_bytes: int
    packed_bytes: int
    shift_histogram: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    """Per-layer table and totals, per input sample. ``to_dict()`` is the stable JSON form."""

    layers: list[LayerReport]
    shift_macs: int
    float_macs_outside: int
    float_mults_outside: int
    float_adds_outside: int
    attention_mults: int
    other_float_params: int
    float32_weight_bytes: int
    packed_weight_bytes: int
    energy_float_pj: float
    energy_shift_pj: float
    energy_memory_float_pj: float
    energy_memory_shift_pj: float
    input_shape: list[int]
    energy_table: dict[str, float]
    energy_source: str = ENERGY_SOURCE
    version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The per-layer table and totals as text."""
        head = ("layer", "type", "weight", "method", "bits", "range", "used", "zeros", "shift-adds",
                "fp32 B", "packed B")
        rows = [head]
        for layer in self.layers:
            used = "-" if layer.shifts_used is None else f"[{layer.shifts_used[0]},{layer.shifts_used[1]}]"
            rows.append((
                layer.name, layer.type, "x".join(map(str, layer.weight_shape)), layer.method.upper(),
                str(layer.weight_bits), f"[{layer.shift_range[0]},{layer.shift_range[1]}]", used,
                f"{100 * layer.zero_fraction:.1f}%", f"{layer.macs:,}", f"{layer.float32_bytes:,}",
                f"{layer.packed_bytes:,}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i >= 8 else c.ljust(w) for i, (c, w) in
                           enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]
        ratio = self.float32_weight_bytes / max(1, self.packed_weight_bytes)
        compute_saving = 1 - self.energy_shift_pj / self.energy_float_pj if self.energy_float_pj else 0
        lines += [
            "",
            f"input shape {self.input_shape}; per input sample:",
            f"  multiply-accumulates replaced by shift-adds: {self.shift_macs:,}",
            f"  float work left outside shift layers: {self.float_macs_outside:,} MACs, "
            f"{self.float_mults_outside:,} multiplies, {self.float_adds_outside:,} adds",
            f"  attention (activation x activation, float): {self.attention_mults:,} multiply-accumulates",
            f"  shift-layer weights: {self.float32_weight_bytes:,} B as float32 -> "
            f"{self.packed_weight_bytes:,} B packed ({ratio:.2f}x smaller); "
            f"{self.other_float_params:,} other float parameters",
            f"  compute energy: {self.energy_float_pj / 1e6:.4f} uJ float -> "
            f"{self.energy_shift_pj / 1e6:.4f} uJ shift ({100 * compute_saving:.1f}% saved)",
            f"  weight-read energy (DRAM, once per inference): {self.energy_memory_float_pj / 1e6:.4f} uJ "
            f"-> {self.energy_memory_shift_pj / 1e6:.4f} uJ",
            f"  energies: {self.energy_source}",
        ]
        return "\n".join(lines)


def _shift_sign(module: _FrozenShift) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(shift, sign, info) of a frozen shift layer."""
    rel, sign = decode_codes(module.codes, module.weight_shape, module.weight_bits, module.has_zero)
    lo_hi = _configured_range(module.config or {}, module)
    return rel + module.shift_lo, sign, {"method": module.method, "bits": module.weight_bits, "range": lo_hi}


def _configured_range(cfg: dict[str, Any], module: _FrozenShift) -> list[int]:
    if cfg:
        from deepshift.core.config import config_from_dict

        try:
            return list(config_from_dict(cfg).shift_range)
        except ValueError:
            pass
    return [module.shift_lo, module.shift_hi]


def _type_name(module: _FrozenShift) -> str:
    if module.kind == "linear":
        return "Linear"
    dims = len(module.weight_shape) - 2
    return f"ConvTranspose{dims}d" if module.transposed else f"Conv{dims}d"


def _attention_shapes(module: nn.Module, args: tuple) -> tuple[int, int, int] | None:
    """(queries, keys, width) per sample of an attention module's call, None for other modules."""
    if isinstance(module, (nn.MultiheadAttention, ShiftMultiheadAttention)):
        q, k = args[0], args[1]
        seq = 1 if module.batch_first and q.dim() == 3 else 0
        return q.shape[seq], k.shape[seq], module.embed_dim
    if isinstance(module, SelfAttention):
        return args[0].shape[1], args[0].shape[1], args[0].shape[2]
    return None


@torch.no_grad()
def savings_report(
    model: nn.Module, input_shape: tuple[int, ...], energy_table: dict[str, float] | None = None,
    input_dtype: torch.dtype | None = None,
) -> Report:
    """Count what ``model`` saves per input sample of shape ``input_shape``, as deployed: frozen
    (a converted model is reported as its frozen copy, see :func:`deepshift.frozen.freeze.frozen_copy`).

    ``input_shape`` excludes the batch dimension (e.g. ``(1, 28, 28)``). One forward pass with a
    batch of one zero input records every layer's shapes. Float work outside shift layers:
    BatchNorm (one multiply and one add per element, as at inference), unconverted
    Linear/Conv layers (their MACs), average pooling (one multiply per output). Shift layers'
    fixed-point input rounding and output rescaling are power-of-two scalings (exponent adds),
    not counted as multiplies. Attention's products of activations (queries x keys, weights x
    values: ``2 * queries * keys * width`` per sample, masked positions included) stay float
    multiply-accumulates: ``attention_mults``, in the energy as fp32 MACs; a float
    ``nn.MultiheadAttention``'s projections count as float MACs.
    ``input_dtype``: the dtype of the zero input (``torch.int64`` for token models; default the
    model's float dtype).

    Example:
        >>> import torch, deepshift
        >>> net = deepshift.convert_(torch.nn.Sequential(torch.nn.Linear(8, 4)), deepshift.QConfig())
        >>> deepshift.savings_report(net, (8,)).shift_macs
        32
    """
    table = dict(ENERGY_45NM_PJ if energy_table is None else energy_table)
    missing = sorted(set(ENERGY_45NM_PJ) - set(table))
    if missing:
        raise ValueError(f"energy_table lacks {missing}")
    model = frozen_copy(model)  # a frozen model is reported as is, without a copy
    modes = {m: m.training for m in model.modules()}  # restored below
    model.eval()
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    attention: list[tuple[nn.Module, tuple[int, int, int]]] = []
    hooks = []
    counted = (nn.Linear, nn.modules.conv._ConvNd, *_BATCHNORM, *_AVG_POOL)
    for name, module in model.named_modules():
        if is_deployed_shift_layer(module) or isinstance(module, counted):
            def hook(mod, args, out, name=name):
                shapes[name] = (tuple(args[0].shape), tuple(out.shape))
            hooks.append(module.register_forward_hook(hook))
        elif isinstance(module, (nn.MultiheadAttention, ShiftMultiheadAttention, SelfAttention)):
            hooks.append(module.register_forward_hook(
                lambda mod, args, out: attention.append((mod, _attention_shapes(mod, args)))))
    try:
        param = next(model.parameters(), None)
        buf = next(model.buffers(), None)
        ref = param if param is not None else buf
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        model(torch.zeros((1, *input_shape), dtype=input_dtype or dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(modes[model])  # also drops the eval-mode weight caches
        for m, mode in modes.items():
            m.training = mode

    layers: list[LayerReport] = []
    float_macs = float_mults = float_adds = 0
    for name, module in model.named_modules():
        if name not in shapes:
            continue
        in_shape, out_shape = shapes[name]
        if is_deployed_shift_layer(module):
            shift, sign, info = _shift_sign(module)
            weight_shape = list(shift.shape)
            # Elements that each sum fan_in terms: every output of Linear and conv; every input
            # element of a transposed conv (each is scattered into fan_in outputs).
            per = in_shape if getattr(module, "transposed", False) else out_shape
            elements = math.prod(per[1:])
            # Linear: in_features per output; conv: C_in/groups * K per output; transposed conv
            # (weight (C_in, C_out/groups, *k)): each input element reaches C_out/groups * K outputs.
            macs = elements * math.prod(weight_shape[1:])
            nonzero = sign != 0
            values, counts = torch.unique(shift[nonzero], return_counts=True)
            numel = shift.numel()
            layers.append(LayerReport(
                name=name or "(root)", type=_type_name(module), weight_shape=weight_shape,
                method=info["method"], weight_bits=info["bits"], shift_range=list(info["range"]),
                shifts_used=[int(values.min()), int(values.max())] if values.numel() else None,
                zero_fraction=float((~nonzero).sum()) / numel, macs=int(macs),
                float32_bytes=numel * 4, packed_bytes=math.ceil(numel * info["bits"] / 8),
                shift_histogram={str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
            ))
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            w = module.weight
            if isinstance(module, nn.Linear):
                float_macs += math.prod(out_shape[1:]) * w.shape[1]
            elif module.transposed:
                float_macs += math.prod(in_shape[1:]) * w.shape[1] * math.prod(w.shape[2:])
            else:
                float_macs += math.prod(out_shape[1:]) * w.shape[1] * math.prod(w.shape[2:])
        elif isinstance(module, _BATCHNORM):
            n = math.prod(out_shape[1:])
            float_mults += n
            float_adds += n
        else:  # average pooling: a sum per window and one scaling multiply per output
            n_out = math.prod(out_shape[1:])
            float_mults += n_out
            float_adds += max(0, math.prod(in_shape[1:]) - n_out)
    attention_mults = 0
    for module, (queries, keys, width) in attention:
        attention_mults += 2 * queries * keys * width
        if isinstance(module, nn.MultiheadAttention):  # float projections, called functionally
            float_macs += width * (2 * queries * width + keys * (module.kdim + module.vdim))
    other_params = sum(p.numel() for p in model.parameters())
    # A frozen BatchNorm holds its affine weight and bias as buffers; they are still float values.
    other_params += sum(t.numel() for m in model.modules() if isinstance(m, FrozenBatchNorm)
                        for t in (m.weight, m.bias) if t is not None)
    shift_macs = sum(layer.macs for layer in layers)
    fp32_bytes = sum(layer.float32_bytes for layer in layers)
    packed = sum(layer.packed_bytes for layer in layers)
    fp_mac = table["fp32_mult"] + table["fp32_add"]
    outside = ((float_macs + attention_mults) * fp_mac + float_mults * table["fp32_mult"]
               + float_adds * table["fp32_add"])
    energy_float = shift_macs * fp_mac + outside
    energy_shift = shift_macs * (table["shift"] + table["int32_add"]) + outside
    return Report(
        layers=layers, shift_macs=int(shift_macs), float_macs_outside=int(float_macs),
        float_mults_outside=int(float_mults), float_adds_outside=int(float_adds),
        attention_mults=int(attention_mults),
        other_float_params=int(other_params), float32_weight_bytes=fp32_bytes,
        packed_weight_bytes=packed, energy_float_pj=float(energy_float),
        energy_shift_pj=float(energy_shift),
        energy_memory_float_pj=fp32_bytes * table["dram_byte"],
        energy_memory_shift_pj=packed * table["dram_byte"],
        input_shape=list(input_shape), energy_table=table,
    )


def plot_shift_histograms(report: Report, path: str, title: str | None = None) -> str:
    """Draw one bar chart of shift values per layer (PNG); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(report.layers))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, report.layers, strict=False):
        lo, hi = layer.shift_range
        xs = list(range(lo, hi + 1))
        ys = [layer.shift_histogram.get(str(v), 0) for v in xs]
        ax.bar(xs, ys, color="tab:blue")
        ax.set_title(f"{layer.name} ({layer.type}, {layer.method.upper()}{layer.weight_bits})", fontsize=8)
        ax.set_xlabel("shift p (w = ±2^p)", fontsize=7)
        ax.tick_params(labelsize=6)
        if layer.zero_fraction:
            ax.text(0.02, 0.9, f"zeros {100 * layer.zero_fraction:.1f}%", transform=ax.transAxes,
                    fontsize=6)
    for ax in list(axes.flat)[len(report.layers):]:
        ax.axis("off")
    fig.suptitle(title or "shift values per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path





def compression_report(model: nn.Module, act_bits: tuple[int, int] | None = None) -> dict[str, Any]:
    """Bytes of the packed form vs float32: shift weights, other tensors, totals and ratios.

    ``model`` is frozen, or converted (reported as its frozen copy with ``act_bits``; not changed).
    Keys: ``shift_weights`` (count), ``packed_weight_bytes``, ``float32_weight_bytes``,
    ``other_bytes`` (every other tensor of the state_dict as stored, biases included),
    ``packed_bytes`` / ``float32_bytes`` (totals,
    excluding the file header), ``weight_ratio`` and ``total_ratio`` (float32 / packed).

    Example:
        >>> import torch, deepshift
        >>> net = deepshift.convert_(torch.nn.Linear(256, 64, bias=False), deepshift.QConfig(weight_bits=5))
        >>> r = deepshift.compression_report(net)
        >>> r["packed_weight_bytes"], r["float32_weight_bytes"], r["weight_ratio"]
        (10240, 65536, 6.4)
    """
    frozen = frozen_copy(model, act_bits)
    weights = packed = 0
    code_keys = set()
    for name, m in frozen.named_modules(remove_duplicate=False):  # as the state_dict counts them
        if is_frozen_layer(m):
            weights += math.prod(m.weight_shape)
            packed += m.codes.numel()
            code_keys.add(f"{name}.codes" if name else "codes")
    other = sum(t.numel() * t.element_size() for k, t in frozen.state_dict().items() if k not in code_keys)
    return {
        "shift_weights": weights,
        "packed_weight_bytes": packed,
        "float32_weight_bytes": 4 * weights,
        "other_bytes": other,
        "packed_bytes": packed + other,
        "float32_bytes": 4 * weights + other,
        "weight_ratio": 4 * weights / packed if packed else float("nan"),
        "total_ratio": (4 * weights + other) / (packed + other) if packed + other else float("nan"),
    }
