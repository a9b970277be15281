"""convert_ on the weights outside Linear / convolutions: attention projections, recurrent gates;
float_weights and strict mode; freeze_ and the exporters refusing what they cannot hold."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import deepshift
from deepshift import PSConfig, QConfig

CONFIGS = [QConfig(weight_bits=5), PSConfig(weight_bits=5), QConfig(weight_bits=2, max_shift="auto"),
           PSConfig(weight_bits=3, max_shift="auto"), QConfig(weight_bits=8)]


def _cfg_id(cfg):
    return f"{cfg.method}{cfg.weight_bits}-{cfg.max_shift}"


def _modules():
    torch.manual_seed(0)
    return {
        "mha-packed": (nn.MultiheadAttention(8, 2), lambda: (torch.randn(5, 3, 8),) * 3),
        "mha-separate": (nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True),
                         lambda: (torch.randn(3, 5, 8), torch.randn(3, 7, 6), torch.randn(3, 7, 4))),
        "lstm": (nn.LSTM(6, 5, num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
                 lambda: (torch.randn(2, 4, 6),)),
        "gru": (nn.GRU(6, 5, num_layers=2), lambda: (torch.randn(4, 2, 6),)),
        "rnn": (nn.RNN(6, 5, nonlinearity="relu", bias=False), lambda: (torch.randn(4, 2, 6),)),
        "lstm-cell": (nn.LSTMCell(6, 5), lambda: (torch.randn(2, 6),)),
        "gru-cell": (nn.GRUCell(6, 5), lambda: (torch.randn(2, 6),)),
        "rnn-cell": (nn.RNNCell(6, 5), lambda: (torch.randn(2, 6),)),
    }


def _with_effective_weights(float_model: nn.Module, converted: nn.Module) -> nn.Module:
    """A copy of the float model holding the converted model's evaluation weights."""
    ref = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, module, tensor, _ in deepshift.shift_tensors(converted):
            getattr(ref.get_submodule(name), tensor).copy_(deepshift.effective_weight(module, tensor))
    return ref


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _assert_powers_of_two(module, tensor):
    w = getattr(module, tensor).detach()
    lo, hi = deepshift.layer_shift_range(module, tensor)
    nonzero = w[w != 0]
    exponent = nonzero.abs().log2()
    assert bool((exponent == exponent.round()).all())
    assert bool(((exponent >= lo) & (exponent <= hi)).all())
    if isinstance(deepshift.shift_config(module, tensor), QConfig):
        assert nonzero.numel() == w.numel()  # Q has no zero weight


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("kind", list(_modules()))
def test_every_weight_read_in_forward_is_a_power_of_two_and_used(kind, cfg):
    module, inputs = _modules()[kind]
    float_model = copy.deepcopy(module)
    converted = deepshift.convert_(module, cfg)
    expected = {*deepshift.matmul_weight_names(float_model)}
    if isinstance(float_model, nn.MultiheadAttention):
        expected.add("weight")  # out_proj, a Linear
    assert {t for _, _, t, _ in deepshift.shift_tensors(converted)} == expected
    assert deepshift.float_weights(converted) == []
    converted.eval()
    for _, m, tensor, _ in deepshift.shift_tensors(converted):
        _assert_powers_of_two(m, tensor)
    x = inputs()
    ref = _with_effective_weights(float_model, converted).eval()
    # Gradients on: the modules' reference paths (no fused inference kernels), bit for bit.
    assert torch.equal(_first(converted(*x)), _first(ref(*x)))
    assert not torch.equal(_first(converted(*x)), _first(float_model.eval()(*x)))


@pytest.mark.parametrize("kind", ["lstm", "mha-separate"])
def test_ps_gradients_reach_shifts_and_signs_and_the_optimizer_groups(kind):
    module, inputs = _modules()[kind]
    deepshift.convert_(module, PSConfig(weight_bits=4, max_shift="auto"))
    groups = {g["name"]: g["params"] for g in deepshift.param_groups(module, lr=0.01)}
    _first(module(*inputs())).square().sum().backward()
    for _, m, tensor, _ in deepshift.shift_tensors(module):
        params = deepshift.shift_parameters(m, tensor)
        assert any(p is params["shift"] for p in groups["shift"])
        assert any(p is params["sign"] for p in groups["sign"])
        assert params["shift"].grad is not None and bool(params["shift"].grad.abs().sum() > 0)
        with torch.no_grad():
            params["shift"].add_(100.0)
    deepshift.clamp_parameters_(module)
    for _, m, tensor, _ in deepshift.shift_tensors(module):
        top = deepshift.layer_shift_range(m, tensor)[1]
        assert float(deepshift.shift_parameters(m, tensor)["shift"].max()) == top


