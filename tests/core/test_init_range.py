"""PS from scratch (the paper's init), per-layer ``max_shift="auto"`` windows and the clamp warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import LAYER_NAMES, make_layer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deepshift
from deepshift.core.convert import auto_max_shift, layer_shift_range, scaled_shift_interval
from deepshift.core.quantize import q_shift_sign
from deepshift.frozen.freeze import freeze_layer

METHODS = {"q": deepshift.QConfig, "ps": deepshift.PSConfig}


def _ps_params(layer):
    p = deepshift.shift_parameters(layer)
    return p["shift"].detach(), p["sign"].detach()


def test_ps_from_scratch_has_the_papers_distribution():
    torch.manual_seed(0)
    layer = deepshift.convert_(nn.Linear(400, 300), deepshift.PSConfig(weight_bits=5), init="scratch")
    shift, sign = _ps_params(layer)
    # shift ~ U(-10, -1), sign ~ U(-1, 1): bounds, means and quartiles of 120,000 draws.
    assert -10 <= float(shift.min()) and float(shift.max()) <= -1
    assert abs(float(shift.mean()) + 5.5) < 0.05
    q = torch.quantile(shift.flatten()[:100000], torch.tensor([0.25, 0.75]))
    assert torch.allclose(q, torch.tensor([-7.75, -3.25]), atol=0.05)
    assert -1 <= float(sign.min()) and float(sign.max()) <= 1 and abs(float(sign.mean())) < 0.01
    # About half the weights start in the zero band |sign| < 0.5.
    w = deepshift.effective_weight(layer)
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    # Not on integers: a step of the usual size moves weights across rounding boundaries.
    assert float((shift - shift.round()).abs().mean()) > 0.2


@pytest.mark.parametrize("bits, interval", [(4, (-6.5, -1.0)), (3, (-2.5, -1.0)), (2, (-0.5, 0.5))])
def test_ps_from_scratch_interval_is_cut_to_the_window(bits, interval):
    torch.manual_seed(0)
    layer = deepshift.convert_(nn.Linear(300, 200), deepshift.PSConfig(weight_bits=bits), init="scratch")
    shift, _ = _ps_params(layer)
    lo, hi = interval
    assert lo <= float(shift.min()) < lo + 0.01 and hi - 0.01 < float(shift.max()) <= hi
    assert abs(float(shift.mean()) - (lo + hi) / 2) < 0.02


@pytest.mark.parametrize("bits", [5, 3, 2])
def test_ps_from_scratch_with_auto_windows_has_he_scale(bits):
    torch.manual_seed(0)
    fan_in = 784
    layer = deepshift.convert_(nn.Linear(fan_in, 512), deepshift.PSConfig(weight_bits=bits, max_shift="auto"),
                               init="scratch")
    p_min, p_max = layer_shift_range(layer)
    shift, _ = _ps_params(layer)
    assert p_min - 0.5 <= float(shift.min()) and float(shift.max()) <= p_max + 0.5
    lo, hi = scaled_shift_interval(fan_in)
    if bits == 5:  # the whole 9-octave interval fits the window: mean square 2 / fan_in
        assert lo >= p_min - 0.5 and hi <= p_max + 0.5
        ms = float(deepshift.effective_weight(layer).square().mean())
        assert 0.7 < ms / (2 / fan_in) < 1.5
    assert abs(float((deepshift.effective_weight(layer) == 0).float().mean()) - 0.5) < 0.01


def test_scaled_interval_matches_he_variance_exactly_in_expectation():
    for fan_in in (9, 25, 784, 4608):
        lo, hi = scaled_shift_interval(fan_in)
        assert hi - lo == 9
        mean_square = 0.5 * (4.0**hi - 4.0**lo) / ((hi - lo) * math.log(4.0))  # E[2^(2U)], half zero
        assert math.isclose(mean_square, 2 / fan_in, rel_tol=1e-12)


def test_from_weights_keeps_the_exact_conversion():
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    w = layer.weight.detach().clone()
    deepshift.convert_(layer, deepshift.PSConfig(weight_bits=5))
    q_shift, q_sign = q_shift_sign(w, (-14, 0))
    shift, sign = _ps_params(layer)
    assert torch.equal(shift, q_shift) and torch.equal(sign, torch.sign(w))
    with pytest.raises(ValueError, match="init='random'.*weights, scratch"):
        deepshift.convert_(nn.Linear(2, 2), deepshift.PSConfig(), init="random")


def test_q_from_scratch_keeps_the_models_own_init():
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    w = layer.weight.detach().clone()
    deepshift.convert_(layer, deepshift.QConfig(), init="scratch")
    assert torch.equal(deepshift.shift_parameters(layer)["weight"].detach(), w)


def _brute_force_window(w: torch.Tensor, cfg) -> int:
    errors = {}
    for p_max in range(-16, 17):
        shift, sign = q_shift_sign(w.double(), cfg.range_below(p_max))
        errors[p_max] = float((w.double() - sign * torch.exp2(shift)).square().sum())
    return min(errors.values())


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.floats(-12, 6), st.integers(0, 2**16))
def test_auto_window_has_the_least_rounding_error(bits, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(300, generator=g, dtype=torch.float64) * 2.0**log_scale
    cfg = deepshift.QConfig(weight_bits=bits, max_shift="auto")
    p_max = auto_max_shift(w, cfg)
    shift, sign = q_shift_sign(w, cfg.range_below(p_max))
    err = float((w - sign * torch.exp2(shift)).square().sum())
    assert err <= _brute_force_window(w, cfg) * (1 + 1e-12)


def test_auto_window_of_zero_or_empty_weights_is_zero():
    cfg = deepshift.PSConfig(max_shift="auto")
    assert auto_max_shift(torch.zeros(5, 5), cfg) == 0
    assert auto_max_shift(torch.zeros(0), cfg) == 0


@pytest.mark.parametrize("method", ["q", "ps"])
def test_auto_window_follows_the_layer_scale(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        net[0].weight.mul_(64.0)  # reaches 2**3 and beyond
        net[1].weight.mul_(1 / 64)
    deepshift.convert_(net, METHODS[method](weight_bits=3, max_shift="auto"))
    top0, top1 = layer_shift_range(net[0])[1], layer_shift_range(net[1])[1]
    assert top0 >= 3 and top1 <= -7 and top0 - top1 >= 10
    for layer in net:
        w = deepshift.effective_weight(layer)
        p_min, p_max = layer_shift_range(layer)
        mags = w[w != 0].abs().log2()
        assert float(mags.min()) >= p_min and float(mags.max()) <= p_max
    assert "(auto)" in repr(net[0].parametrizations.weight[0])
    assert f"[{layer_shift_range(net[0])[0]}, {top0}]" in deepshift.summary(net)


@pytest.mark.parametrize("method", ["q", "ps"])
def test_auto_window_round_trips_through_the_state_dict(method):
    torch.manual_seed(0)
    cfg = METHODS[method](weight_bits=3, max_shift="auto")
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[0].weight.mul_(20.0)
    deepshift.convert_(net, cfg, init="scratch")
    state = net.state_dict()
    assert "0.parametrizations.weight.0.max_shift" in state
    other = deepshift.convert_(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), cfg)
    assert layer_shift_range(other[0]) != layer_shift_range(net[0])
    other.load_state_dict(state)
    for a, b in zip(net, other, strict=True):
        if deepshift.is_shift_layer(a):
            assert layer_shift_range(a) == layer_shift_range(b)
            assert torch.equal(deepshift.effective_weight(a), deepshift.effective_weight(b))
    x = torch.randn(4, 6)
    assert torch.equal(net.eval()(x), other.eval()(x))
    # A fixed-window model has no such buffer: its checkpoints stay as they were.
    fixed = deepshift.convert_(nn.Linear(3, 2), METHODS[method]())
    assert not any("max_shift" in k for k in fixed.state_dict())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("method", ["q", "ps"])
@pytest.mark.parametrize("name", LAYER_NAMES[::2])
def test_frozen_auto_window_layers_equal_float64_simulation(name, method, bits):
    layer, x = make_layer(name)
    with torch.no_grad():  # a scale the fixed window [-R, 0] could not hold
        layer.weight.mul_(2.0 ** (bits - 4) * 13)
    cfg = METHODS[method](weight_bits=bits, max_shift="auto", act_bits=(8, 6))
    deepshift.convert_(layer, cfg, init="scratch" if bits % 2 else "weights")
    layer.eval()
    frozen = freeze_layer(layer)
    assert frozen.config["max_shift"] == layer_shift_range(layer)[1]
    expected = layer.double()((x * 5).double())
    assert torch.equal(frozen((x * 5).double()), expected)
    assert not any(p.is_floating_point() for p in frozen.state_dict().values())


def _auto_model(method: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():
        model[4].weight.mul_(40.0)
    deepshift.convert_(model, METHODS[method](weight_bits=3, max_shift="auto"))
    return model.eval()


@pytest.mark.parametrize("method", ["q", "ps"])
def test_auto_window_round_trips_through_the_packed_file(tmp_path, method):
    model = _auto_model(method)
    x = torch.randn(5, 1, 6, 6)
    ranges = [layer_shift_range(m) for _, m, _ in deepshift.shift_layers(model)]
    deepshift.save_packed(model, tmp_path / "m.dshift")
    expected = deepshift.freeze_(model)(x)
    skeleton = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 3))
    loaded = deepshift.load_packed(tmp_path / "m.dshift", model=skeleton)
    assert torch.equal(loaded(x), expected)
    assert [loaded[0].config["max_shift"], loaded[4].config["max_shift"]] == [r[1] for r in ranges]
    assert ranges[1][1] >= 2  # the offset is real: beyond the paper's fixed p_max = 0


@pytest.mark.parametrize("method", ["q", "ps"])
def test_auto_window_round_trips_through_onnx(tmp_path, method):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _auto_model(method)
    frozen = deepshift.freeze_(model)
    x = torch.randn(6, 1, 6, 6)
    path = deepshift.export_onnx(frozen, x[:1], tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (torch.from_numpy(got) - frozen(x)).abs().max() <= 1e-5


def test_fixed_window_that_clamps_warns_once_naming_the_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        net[0].weight.mul_(30.0)
        net[2].weight.mul_(30.0)
    with pytest.warns(UserWarning, match=r"max_shift=0 .* 2 layer\(s\) .*: 0 \(\d+\.\d%\), 2 \(") as rec:
        deepshift.convert_(net, deepshift.QConfig())
    assert len(rec) == 1 and "max_shift='auto'" in str(rec[0].message)


@pytest.mark.parametrize("config, init", [
    (deepshift.QConfig(), "weights"),  # a fresh layer's weights fit the paper's window
    (deepshift.PSConfig(max_shift="auto"), "weights"),  # the window follows the weights
    (deepshift.PSConfig(), "scratch"),  # nothing of the weights is kept
])
def test_no_clamp_warning_where_nothing_is_clamped(config, init):
    net = nn.Linear(10, 10)
    if init == "scratch" or config.auto_range:
        with torch.no_grad():
            net.weight.mul_(30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deepshift.convert_(net, config, init=init)


@pytest.mark.parametrize("bad, match", [
    ("sometimes", "max_shift must be 'auto' or an int"),
    (2.5, "max_shift must be 'auto' or an int"),
    (True, "max_shift must be 'auto' or an int"),
    (17, "max_shift=17 is out of range"),
    (-40, "max_shift=-40 is out of range"),
])
@pytest.mark.parametrize("cls", [deepshift.QConfig, deepshift.PSConfig])
def test_bad_max_shift_is_a_config_error(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(max_shift=bad)


def test_auto_config_has_no_global_range_and_round_trips_as_a_dict():
    cfg = deepshift.PSConfig(weight_bits=3, max_shift="auto")
    with pytest.raises(ValueError, match="layer_shift_range"):
        _ = cfg.shift_range
    assert cfg.range_below(-4) == (-6, -4)
    assert deepshift.config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_q_from_scratch_places_its_window_for_he_scale_with_headroom(bits):
    from deepshift.core.convert import SCRATCH_WINDOW_TOLERANCE, he_scaled

    torch.manual_seed(0)
    cfg = deepshift.QConfig(weight_bits=bits, max_shift="auto")
    fresh = nn.Linear(784, 256)
    w = fresh.weight.detach().clone()
    scaled = he_scaled(w)
    assert math.isclose(float(scaled.double().std()), math.sqrt(2 / 784), rel_tol=1e-6)
    deepshift.convert_(fresh, cfg, init="scratch")
    assert layer_shift_range(fresh)[1] == auto_max_shift(scaled, cfg, SCRATCH_WINDOW_TOLERANCE)
    # Converting the same weights as trained ones keeps the least-error window of the weights
    # themselves, which lies below: PyTorch's default init is 1/2.45 of He's standard deviation.
    trained = nn.Linear(784, 256)
    with torch.no_grad():
        trained.weight.copy_(w)
    deepshift.convert_(trained, cfg)
    assert layer_shift_range(trained)[1] == auto_max_shift(w, cfg)
    assert layer_shift_range(trained)[1] < layer_shift_range(fresh)[1]
