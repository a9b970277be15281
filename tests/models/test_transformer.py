"""The zoo transformers (``vit``, ``char-transformer``): training steps, shift attention weights,
frozen = simulated, key/value-cache generation, packed and ONNX round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import deepshift
from deepshift.core.quantize import fixed_point
from deepshift.models import build_model, example_input

METHODS = {"q": deepshift.QConfig, "ps": deepshift.PSConfig}


def _inputs(name: str, batch: int = 3) -> torch.Tensor:
    if name == "vit":
        return torch.randn(batch, 1, 28, 28)
    return torch.randint(0, 256, (batch, 32))


def _small(name: str) -> nn.Module:
    kwargs = {"dim": 32, "depth": 2, "heads": 4, "mlp_dim": 48}
    if name == "char-transformer":
        kwargs["context"] = 40
    return build_model(name, **kwargs)


@pytest.mark.parametrize("name", ["vit", "char-transformer"])
@pytest.mark.parametrize("method", ["none", "q", "ps"])
def test_one_training_step_per_method(name, method):
    model = _small(name)
    if method != "none":
        deepshift.convert_(model, METHODS[method](weight_bits=5), init="scratch")
    x = _inputs(name)
    out = model.train()(x)
    if name == "vit":
        assert out.shape == (3, 10)
        loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2]))
    else:
        assert out.shape == (3, 32, 256)
        loss = nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    opt = torch.optim.RAdam(deepshift.param_groups(model, lr=0.01))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss.backward()
    opt.step()
    deepshift.clamp_parameters_(model)
    assert torch.isfinite(loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any("blocks.0.attn.q" in k for k in changed)  # the attention projections train


@pytest.mark.parametrize("name", ["vit", "char-transformer"])
@pytest.mark.parametrize("method", ["q", "ps"])
def test_every_matrix_weight_attention_included_is_a_shift_weight(name, method):
    model = deepshift.convert_(_small(name), METHODS[method](weight_bits=4))
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    # q, k, v, out, fc1, fc2 per block (2 blocks), the head; the ViT's patch convolution too.
    assert len(linear) == 2 * 6 + 1 + (name == "vit")
    shift = {n for n, _, _ in deepshift.shift_layers(model)}
    assert shift == set(linear)
    for n in ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.attn.v", "blocks.1.attn.out"):
        w = deepshift.effective_weight(model.get_submodule(n))
        nz = w[w != 0].abs()
        assert nz.numel() and torch.equal(nz.log2(), nz.log2().round())
    # Embeddings and LayerNorm stay float.
    assert not any(isinstance(m, (nn.Embedding, nn.LayerNorm)) and deepshift.is_shift_layer(m)
                   for m in model.modules())


@pytest.mark.parametrize("name", ["vit", "char-transformer"])
@pytest.mark.parametrize("method,act_bits", [("q", (8, 8)), ("ps", (4, 8)), ("ps", None)])
def test_frozen_equals_simulated_in_float64(name, method, act_bits):
    model = deepshift.convert_(_small(name), METHODS[method](weight_bits=5, act_bits=act_bits),
                               init="scratch").eval()
    x = _inputs(name, 4)
    xd = x.double() if x.is_floating_point() else x
    sim = copy.deepcopy(model).double()
    if act_bits is None:
        # Post-training rounding: the simulation rounds each shift layer's input and bias as
        # freeze_ will.
        for _, layer, _ in deepshift.shift_layers(sim):
            layer.register_forward_pre_hook(lambda m, a: (fixed_point(a[0], deepshift.DEFAULT_ACT_BITS),))
            layer.bias.data = fixed_point(layer.bias.data, deepshift.DEFAULT_ACT_BITS)
    frozen = deepshift.freeze_(copy.deepcopy(model))
    assert isinstance(frozen.blocks[0].attn.q, deepshift.ShiftLinear)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(frozen).double()(xd), sim(xd))
        # float32: the same predictions as the float32 simulation.
        if act_bits is not None:
            assert torch.equal(frozen(x).argmax(-1), model(x).argmax(-1))


def test_cached_generation_equals_the_full_forward():
    model = _small("char-transformer").double().eval()
    tokens = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        full = model(tokens)
        caches = [{} for _ in model.blocks]
        first = model.decode(tokens[:, :11], caches, 0)  # a prompt, then one token at a time
        steps = [model.decode(tokens[:, i:i + 1], caches, i) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, rtol=1e-12, atol=1e-12)
    # Several new tokens at once against a cache: the causal mask is offset by the cache length.
    with torch.no_grad():
        caches = [{} for _ in model.blocks]
        model.decode(tokens[:, :11], caches, 0)
        torch.testing.assert_close(model.decode(tokens[:, 11:20], caches, 11), full[:, 11:20],
                                   rtol=1e-12, atol=1e-12)


def test_generate_samples_deterministically_and_slides_the_window():
    model = _small("char-transformer").eval()
    prompt = torch.tensor(list(b"The "))
    g = [model.generate(prompt, 60, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(g[0], g[1]) and len(g[0]) == 64 and torch.equal(g[0][:4], prompt)
    greedy = model.generate(prompt, 50, temperature=0)  # past the 40-token context: the window slides
    assert len(greedy) == 54 and int(greedy.max()) < 256
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.tensor([], dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 41, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer tokens"):
        model(torch.zeros(1, 4))


@pytest.mark.parametrize("name", ["vit", "char-transformer"])
def test_packed_and_onnx_round_trips(name, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = deepshift.convert_(_small(name), deepshift.PSConfig(weight_bits=4), init="scratch").eval()
    frozen = deepshift.freeze_(copy.deepcopy(model))
    x = _inputs(name, 2)
    path = tmp_path / "m.dshift"
    deepshift.save_packed(model, path)
    loaded = deepshift.load_packed(path)  # rebuilt from the zoo spec
    with torch.no_grad():
        ref = frozen(x)
        assert torch.equal(loaded(x), ref)
    onnx_path = deepshift.export_onnx(frozen, x, tmp_path / "m.onnx")
    got = torch.from_numpy(ort.InferenceSession(onnx_path).run(None, {"input": x.numpy()})[0])
    # Shift layers are exact; LayerNorm, softmax, GELU are each runtime's own float32 (see
    # export_onnx): equal up to an activation moved by one fixed-point step.
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-3)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_report_counts_attention_products_as_multiplies():
    model = deepshift.convert_(_small("char-transformer"), deepshift.QConfig(weight_bits=5))
    rep = deepshift.savings_report(model, (40,), input_dtype=torch.int64)
    # 2 blocks x (queries x keys + weights x values) x width, per sample of 40 tokens.
    assert rep.attention_mults == 2 * 2 * 40 * 40 * 32
    per_token = 2 * (4 * 32 * 32 + 2 * 32 * 48) + 32 * 256
    assert rep.shift_macs == 40 * per_token
    assert "attention" in rep.table()


def test_example_inputs():
    assert example_input("char-transformer", 2).shape == (2, 128)
    assert example_input("vit").dtype == torch.float32
    assert math.prod(example_input("vit").shape) == 28 * 28