def test_state_dict_round_trip_of_a_converted_lstm():
    cfg = PSConfig(weight_bits=4, max_shift="auto")
    module, inputs = _modules()["lstm"]
    deepshift.convert_(module, cfg)
    fresh = deepshift.convert_(nn.LSTM(6, 5, num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
                               cfg, init="scratch")
    fresh.load_state_dict(module.state_dict())
    x = inputs()
    assert torch.equal(_first(fresh.eval()(*x)), _first(module.eval()(*x)))


def test_transformer_fast_path_computes_with_the_shift_weights():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    float_model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    converted = deepshift.convert_(copy.deepcopy(float_model), PSConfig(weight_bits=5, max_shift="auto"))
    converted.eval()
    assert deepshift.float_weights(converted) == []
    x = torch.randn(3, 7, 16)
    reference = _with_effective_weights(float_model, converted)
    slow = converted(x)  # gradients on: the module's composite path
    assert torch.equal(slow, reference(x))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fast = converted(x)
    assert any("_transformer_encoder_layer_fwd" in e.key for e in prof.key_averages())  # the fused kernel ran
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (fast - float_model(x)).abs().max() > 1e-3  # and not with the float weights


def test_transformer_inference_keeps_fixed_point_activations():
    # With act_bits the linear layers' inputs are rounded by forward pre-hooks, which a fused
    # encoder kernel would skip: the no-grad forward must round them all the same.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    deepshift.convert_(net, QConfig(weight_bits=5, max_shift="auto", act_bits=(4, 4)))
    net.eval()
    x = torch.randn(3, 7, 16)
    slow = net(x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), slow, rtol=1e-5, atol=1e-5)
        for sub in net.layers:
            sub.linear1._forward_pre_hooks.clear()  # the rounding does change the result
        assert (net(x) - slow).abs().max() > 1e-3


class _HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_weight = nn.Parameter(torch.randn(4, 6))
        self.pos = nn.Parameter(torch.randn(3, 4))  # not a weight: left alone, not reported

    def forward(self, x):
        return nn.functional.linear(x, self.proj_weight)


def _mixed():
    return nn.Sequential(nn.Embedding(10, 6), _HandWritten(), nn.Linear(4, 3))


def test_unknown_matrix_weights_are_named_and_strict_raises_before_changing_anything():
    net = _mixed()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"1 matrix weight\(s\) would stay in float: 1\.proj_weight \(_Hand"):
        deepshift.convert_(net, QConfig(), strict=True)
    assert not deepshift.shift_tensors(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.warns(UserWarning, match=r"left 1 matrix weight\(s\).*1\.proj_weight"):
        deepshift.convert_(net, QConfig())
    assert [n for n, _ in deepshift.float_weights(net)] == ["1.proj_weight"]
    assert deepshift.summary(net).splitlines()[-1] == "1 matrix weights left in float: 1.proj_weight"


def test_strict_counts_what_filter_fn_and_depth_leave_out():
    net = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # layers left out on purpose: no warning
        deepshift.convert_(copy.deepcopy(net), QConfig(), depth=1)
    assert [n for n, _ in deepshift.float_weights(deepshift.convert_(copy.deepcopy(net), QConfig(),
                                                                      depth=1))] == ["0.weight"]
    kept = deepshift.convert_(copy.deepcopy(net), QConfig(), filter_fn=lambda m, n: n != "1")
    assert [n for n, _ in deepshift.float_weights(kept)] == ["1.weight_ih_l0", "1.weight_hh_l0"]
    with pytest.raises(ValueError, match="1.weight_ih_l0"):
        deepshift.convert_(net, QConfig(), filter_fn=lambda m, n: n != "1", strict=True)
    assert not deepshift.shift_tensors(net)


def test_freeze_and_exporters_refuse_recurrent_weights(tmp_path):
    net = nn.Sequential(nn.Linear(6, 6), nn.GRU(6, 4))
    deepshift.convert_(net, PSConfig(weight_bits=5))
    before = copy.deepcopy(net.state_dict())
    message = r"cannot freeze converted recurrent weights \(1\.weight_ih_l0, 1\.weight_hh_l0\)"
    with pytest.raises(ValueError, match=message):
        deepshift.freeze_(net)
    with pytest.raises(ValueError, match=message):
        deepshift.save_packed(net, tmp_path / "m.dshift")
    with pytest.raises(ValueError, match=message):
        deepshift.export_onnx(net, torch.randn(2, 6), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=message):
        deepshift.savings_report(net, (6,))
    assert not list(tmp_path.iterdir())
    assert deepshift.is_shift_layer(net[0]) and deepshift.is_shift_layer(net[1])  # left as it was
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_summary_and_parameter_counts_include_the_new_tensors():
    from deepshift.training.evaluate import count_parameters

    net = deepshift.convert_(nn.MultiheadAttention(8, 2), QConfig(weight_bits=4))
    names = [line.split()[0] for line in deepshift.summary(net).splitlines()[1:-1]]
    assert names == ["in_proj_weight", "out_proj"]
    counts = count_parameters(net)
    assert counts["shift_weights"] == 3 * 8 * 8 + 8 * 8
    assert counts["float_parameters"] == 3 * 8 + 8  # the biases
