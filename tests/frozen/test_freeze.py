"""freeze_: frozen layers equal the float64 simulated layers exactly, for every layer type and option."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import LAYER_NAMES, make_layer
from torch import nn

import deepshift
from deepshift.frozen.freeze import DEFAULT_ACT_BITS, freeze_layer
from deepshift.frozen.layers import ShiftConvNd, ShiftLinear

METHODS = {"q": deepshift.QConfig, "ps": deepshift.PSConfig}


pytestmark = pytest.mark.usefixtures("one_thread")


def _simulated_and_frozen(layer: nn.Module, cfg) -> tuple[nn.Module, nn.Module]:
    deepshift.convert_(layer, cfg)
    layer.eval()
    frozen = freeze_layer(layer)
    return layer.double(), frozen


def _spread_weights(layer: nn.Module, seed: int, zeros: bool = True) -> None:
    """Weights over several octaves (and some exact zeros), so many shift values are used.

    Q maps an exact zero to ``2**p_min`` (it has no zero code), which with 8 bits would span
    shifts [-127, 0], too wide for exact int64 (tested separately): no zeros for Q.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = layer.weight
        mag = torch.exp2(-torch.rand(w.shape, generator=g) * 12)
        sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
        w.copy_(sign * mag * ((torch.rand(w.shape, generator=g) > 0.1) | (not zeros)))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 3)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("method", ["q", "ps"])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_frozen_layer_equals_float64_simulation(name, method, bits):
    layer, x = make_layer(name)
    _spread_weights(layer, seed=bits * 7 + len(name), zeros=method == "ps")
    act_bits = [(8, 8), (4, 6), (3, 5), (12, 10)][bits % 4]
    sim, frozen = _simulated_and_frozen(layer, METHODS[method](weight_bits=bits, act_bits=act_bits))
    # Inputs well beyond the fixed-point range too, so saturation is exercised.
    x = (x * 6).double()
    expected = sim(x)
    got = frozen(x)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected), (got - expected).abs().max()
    # float32 input: the exact result rounded once to float32.
    assert torch.equal(frozen(x.float()), expected.float())
    assert not any(p.is_floating_point() for p in frozen.state_dict().values())


def _random_conv(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    dims = rng.choice([1, 2, 3])
    transposed = rng.random() < 0.4
    groups = rng.choice([1, 1, 2, 3])
    c_in = groups * rng.randint(1, 3)
    c_out = groups * rng.randint(1, 3)
    k = tuple(rng.randint(1, 3) for _ in range(dims))
    stride = tuple(rng.randint(1, 3) for _ in range(dims))
    dilation = tuple(rng.randint(1, 2) for _ in range(dims))
    sizes = tuple(rng.randint(3, 7) + (dilation[d] * (k[d] - 1)) for d in range(dims))
    bias = rng.random() < 0.7
    if transposed:
        padding = tuple(rng.randint(0, dilation[d] * (k[d] - 1)) for d in range(dims))
        output_padding = tuple(rng.randint(0, max(stride[d], dilation[d]) - 1) for d in range(dims))
        cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1]
        layer = cls(c_in, c_out, k, stride=stride, padding=padding, output_padding=output_padding,
                    groups=groups, dilation=dilation, bias=bias)
    else:
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        if rng.random() < 0.3:
            padding, stride = "same", (1,) * dims
        else:
            padding = tuple(rng.randint(0, min(2, sizes[d] - 1)) for d in range(dims))
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]
        layer = cls(c_in, c_out, k, stride=stride, padding=padding, groups=groups, dilation=dilation,
                    bias=bias, padding_mode=mode)
    return layer, (rng.randint(1, 2), c_in, *sizes)


@pytest.mark.parametrize("seed", range(40))
def test_random_convolutions(seed):
    rng = random.Random(seed)
    layer, shape = _random_conv(rng)
    method = rng.choice(["q", "ps"])
    _spread_weights(layer, seed, zeros=method == "ps")
    bits = rng.randint(2, 8)
    cfg = METHODS[method](weight_bits=bits, act_bits=(rng.randint(2, 8), rng.randint(0, 8)))
    sim, frozen = _simulated_and_frozen(layer, cfg)
    assert isinstance(frozen, ShiftConvNd)
    x = torch.randn(shape, dtype=torch.float64) * 3
    expected = sim(x)
    assert frozen.output_shape(tuple(shape)) == tuple(expected.shape)
    assert torch.equal(frozen(x), expected), repr(layer)


def test_linear_any_leading_shape_and_unbatched_conv():
    lin = nn.Linear(5, 3)
    sim, frozen = _simulated_and_frozen(lin, deepshift.QConfig(act_bits=(8, 8)))
    for shape in [(5,), (2, 5), (2, 3, 4, 5)]:
        x = torch.randn(shape, dtype=torch.float64)
        assert torch.equal(frozen(x), sim(x))
    conv = nn.Conv2d(2, 3, 3)
    sim, frozen = _simulated_and_frozen(conv, deepshift.PSConfig(act_bits=(8, 8)))
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    assert torch.equal(frozen(x), sim(x))


def test_post_training_act_bits_and_default():
    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64) * 2
    for act_bits in [None, (6, 10)]:
        trained = deepshift.convert_(copy.deepcopy(base), deepshift.QConfig(weight_bits=4))
        frozen = deepshift.freeze_(trained, act_bits=act_bits).double()
        # The same model converted *with* those act_bits is the simulation it must equal.
        bits = act_bits or DEFAULT_ACT_BITS
        sim = deepshift.convert_(copy.deepcopy(base), deepshift.QConfig(weight_bits=4, act_bits=bits))
        assert frozen[0].act_bits == bits
        assert torch.equal(frozen(x), sim.double().eval()(x))


