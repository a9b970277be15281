"""``ShiftMultiheadAttention``: ``nn.MultiheadAttention`` with its four projections as layers.

``nn.MultiheadAttention`` multiplies by its packed ``in_proj_weight`` and reads ``out_proj.weight``
itself, so a frozen layer cannot simply take the place of a weight. :func:`deepshift.freeze_`
replaces a converted ``nn.MultiheadAttention`` with this module: the query, key, value and output
projections are separate layers (frozen :class:`~deepshift.ShiftLinear` after freezing, plain
``nn.Linear`` where a projection was left float), and the attention between them (scaled dot
products, masks, softmax, the weighted sum of values) is the same float arithmetic
``nn.MultiheadAttention`` does, op for op, on both of its paths (``need_weights`` or not).
Those activation x activation products are the attention's multiplications; the report counts
them as such.

The module takes ``nn.MultiheadAttention``'s call signature and attributes (``batch_first``,
``embed_dim``, ``num_heads``, ...), so ``nn.TransformerEncoderLayer`` and user code keep working.
Its ``in_proj_weight`` / ``in_proj_bias`` are None: PyTorch's fused transformer fast path, which
needs them as float tensors, is skipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not allowed) as an additive float mask; float masks as they are."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention masks must be bool or float, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class ShiftMultiheadAttention(nn.Module):
    """Multi-head attention over separate ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` layers.

    Built by :func:`deepshift.freeze_` from a converted ``nn.MultiheadAttention`` (or with
    :meth:`from_float` from a float one); ``forward`` has ``nn.MultiheadAttention.forward``'s
    signature and returns ``(output, weights or None)``.
    """

    in_proj_weight = None
    in_proj_bias = None
    bias_k = None
    bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, batch_first: bool,
                 q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, out_proj: nn.Module,
                 kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj

    @classmethod
    @torch.no_grad()
    def from_float(cls, mha: nn.MultiheadAttention) -> ShiftMultiheadAttention:
        """The same attention with float ``nn.Linear`` projections (weights copied; the skeleton a
        packed file's frozen projections are loaded into)."""
        check_supported(mha)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = list(mha.in_proj_weight.detach().chunk(3))
        else:
            weights = [mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()]
        biases = [None] * 3 if mha.in_proj_bias is None else list(mha.in_proj_bias.detach().chunk(3))
        projs = []
        for w, b in zip(weights, biases, strict=True):
            lin = nn.Linear(w.shape[1], e, bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
            projs.append(lin)
        out = nn.Linear(e, e, bias=mha.out_proj.bias is not None, device=weights[0].device,
                        dtype=weights[0].dtype)
        out.weight.copy_(mha.out_proj.weight)  # the effective weight, also of a converted out_proj
        if out.bias is not None:
            out.bias.copy_(mha.out_proj.bias)
        return cls(e, mha.num_heads, mha.dropout, mha.batch_first, *projs, out, mha.kdim, mha.vdim).train(
            mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        heads, head_dim, dtype = self.num_heads, self.head_dim, query.dtype
        key_padding_mask = _as_float_mask(key_padding_mask, dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask too (as in nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint alone: scaled_dot_product_attention applies the causal mask
        else:
            attn_mask = _as_float_mask(attn_mask, dtype)
            if key_padding_mask is not None:
                is_causal = False
        q = self.q_proj(query).view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = self.k_proj(key).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = self.v_proj(value).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"2-D attn_mask of shape {tuple(attn_mask.shape)}, expected "
                                       f"{(tgt_len, src_len)}")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.shape != (bsz * heads, tgt_len, src_len):
                raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)}, expected "
                                   f"{(tgt_len, src_len)} or {(bsz * heads, tgt_len, src_len)}")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise RuntimeError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)}, expected "
                                   f"{(bsz, src_len)}")
            pad = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(
                bsz * heads, 1, src_len)
            attn_mask = pad if attn_mask is None else attn_mask + pad
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q * math.sqrt(1.0 / float(head_dim))
            scores = (torch.baddbmm(attn_mask, scores, k.transpose(-2, -1)) if attn_mask is not None
                      else torch.bmm(scores, k.transpose(-2, -1)))
            weights = F.softmax(scores, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                             else attn_mask.view(bsz, heads, -1, src_len))
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim), attn_mask, dropout, is_causal)
            out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, self.embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def check_supported(mha: nn.MultiheadAttention) -> None:
    """ValueError for the options the split form does not cover (``add_bias_kv``, ``add_zero_attn``)."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("freeze_ does not cover nn.MultiheadAttention with add_bias_kv or add_zero_attn; "
                         "convert_ with a filter_fn that leaves this module float")
