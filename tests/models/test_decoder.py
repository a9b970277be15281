"""The frozen language model's native token step (``deepshift.frozen.decoder``): the same logits and
caches as ``CharTransformer.decode`` bit for bit, taken by ``generate``, declined where it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import isa_paths

import deepshift
import deepshift.frozen.decoder as decoder_module
from deepshift.backends.cpu import build
from deepshift.frozen.decoder import native_decoder
from deepshift.models import build_model


@pytest.fixture(autouse=True)
def _native():
    if not build.native_available():
        pytest.skip("the native CPU kernels are not available (no compiler or DEEPSHIFT_NO_NATIVE set)")


def _frozen(method: str = "q", bits: int = 5, act_bits=None, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    arch = {"dim": 32, "depth": 2, "heads": 4, "mlp_dim": 48, "context": 40, **kwargs}
    model = build_model("char-transformer", **arch)
    cfg = {"q": deepshift.QConfig, "ps": deepshift.PSConfig}[method](weight_bits=bits, act_bits=act_bits)
    deepshift.convert_(model, cfg)
    return deepshift.freeze_(model.eval()).to(dtype)


def _same_caches(a, b):
    return all(torch.equal(x[key], y[key]) for x, y in zip(a, b, strict=True) for key in ("k", "v"))


@pytest.mark.parametrize("method, bits, act_bits, dtype", [
    ("q", 5, None, torch.float32), ("ps", 5, None, torch.float32), ("q", 3, (6, 10), torch.float32),
    ("ps", 4, None, torch.float64), ("q", 8, (8, 8), torch.float64),
])
def test_native_step_equals_decode_bit_for_bit(method, bits, act_bits, dtype):
    model = _frozen(method, bits, act_bits, dtype)
    step = native_decoder(model)
    assert step is not None
    tokens = torch.randint(0, 256, (1, 40))
    for isa in isa_paths():
        build.set_isa(isa)
        try:
            with torch.no_grad():
                eager = [{} for _ in model.blocks]
                model.decode(tokens[:, :7], eager, 0)
                native = [dict(c) for c in eager]
                for i in range(7, 40):  # up to the end of the context
                    want = model.decode(tokens[:, i:i + 1], eager, i)
                    got = step(tokens[:, i:i + 1], native, i)
                    assert got.dtype == want.dtype and torch.equal(got, want), (isa, i)
                    assert _same_caches(native, eager), (isa, i)
        finally:
            build.set_isa("auto")


def test_generate_takes_the_native_step_and_samples_what_the_modules_would(monkeypatch):
    model = _frozen("ps", 5, heads=2)
    prompt = torch.tensor(list(b"The "))
    calls = []

    def counted(m):
        step = native_decoder(m)
        return None if step is None else lambda *a: calls.append(1) or step(*a)

    monkeypatch.setattr(decoder_module, "native_decoder", counted)
    runs = {}
    for native in (True, False):
        before = len(calls)
        # Past the 40-token context (the window slides and the cache is rebuilt), greedy and sampled.
        runs[native] = (model.generate(prompt, 70, temperature=0, native=native),
                        model.generate(prompt, 70, temperature=0.9, top_k=20, native=native,
                                       generator=torch.Generator().manual_seed(3)))
        # Most of the 140 tokens go through the native step (the rest: prompts, slid windows); none without.
        assert len(calls) - before > 100 if native else len(calls) == before
    assert all(torch.equal(a, b) for a, b in zip(runs[True], runs[False], strict=True))


def test_native_decoder_declines_what_it_cannot_run_exactly(monkeypatch):
    torch.manual_seed(0)
    float_model = build_model("char-transformer", dim=32, depth=1, heads=4, mlp_dim=48, context=40).eval()
    assert native_decoder(float_model) is None  # float projections: the modules run
    converted = deepshift.convert_(copy.deepcopy(float_model), deepshift.QConfig(weight_bits=5))
    assert native_decoder(converted) is None  # simulated, not frozen
    frozen = deepshift.freeze_(copy.deepcopy(converted))
    assert native_decoder(frozen) is not None
    assert native_decoder(copy.deepcopy(frozen).train()) is None  # dropout and training-mode modules
    hooked = copy.deepcopy(frozen)
    hooked.blocks[0].fc1.register_forward_hook(lambda *a: None)
    assert native_decoder(hooked) is None  # the step would skip the hook
    partly = copy.deepcopy(frozen)
    partly.blocks[0].attn.v = float_model.blocks[0].attn.v
    assert native_decoder(partly) is None
    monkeypatch.setenv("DEEPSHIFT_NO_NATIVE", "1")
    assert native_decoder(frozen) is None
    monkeypatch.delenv("DEEPSHIFT_NO_NATIVE")
    step = native_decoder(frozen)
    caches = [{} for _ in frozen.blocks]
    with torch.no_grad():
        frozen.decode(torch.tensor([[1, 2, 3]]), caches, 0)
        with pytest.raises(ValueError, match="one token"):
            step(torch.tensor([[4, 5]]), caches, 3)
        with pytest.raises(ValueError, match="context"):
            step(torch.tensor([[4]]), caches, 40)
