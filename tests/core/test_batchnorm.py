"""BatchNorm scales as sums of signed powers of two and the BatchNorm-aware fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deepshift
from deepshift.core.batchnorm import (
    _rounded_forward,
    batchnorm_scale,
    finetune_batchnorm_,
    power_terms,
    round_batchnorm_scales_,
    terms_value,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():  # statistics and affine values far from 1, as a trained model has
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.05, 3.0)
            bn.weight.uniform_(0.3, 2.0)
            bn.bias.uniform_(-0.3, 0.3)
    return net


def _data(n_batches: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (16,), generator=g)
        x = torch.randn(16, 1, 8, 8, generator=g) * 0.3
        x[:, :, :3] += y.view(-1, 1, 1, 1).float()  # a learnable signal: the class brightens the top rows
        out.append((x, y))
    return out


def _mean_loss(model, data) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=16),
       st.lists(st.floats(1e-4, 1e2), min_size=16, max_size=16),
       st.integers(1, 8), st.booleans())
def test_a_rounded_scale_stored_as_a_float32_weight_decomposes_into_the_same_terms(gammas, vars_, terms, neg):
    # The fine-tune stores each rounded scale as a float32 BatchNorm weight; the integer conversion
    # reads the weight back and must find exactly the scale the fine-tune trained with.
    w = torch.tensor(gammas) * (-1 if neg else 1)
    var = torch.tensor(vars_[: len(gammas)])
    std = torch.sqrt(var.double() + 1e-5)
    target = terms_value(*power_terms(w.double() / std, terms))
    stored = (target * std).float()
    again = power_terms(stored.double() / std, terms)
    assert torch.equal(terms_value(*again), target)
    assert int((again[0] != 0).sum(0).max()) <= terms


def test_power_terms_drop_terms_below_the_span_of_the_leading_one():
    signs, exps = power_terms(torch.tensor([1.0 + 2.0**-21, 1.0 + 2.0**-19]), 2)
    assert terms_value(signs, exps).tolist() == [1.0, 1.0 + 2.0**-19]


def test_round_batchnorm_scales_makes_each_scale_a_k_term_sum_and_keeps_statistics():
    net = _net()
    before = copy.deepcopy(net)
    round_batchnorm_scales_(net, 2)
    for bn, old in ((net[1], before[1]), (net[4], before[4])):
        scale = batchnorm_scale(bn)
        assert torch.equal(terms_value(*power_terms(scale, 2)), terms_value(*power_terms(scale, 8)))
        assert torch.equal(bn.running_var, old.running_var) and torch.equal(bn.bias, old.bias)
        assert not torch.equal(bn.weight, old.weight)  # the scales were not sums of two powers already


def test_rounded_forward_is_eval_batchnorm_with_the_rounded_weight_and_a_straight_through_gradient():
    bn = _net()[1].eval()
    x = torch.randn(4, 6, 5, 5)
    y = _rounded_forward(bn, 1, x)
    rounded = round_batchnorm_scales_(copy.deepcopy(nn.Sequential(bn)), 1)[0]
    assert torch.equal(y, rounded(x))
    y.square().sum().backward()
    grad = bn.weight.grad.clone()
    w = rounded.weight.detach().clone().requires_grad_()
    y2 = F.batch_norm(x, bn.running_mean, bn.running_var, w, bn.bias.detach(), False, 0.0, bn.eps)
    y2.square().sum().backward()
    assert torch.allclose(grad, w.grad)  # d/dweight passes the rounding unchanged


@pytest.mark.parametrize("method", ["q", "ps"])
def test_finetune_trains_with_rounded_scales_and_leaves_them_rounded(method):
    net = _net()
    cfg = deepshift.QConfig(weight_bits=4) if method == "q" else deepshift.PSConfig(weight_bits=4)
    deepshift.convert_(net, cfg, init="weights")
    data = _data()
    net.train()
    net[6].eval()  # a mode of its own, which the fine-tune must give back
    stats = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in (net[1], net[4])]
    rounded_before = _mean_loss(round_batchnorm_scales_(copy.deepcopy(net).eval(), 1), data)
    info = finetune_batchnorm_(net, data, scale_terms=1, steps=40, lr=3e-3)
    assert info["steps"] == 40  # the six batches, read again until the steps are done
    assert net.training and net[1].training and not net[6].training
    for bn, (mean, var) in zip((net[1], net[4]), stats, strict=True):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        scale = batchnorm_scale(bn).detach()
        one = terms_value(*power_terms(scale, 1))  # one power of two each, up to the float32 weight
        assert torch.equal(one, terms_value(*power_terms(scale, 8)))
        assert float(((scale - one) / one).abs().max()) < 2.0**-23
    assert _mean_loss(net.eval(), data) < rounded_before
    # the integer-only model with 1 term computes what it computes with 8: nothing left to round
    frozen = deepshift.freeze_(copy.deepcopy(net))
    x = torch.cat([x for x, _ in data[:2]])
    one = deepshift.integer_only(frozen, x[:4], scale_terms=1)
    eight = deepshift.integer_only(frozen, x[:4], scale_terms=8)
    assert torch.equal(one(x), eight(x))


def test_finetune_reads_an_iterator_once():
    net = _net()
    info = finetune_batchnorm_(net, iter(_data(3)), scale_terms=2, steps=10)
    assert info["steps"] == 3


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"scale_terms": 0}, "scale_terms"), ({"scale_terms": 9}, "scale_terms"),
    ({"scale_terms": True}, "scale_terms"), ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
])
def test_finetune_rejects_bad_options_before_touching_the_model(kwargs, needle):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    args = {"scale_terms": 1, **kwargs}
    with pytest.raises(ValueError, match=needle):
        finetune_batchnorm_(net, _data(1), **args)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_finetune_refuses_frozen_models_and_models_without_batchnorm():
    net = deepshift.convert_(_net(), deepshift.QConfig(weight_bits=4), init="weights").eval()
    with pytest.raises(ValueError, match="before freeze_"):
        finetune_batchnorm_(deepshift.freeze_(net), _data(1), scale_terms=1)
    with pytest.raises(ValueError, match="no BatchNorm"):
        finetune_batchnorm_(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), _data(1), scale_terms=1)


def test_finetune_errors_on_batchnorm_without_statistics_and_on_no_batches():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        finetune_batchnorm_(net, _data(1), scale_terms=1)
    with pytest.raises(ValueError, match="no batch"):
        finetune_batchnorm_(_net(), [], scale_terms=1)


def test_finetune_stops_on_a_non_finite_loss():
    net = _net()
    x, y = _data(1)[0]
    with pytest.raises(FloatingPointError, match="diverged"):
        finetune_batchnorm_(net, [(x * float("nan"), y)], scale_terms=1, steps=3)
    assert "forward" not in net[1].__dict__  # the patched forward is removed again
