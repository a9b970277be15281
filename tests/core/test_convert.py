"""convert_ on every layer type, both methods, every bit width; purity, determinism, state_dict."""

import copy
import io

import pytest
import torch
from conftest import LAYER_NAMES, make_layer
from torch import nn

import deepshift
from deepshift import PSConfig, QConfig

CONFIGS = [cls(weight_bits=b) for cls in (QConfig, PSConfig) for b in range(2, 9)]


def cfg_id(cfg):
    return f"{cfg.method}{cfg.weight_bits}"


def assert_signed_powers_of_two(w: torch.Tensor, cfg, allow_zero: bool):
    p_min, p_max = cfg.shift_range
    nonzero = w != 0
    if not allow_zero:
        assert nonzero.all()
    p = torch.log2(w[nonzero].abs())
    assert torch.equal(p, p.round()), "not an exact power of two"
    assert p.min() >= p_min and p.max() <= p_max


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_every_layer_type_uses_exact_signed_powers_of_two(name, cfg):
    layer, x = make_layer(name)
    float_weight = layer.weight.detach().clone()
    with torch.no_grad():  # exact zeros must survive conversion without -inf/NaN
        layer.weight.view(-1)[::7] = 0.0
        float_weight.view(-1)[::7] = 0.0
    deepshift.convert_(layer, cfg)
    assert deepshift.is_shift_layer(layer) and deepshift.shift_config(layer) == cfg
    layer.eval()
    w = deepshift.effective_weight(layer)
    assert w.shape == float_weight.shape and w.dtype == float_weight.dtype
    assert torch.equal(layer.weight, w)  # what forward uses is exactly the reported weight
    assert_signed_powers_of_two(w, cfg, allow_zero=cfg.method == "ps")
    zeros = float_weight == 0
    if cfg.method == "ps":
        assert (w[zeros] == 0).all()
    else:
        assert (w[zeros] == 2.0 ** cfg.shift_range[0]).all()  # Q: the nearest value it has
    # signs of non-zero weights are kept
    assert torch.equal(torch.sign(w[~zeros]), torch.sign(float_weight[~zeros]))
    out = layer(x)
    assert torch.isfinite(out).all()
    # the converted layer computes exactly its own module's function with the shift weight
    ref = copy.deepcopy(layer)
    nn.utils.parametrize.remove_parametrizations(ref, "weight", leave_parametrized=True)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("cls", [QConfig, PSConfig])
def test_pretrained_powers_of_two_convert_exactly(name, cls):
    cfg = cls(weight_bits=5)
    layer, x = make_layer(name)
    lo, hi = cfg.shift_range
    with torch.no_grad():
        p = torch.randint(lo, hi + 1, layer.weight.shape).float()
        s = torch.where(torch.rand(layer.weight.shape) < 0.5, -1.0, 1.0)
        layer.weight.copy_(s * torch.exp2(p))
    before = layer(x)
    deepshift.convert_(layer, cfg).eval()
    assert torch.equal(deepshift.effective_weight(layer), s * torch.exp2(p))
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_subclasses_are_converted_and_isinstance_survives():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(2, 3, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 2, 5, 5))  # initialise the lazy layer
    deepshift.convert_(model, QConfig())
    assert isinstance(model[0], MyConv) and isinstance(model[0], nn.Conv2d)
    assert [n for n, _, _ in deepshift.shift_layers(model)] == ["0", "2"]


def test_lazy_uninitialised_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="lazy"):
        deepshift.convert_(nn.Sequential(nn.LazyLinear(3)), QConfig())


def test_depth_converts_the_last_layers_and_filter_chooses():
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                             nn.Linear(4, 8), nn.Linear(8, 2))

    names = lambda m: [n for n, _, _ in deepshift.shift_layers(m)]  # noqa: E731
    assert names(deepshift.convert_(net(), QConfig(), depth=2)) == ["4", "5"]
    assert names(deepshift.convert_(net(), QConfig(), depth=0)) == []
    assert names(deepshift.convert_(net(), QConfig(), depth=100)) == ["0", "2", "4", "5"]
    only_linear = lambda m, n: isinstance(m, nn.Linear)  # noqa: E731
    assert names(deepshift.convert_(net(), PSConfig(), filter_fn=only_linear)) == ["4", "5"]
    convs = lambda m, n: isinstance(m, nn.Conv2d)  # noqa: E731
    assert names(deepshift.convert_(net(), PSConfig(), filter_fn=convs, depth=1)) == ["2"]
    # converting again leaves existing shift layers (and their config) alone
    m = deepshift.convert_(net(), QConfig(weight_bits=3), depth=1)
    deepshift.convert_(m, PSConfig())
    assert [c.method for _, _, c in deepshift.shift_layers(m)] == ["ps", "ps", "ps", "q"]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="depth"):
            deepshift.convert_(net(), QConfig(), depth=bad)
    with pytest.raises(TypeError, match="QConfig or PSConfig"):
        deepshift.convert_(net(), {"method": "q"})


@pytest.mark.parametrize("cfg", [QConfig(rounding="stochastic", act_bits=(3, 5)),
                                 PSConfig(rounding="stochastic", act_bits=(4, 4))], ids=cfg_id)
