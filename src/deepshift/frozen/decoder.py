"""A frozen language model's token step in one native call (``backends/cpu/csrc/decoder.cpp``).

At batch 1 a small model's token costs call overhead, not arithmetic: a 128-wide block's step runs
about 20 modules and ops from Python (~160 us) where its six projections compute in a few
microseconds each. :func:`native_decoder` gives :meth:`~deepshift.models.transformer.CharTransformer.generate`
a step that runs every block, the final LayerNorm and the head in one call of the CPU extension:
the very ATen ops the modules run, in the same order on the same shapes, and the projections
through the ``deepshift::frozen_linear`` op, so its logits and caches equal
:meth:`~deepshift.models.transformer.CharTransformer.decode`'s bit for bit.

It applies only where that is certain: a frozen model (every projection and the head a
:class:`~deepshift.ShiftLinear`) of the zoo's own classes, in eval mode, on the CPU, with no
module hooks and the native kernels loaded; otherwise :func:`native_decoder` returns None and
generation runs the modules.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from deepshift.frozen.layers import ShiftLinear

Step = Callable[[Tensor, list[dict[str, Tensor]], int], Tensor]


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def native_decoder(model: nn.Module) -> Step | None:
    """``step(tokens, caches, start) -> logits`` for one new token (``tokens`` of shape (1, 1),
    ``caches`` filled by an earlier :meth:`decode` call, which ``step`` extends as ``decode``
    would), or None where the native step does not apply (see the module's docstring).

    Build it once per generation: it holds the model's tensors as they are now.
    """
    from deepshift.backends.cpu.build import load_extension
    from deepshift.models.transformer import Block, CharTransformer, SelfAttention

    if type(model) is not CharTransformer or any(m.training for m in model.modules()):
        return None
    if model.pos.device.type != "cpu" or _hooked(model) or nn.modules.module._global_forward_hooks \
            or nn.modules.module._global_forward_pre_hooks:
        return None
    dim = model.pos.shape[-1]

    def plain_norm(m) -> bool:
        return type(m) is nn.LayerNorm and tuple(m.normalized_shape) == (dim,)

    def frozen(*layers) -> bool:
        return all(type(m) is ShiftLinear for m in layers)

    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if type(block) is not Block or type(attn) is not SelfAttention or attn.causal is not True:
            return None
        if not (plain_norm(block.norm1) and plain_norm(block.norm2) and
                frozen(attn.q, attn.k, attn.v, attn.out, block.fc1, block.fc2)):
            return None
    if not (plain_norm(model.norm) and frozen(model.head)):
        return None
    ext = load_extension()
    if ext is None:
        return None

    def projection(m: ShiftLinear):
        return ext.FrozenProjection(m.codes, m.bias_int, m._spec_json)

    def norm(m: nn.LayerNorm):
        return ext.Norm(m.weight, m.bias, m.eps)

    decoder = ext.Decoder(
        [ext.DecoderBlock(norm(b.norm1), projection(b.attn.q), projection(b.attn.k), projection(b.attn.v),
                          projection(b.attn.out), norm(b.norm2), projection(b.fc1), projection(b.fc2),
                          b.attn.heads) for b in model.blocks],
        norm(model.norm), projection(model.head))

    def step(tokens: Tensor, caches: list[dict[str, Tensor]], start: int) -> Tensor:
        if tokens.shape != (1, 1) or start + 1 > model.context:
            raise ValueError(f"the native step takes one token within the context, got {tuple(tokens.shape)} "
                             f"at position {start}")
        x = model.embed(tokens) + model.pos[:, start:start + 1]
        logits, keys, values = decoder.step(x, [c["k"] for c in caches], [c["v"] for c in caches])
        for cache, k, v in zip(caches, keys, values, strict=True):
            cache["k"], cache["v"] = k, v
        return logits

    return step
