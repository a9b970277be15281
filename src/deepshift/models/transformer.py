"""Small transformers whose every matrix weight is an ``nn.Linear`` (or the patch convolution).

Attention is written out with four ``nn.Linear`` projections (query, key, value, output) and
``F.scaled_dot_product_attention``, so :func:`deepshift.convert_` makes all of them shift layers
and :func:`deepshift.freeze_` turns them into integer layers without any attention-specific code:
the converted (simulated) and frozen models run the very same attention arithmetic. Embeddings,
LayerNorm and the attention's activation x activation products stay float.

* :class:`VisionTransformer` (``vit``): 28x28 images cut into 4x4 patches (49 tokens), a learned
  position embedding, pre-norm blocks, mean pooling, a linear classifier.
* :class:`CharTransformer` (``char-transformer``): a decoder-only byte-level language model (256
  symbols) with causal attention and a key/value cache for generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` Linear projections.

    ``cache`` (a dict, optional) holds the keys and values of earlier positions: a call with
    ``cache`` appends this call's keys and values to it and attends over all of them, which is what
    token-by-token generation needs (causal attention only).
    """

    def __init__(self, dim: int, heads: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        causal, mask = self.causal, None
        if cache is not None:
            if not self.causal:
                raise ValueError("a key/value cache needs causal attention")
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                # New queries see every cached position and the earlier new ones: a causal mask
                # offset by the cache length (none needed for a single new token).
                causal = False
                if t > 1:
                    mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class VisionTransformer(nn.Module):
    """A small ViT for 28x28 images: ``patch`` x ``patch`` patches by a strided convolution,
    learned position embedding, ``depth`` pre-norm blocks, mean pooling, LayerNorm, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, causal=False, dropout=dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(1)))


class CharTransformer(nn.Module):
    """A decoder-only language model over bytes: input ``(B, T)`` int64 in ``[0, vocab)``, output
    ``(B, T, vocab)`` logits of the next byte at every position (causal attention).

    ``context`` is the longest input (the position embedding's length). :meth:`generate` samples
    with a key/value cache (:meth:`decode`), one token per step.
    """

    def __init__(self, num_classes: int = 256, in_channels: int = 1, context: int = 128, dim: int = 128,
                 depth: int = 4, heads: int = 4, mlp_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        del in_channels  # a zoo argument every model takes; text has no channels
        self.context = context
        self.embed = nn.Embedding(num_classes, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, causal=True, dropout=dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decode(tokens)

    def decode(self, tokens: Tensor, caches: list[dict[str, Tensor]] | None = None, start: int = 0) -> Tensor:
        """Logits for ``tokens`` at positions ``start, start + 1, ...``; with ``caches`` (one dict
        per block, empty at first) the keys and values of earlier calls are reused and extended."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected (batch, time) integer tokens, got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        t = tokens.shape[1]
        if start + t > self.context:
            raise ValueError(f"{start + t} positions exceed the model's context of {self.context}")
        x = self.embed(tokens) + self.pos[:, start:start + t]
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, native: bool = True) -> Tensor:
        """``prompt`` (1-D int64, at least one token) followed by ``tokens`` sampled tokens.

        The window slides when the context is full: the cache is rebuilt from the last
        ``context // 2`` tokens. ``temperature`` 0 picks the most likely token. A frozen model's
        one-token steps run as one native call (:func:`deepshift.frozen.decoder.native_decoder`:
        the same logits as :meth:`decode`); ``native=False`` runs the modules for every step.
        """
        out = prompt.to(torch.int64).flatten().tolist()
        if not out:
            raise ValueError("the prompt needs at least one token")
        from deepshift.frozen.decoder import native_decoder  # the zoo needs the frozen runtime only here

        # A frozen model's one-token steps: one native call for all blocks (same logits).
        step = native_decoder(self) if native else None
        caches: list[dict[str, Tensor]] = []
        pending = out[-self.context:]
        pos = 0
        for _ in range(tokens):
            if pos + len(pending) > self.context:
                pending = out[-(self.context // 2):]
                caches, pos = [], 0
            if not caches:
                caches = [{} for _ in self.blocks]
            x = torch.tensor([pending], dtype=torch.int64, device=self.pos.device)
            if step is not None and len(pending) == 1 and "k" in caches[0]:
                logits = step(x, caches, pos)[0, -1].float()
            else:
                logits = self.decode(x, caches, pos)[0, -1].float()
            pos += len(pending)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            out.append(nxt)
            pending = [nxt]
        return torch.tensor(out, dtype=torch.int64)
