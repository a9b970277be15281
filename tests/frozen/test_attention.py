"""Freezing ``nn.MultiheadAttention``: the split form computes what the original computes, op for
op; its frozen projections are exact; transformer encoders freeze, pack and export."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import deepshift
from deepshift.core.quantize import fixed_point
from deepshift.frozen.attention import ShiftMultiheadAttention


@pytest.fixture
def no_fast_path():
    # nn.MultiheadAttention's fused inference kernel is other float arithmetic than its own
    # Python path, which the split form reproduces; exact comparisons run against the latter.
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def _inputs(batch_first: bool, batched: bool, kdim: int, vdim: int):
    def make(length, dim):
        shape = ((2, length, dim) if batch_first else (length, 2, dim)) if batched else (length, dim)
        return torch.randn(shape, dtype=torch.float64)

    return make(5, 16), make(6, kdim), make(6, vdim)


CASES = list(itertools.product([True, False], [True, False], [(16, 16), (12, 10)]))


@pytest.mark.parametrize("batch_first,batched,dims", CASES)
def test_split_form_equals_multihead_attention_in_float64(no_fast_path, batch_first, batched, dims):
    kdim, vdim = dims
    mha = nn.MultiheadAttention(16, 4, kdim=kdim, vdim=vdim, batch_first=batch_first).double().eval()
    split = ShiftMultiheadAttention.from_float(mha)
    q, k, v = _inputs(batch_first, batched, kdim, vdim)
    kpm = torch.tensor([False] * 4 + [True, False])
    kpm = kpm.expand(2, 6) if batched else kpm
    bool_mask = torch.rand(5, 6) < 0.3
    bool_mask[:, 0] = False  # every query keeps one key
    float_kpm = torch.zeros(kpm.shape, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    masks = [{}, {"key_padding_mask": kpm}, {"attn_mask": bool_mask},
             {"attn_mask": torch.randn(5, 6, dtype=torch.float64), "key_padding_mask": float_kpm}]
    if batched:
        masks.append({"attn_mask": torch.randn(2 * 4, 5, 6, dtype=torch.float64)})
    for mask, need_weights, average in itertools.product(masks, [True, False], [True, False]):
        a = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **mask)
        b = split(q, k, v, need_weights=need_weights, average_attn_weights=average, **mask)
        assert torch.equal(a[0], b[0]), (mask.keys(), need_weights)
        assert (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))


def test_causal_hint(no_fast_path):
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    split = ShiftMultiheadAttention.from_float(mha)
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    # Copies: given one tensor three times, nn.MultiheadAttention projects with one 24x8 matmul,
    # whose float rounding may differ from three 8x8 ones (shift weights on fixed-point inputs
    # are exact either way); the arithmetic compared here is the attention's.
    qkv = (x, x.clone(), x.clone())
    causal = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    for need_weights in (True, False):
        a = mha(*qkv, attn_mask=causal, is_causal=True, need_weights=need_weights)[0]
        assert torch.equal(split(*qkv, attn_mask=causal, is_causal=True, need_weights=need_weights)[0], a)
        same = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)[0]
        torch.testing.assert_close(split(x, x, x, attn_mask=causal, is_causal=True,
                                         need_weights=need_weights)[0], same, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="is_causal needs attn_mask"):
        split(x, x, x, is_causal=True)


@pytest.mark.parametrize("method", ["q", "ps"])
@pytest.mark.parametrize("same_dims", [True, False])
def test_frozen_attention_is_exact_on_fixed_point_inputs(no_fast_path, method, same_dims):
    cfg = (deepshift.QConfig if method == "q" else deepshift.PSConfig)(weight_bits=5, act_bits=(6, 8))
    mha = nn.MultiheadAttention(16, 4, kdim=None if same_dims else 12, vdim=None if same_dims else 10,
                                batch_first=True)
    deepshift.convert_(mha, cfg, init="scratch" if method == "ps" else "weights")
    frozen = deepshift.freeze_(copy.deepcopy(mha).eval())
    assert isinstance(frozen, ShiftMultiheadAttention)
    assert all(isinstance(getattr(frozen, n), deepshift.ShiftLinear)
               for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    # The reference: the same split attention with float (power-of-two) projections whose inputs
    # are rounded to act_bits, which is what each integer projection does.
    reference = ShiftMultiheadAttention.from_float(copy.deepcopy(mha).double().eval())
    for proj in (reference.q_proj, reference.k_proj, reference.v_proj, reference.out_proj):
        proj.register_forward_pre_hook(lambda m, a: (fixed_point(a[0], (6, 8)),))
    q, k, v = _inputs(True, True, 16 if same_dims else 12, 16 if same_dims else 10)
    kpm = torch.tensor([[False] * 5 + [True]] * 2)
    with torch.no_grad():
        for need_weights in (True, False):
            got = frozen.double()(q, k, v, key_padding_mask=kpm, need_weights=need_weights)[0]
            assert torch.equal(got, reference(q, k, v, key_padding_mask=kpm, need_weights=need_weights)[0])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_transformer_encoder_freezes_packs_and_exports(tmp_path):
    torch.manual_seed(0)
    net = deepshift.convert_(Encoder(), deepshift.PSConfig(weight_bits=5)).eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        simulated = net(x)
        frozen = deepshift.freeze_(copy.deepcopy(net))
        got = frozen(x)
        assert isinstance(frozen.encoder.layers[0].self_attn, ShiftMultiheadAttention)
        # Post-training rounding of activations to (8, 8) fixed point: close, not equal.
        assert (got - simulated).abs().max() < 0.05
        # The nested-tensor fast path (it reads packed float weights) is off: a padding mask works.
        padded = frozen.encoder(x, src_key_padding_mask=torch.tensor([[False] * 6 + [True]] * 3))
        assert padded.shape == (3, 7, 32)
    path = tmp_path / "enc.dshift"
    deepshift.save_packed(net, path)
    loaded = deepshift.load_packed(path, model=Encoder())  # a float skeleton
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    onnxruntime = pytest.importorskip("onnxruntime")
    out = deepshift.export_onnx(frozen, x, tmp_path / "enc.onnx")
    onnx_out = torch.from_numpy(onnxruntime.InferenceSession(out).run(None, {"input": x.numpy()})[0])
    # LayerNorm, softmax and the mean are float ops each runtime rounds its own way; a last-bit
    # difference that lands on a fixed-point rounding boundary moves an activation by 2**-8.
    torch.testing.assert_close(onnx_out, got, rtol=0, atol=5e-3)
    assert torch.equal(onnx_out.argmax(1), got.argmax(1))
    rep = deepshift.savings_report(net, (7, 32))
    assert rep.attention_mults == 2 * 2 * 7 * 7 * 32
    assert rep.float_macs_outside == 0  # every projection is a shift layer


def test_only_out_proj_converted_still_freezes():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    deepshift.convert_(mha, deepshift.QConfig(), filter_fn=lambda m, name: name == "out_proj")
    frozen = deepshift.freeze_(copy.deepcopy(mha).eval())
    assert isinstance(frozen.out_proj, deepshift.ShiftLinear) and type(frozen.q_proj) is nn.Linear
    x = torch.randn(2, 3, 8)
    assert frozen(x, x, x)[0].shape == (2, 3, 8)


def test_unsupported_options_are_refused_and_nothing_changes():
    net = nn.Sequential(nn.Linear(8, 8))
    net.append(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    deepshift.convert_(net, deepshift.QConfig())
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="add_bias_kv"):
        deepshift.freeze_(net)
    assert deepshift.is_shift_layer(net[0]) and isinstance(net[1], nn.MultiheadAttention)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