def test_forward_is_pure_and_eval_is_deterministic(cfg):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    deepshift.convert_(model, cfg)
    with torch.no_grad():  # fractional PS parameters, as after some training
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 0.4)
    x = torch.randn(4, 2, 5, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = model(x)
    out.sum().backward()
    model.eval()
    a, b = model(x), model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in forward"
    assert torch.equal(a, b)
    # stochastic rounding does happen in training: two training passes differ
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("cfg", [QConfig(act_bits=(3, 5)), PSConfig(weight_bits=4, act_bits=(2, 6))],
                         ids=cfg_id)
def test_same_input_and_bias_rule_for_every_layer_type(cfg):
    for name in LAYER_NAMES:
        layer, x = make_layer(name, torch.float64)
        deepshift.convert_(layer, cfg).eval()
        if layer.bias is not None:
            b = layer.bias
            assert torch.equal(b, deepshift.fixed_point(b, cfg.act_bits))
        # The layer equals its own float function applied to the fixed-point input and bias.
        out = layer(x)  # before the copy: deepcopy shares the parametrized class with `ref`
        ref = copy.deepcopy(layer)
        for tensor in ("weight", "bias"):
            if nn.utils.parametrize.is_parametrized(ref, tensor):
                nn.utils.parametrize.remove_parametrizations(ref, tensor, leave_parametrized=True)
        ref._forward_pre_hooks.clear()
        xq = deepshift.fixed_point(x, cfg.act_bits)
        assert not torch.equal(xq, x)
        torch.testing.assert_close(out, ref(xq), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("cfg", [QConfig(weight_bits=4, act_bits=(4, 4)), PSConfig(freeze_sign=True)],
                         ids=cfg_id)
def test_state_dict_round_trip_gives_identical_outputs(cfg):
    def net():
        return nn.Sequential(nn.Conv2d(1, 3, 3, groups=1), nn.BatchNorm2d(3), nn.ReLU(),
                             nn.Flatten(), nn.Linear(27, 4))

    model = deepshift.convert_(net(), cfg)
    opt = torch.optim.Adam(deepshift.param_groups(model, lr=0.05))
    x = torch.randn(8, 1, 5, 5)
    for _ in range(3):  # move away from the initial values
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        deepshift.clamp_parameters_(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = deepshift.convert_(net(), cfg)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_freeze_sign_and_param_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    deepshift.convert_(model, PSConfig(freeze_sign=True), depth=1)
    sign = deepshift.shift_parameters(model[2])["sign"]
    assert not sign.requires_grad
    groups = deepshift.param_groups(model, lr=0.1, weight_decay=1e-4, lr_sign=0.01)
    assert [g["name"] for g in groups] == ["params", "shift"]  # frozen sign left out
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 1e-4
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(sign) not in ids and len(ids) == 4  # Linear 0 weight+bias, shift, bias of layer 2

    model = deepshift.convert_(nn.Linear(3, 3), PSConfig())
    groups = {g["name"]: g for g in deepshift.param_groups(model, lr=0.1, lr_sign=0.01)}
    assert groups["sign"]["lr"] == 0.01 and groups["shift"]["lr"] == 0.1
    with pytest.raises(ValueError, match="lr"):
        deepshift.param_groups(model, lr=0)


def test_clamp_parameters_projects_ps_into_range():
    layer = deepshift.convert_(nn.Linear(3, 2), PSConfig(weight_bits=3))
    params = deepshift.shift_parameters(layer)
    with torch.no_grad():
        params["shift"].fill_(5.0)
        params["sign"].fill_(-3.0)
    deepshift.clamp_parameters_(layer)
    assert (params["shift"] == 0).all() and (params["sign"] == -1).all()


def test_summary_lists_each_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    deepshift.convert_(model, PSConfig(weight_bits=4, act_bits=(3, 5)), depth=1)
    text = deepshift.summary(model)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[1].split()[:5] == ["2", "Linear", "3x8", "PS", "4"]
    assert "3.5" in lines[1]
    assert lines[2].startswith("1 shift tensors, 24 shift weights, ")
    assert "23 float parameters" in lines[2]  # conv 18 + 2 bias, linear bias 3
    assert lines[3] == "1 matrix weights left in float: 0.weight"  # the conv, left out by depth=1


@pytest.mark.parametrize("cfg", [QConfig(act_bits=(4, 4)), PSConfig(act_bits=(4, 4))], ids=cfg_id)
def test_eval_cache_follows_every_parameter_change(cfg):
    layer = deepshift.convert_(nn.Linear(6, 3), cfg).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)  # served from the cache, same value
        for p in layer.parameters():  # an in-place update (what optimizers do) invalidates it
            p.mul_(-1.0)
        flipped = layer(x)
    assert not torch.equal(flipped, first)
    fresh = deepshift.convert_(nn.Linear(6, 3), cfg).eval()
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), flipped)
    # with gradients on, nothing is cached and gradients still reach the parameters
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    # Calling eval() again (as every evaluation loop does) keeps the rounded weight; train() drops it.
    with torch.no_grad():
        cached = layer.weight
        assert layer.eval().weight is cached
        layer.train()
        assert layer.parametrizations.weight[0]._cache_value is None
        assert layer.eval().weight is not cached


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "enable_grad"])
@pytest.mark.parametrize("method", ["q", "ps"])
def test_models_made_under_any_grad_mode_convert_freeze_and_run(mode, method):
    # Parameters created under torch.inference_mode are inference tensors without a version
    # counter: the eval-time cache must not key on it.
    cfg = {"q": deepshift.QConfig, "ps": deepshift.PSConfig}[method](act_bits=(8, 8), max_shift="auto")
    with getattr(torch, mode)():
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        deepshift.convert_(model, cfg)
    model.eval()
    x = torch.randn(5, 4)
    with torch.inference_mode():
        simulated = model(x)
        assert torch.equal(model(x), simulated)  # the second call (cached where allowed) agrees
    with torch.no_grad():
        assert torch.equal(model(x), simulated)
    frozen = deepshift.freeze_(model)
    with torch.inference_mode():
        assert torch.equal(frozen(x), simulated)