def test_layer_trained_with_act_bits_keeps_them():
    net = deepshift.convert_(nn.Sequential(nn.Linear(3, 2)), deepshift.PSConfig(act_bits=(3, 5)))
    frozen = deepshift.freeze_(net, act_bits=(10, 10))
    assert frozen[0].act_bits == (3, 5)


def test_freeze_replaces_layers_and_root():
    net = deepshift.convert_(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2)),
                             deepshift.QConfig())
    out = deepshift.freeze_(net)
    assert out is net
    assert isinstance(net[0], ShiftConvNd) and isinstance(net[2], ShiftLinear)
    assert deepshift.shift_layers(net) == []
    # Nothing float is left of the shift layers.
    assert all(not v.is_floating_point() for k, v in net.state_dict().items())
    root = deepshift.convert_(nn.Linear(4, 2), deepshift.QConfig())
    assert isinstance(deepshift.freeze_(root), ShiftLinear)


def test_accumulator_choice_and_too_wide_shift_range():
    small = deepshift.convert_(nn.Linear(4, 2), deepshift.QConfig(act_bits=(4, 4)))
    assert freeze_layer(small).accumulator == "int32"
    big = deepshift.convert_(nn.Linear(4096, 2), deepshift.QConfig(act_bits=(16, 16)))
    assert freeze_layer(big).accumulator == "int64"
    # 8-bit Q spans shifts [-127, 0]; weights really using both ends cannot be exact in int64.
    wide = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        wide.weight.copy_(torch.tensor([[1.0, 2.0**-120, 0.5, -0.25]]))
    deepshift.convert_(wide, deepshift.QConfig(weight_bits=8))
    with pytest.raises(ValueError, match="int64"):
        freeze_layer(wide)
    # A narrow used range is fine even with 8-bit codes far from p_min.
    # No bias: a bias would be added in units of 2**(shift_lo - F), i.e. shifted left by 108.
    narrow = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        narrow.weight.copy_(torch.tensor([[2.0**-100, -(2.0**-98), 2.0**-99]]))
    deepshift.convert_(narrow, deepshift.QConfig(weight_bits=8, act_bits=(8, 8)))
    frozen = freeze_layer(narrow)
    assert (frozen.shift_lo, frozen.shift_hi) == (-100, -98)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(frozen(x), narrow.double().eval()(x))


def test_all_zero_ps_layer():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.zero_()
    sim, frozen = _simulated_and_frozen(layer, deepshift.PSConfig(act_bits=(8, 8)))
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(frozen(x), sim(x))


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.mark.parametrize("method", ["q", "ps"])
def test_frozen_cnn_classifies_digits_like_the_simulated_model(method):
    torch.manual_seed(0)
    x_train, y_train, x_test, _ = _digits()
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10),
    )
    deepshift.convert_(net, METHODS[method](weight_bits=5, act_bits=(4, 8)))
    opt = torch.optim.Adam(deepshift.param_groups(net, lr=0.01))
    for _ in range(30):
        idx = torch.randint(0, len(x_train), (64,))
        loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        deepshift.clamp_parameters_(net)
    net.eval()
    sim32_pred = net(x_test).argmax(1)
    sim64 = copy.deepcopy(net).double()
    frozen = deepshift.freeze_(net)
    with torch.no_grad():
        assert torch.equal(frozen(x_test).argmax(1), sim32_pred)
        assert torch.equal(copy.deepcopy(frozen).double()(x_test.double()), sim64(x_test.double()))
    # It learned something, so the comparison is not between two constant predictions.
    assert sim32_pred.unique().numel() >= 8


def test_saturation_and_nan():
    # Inputs far outside the fixed-point range saturate to the same integers as the simulation.
    # (I + F <= 24 here: the simulation's fixed_point rounds through float32 above that.)
    layer = nn.Linear(2, 2)
    sim, frozen = _simulated_and_frozen(layer, deepshift.QConfig(act_bits=(12, 12)))
    x = torch.tensor([[1e9, -1e9], [4000.0, 3.0]])
    assert torch.equal(frozen(x.double()), sim(x.double()))
    assert torch.equal(frozen(x), sim(x.double()).float())
    with pytest.raises(ValueError, match="NaN"):
        frozen(torch.tensor([[float("nan"), 0.0]]))


def test_shared_layer_is_frozen_everywhere():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    deepshift.convert_(net, deepshift.QConfig(act_bits=(8, 8)))
    x = torch.randn(2, 3, dtype=torch.float64)
    expected = copy.deepcopy(net).double().eval()(x)
    deepshift.freeze_(net)
    assert isinstance(net[0], ShiftLinear) and net[0] is net[2]
    assert torch.equal(net(x), expected)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_asymmetric_same_padding(mode):
    # Even kernels under padding="same" pad one more element on the right than on the left.
    layer = nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(1, 3), padding_mode=mode)
    sim, frozen = _simulated_and_frozen(layer, deepshift.PSConfig(weight_bits=4, act_bits=(5, 6)))
    x = torch.randn(2, 2, 5, 11, dtype=torch.float64)
    expected = sim(x)
    assert expected.shape[-2:] == x.shape[-2:]
    assert torch.equal(frozen(x), expected)
