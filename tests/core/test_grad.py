"""The paper's gradients: Q straight-through, PS shift/sign formulas; gradcheck where smooth."""

import math

import pytest
import torch
from conftest import LAYER_NAMES, make_layer

import deepshift
from deepshift import PSConfig, QConfig
from deepshift.core.quantize import ps_weight, q_weight

LN2 = math.log(2.0)


def test_ps_gradients_equal_the_paper_formulas_on_a_hand_case():
    shift = torch.tensor([-1.2, 0.3, -2.6, -0.2], dtype=torch.float64, requires_grad=True)
    sign = torch.tensor([0.8, -0.6, -1.0, 0.2], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([2.0, 3.0, -1.0, 5.0], dtype=torch.float64)
    w = ps_weight(shift, sign, (-14, 0))
    # p = [-1, 0, -3, 0], s = [1, -1, -1, 0]
    assert w.tolist() == [0.5, -1.0, -0.125, 0.0]
    (w * upstream).sum().backward()
    # dL/dshift = dL/dW * s * 2**p * ln2 ; dL/dsign = dL/dW (not scaled by 2**p)
    expected_shift = [2.0 * 0.5 * LN2, 3.0 * -1.0 * LN2, -1.0 * -0.125 * LN2, 0.0]
    torch.testing.assert_close(shift.grad, torch.tensor(expected_shift, dtype=torch.float64))
    assert sign.grad.tolist() == [2.0, 3.0, -1.0, 5.0]


def test_ps_shift_gradient_is_the_derivative_of_the_smooth_relaxation():
    # At integer shifts, s * 2**shift is the smooth function PS rounds; gradcheck it, then check
    # that ps_weight's straight-through gradient equals that function's analytical gradient.
    shift = torch.randint(-6, 1, (12,)).double().requires_grad_()
    s = torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)
    smooth = lambda t: s * torch.exp2(t)  # noqa: E731
    assert torch.autograd.gradcheck(smooth, (shift,))
    (g_smooth,) = torch.autograd.grad(smooth(shift).sum(), shift)
    (g_ps,) = torch.autograd.grad(ps_weight(shift, s.clone(), (-14, 0)).sum(), shift)
    torch.testing.assert_close(g_ps, g_smooth, rtol=1e-12, atol=0)


def test_q_straight_through_is_the_identity():
    w = (torch.randn(50, dtype=torch.float64) * 2).requires_grad_()
    upstream = torch.randn(50, dtype=torch.float64)
    (q_weight(w, (-7, 0)) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    w.grad = None
    (q_weight(w, (-7, 0), stochastic=True) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("cfg", [QConfig(weight_bits=4), PSConfig(weight_bits=5)],
                         ids=["q4", "ps5"])
def test_gradcheck_shift_layers_in_float64(name, cfg):
    layer, x = make_layer(name, torch.float64)
    deepshift.convert_(layer, cfg)
    x.requires_grad_()
    # Smooth in the input (and bias): the layer is linear in both for fixed shift weights.
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,), fast_mode=True)
    # and the weight's gradient reaches the stored parameters through the paper's estimators
    layer(x).sum().backward()
    for p in deepshift.shift_parameters(layer).values():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_layer_weight_gradient_matches_manual_formula():
    layer = deepshift.convert_(torch.nn.Linear(5, 3).double(), PSConfig())
    x = torch.randn(7, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    params = deepshift.shift_parameters(layer)
    w = deepshift.effective_weight(layer)
    y = x @ w.T + layer.bias
    dW = (2 * y).T @ x  # dL/dW of sum(y**2)
    torch.testing.assert_close(params["shift"].grad, dW * w * LN2)
    torch.testing.assert_close(params["sign"].grad, dW)
