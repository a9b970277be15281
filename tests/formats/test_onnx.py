"""ONNX export: standard ops only, exact against the frozen model."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYER_NAMES, make_layer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deepshift
from deepshift.formats.onnx import _F32_EXACT, MAX_PLANE_CALLS, OnnxShiftLayer, _plane_plan, exportable
from deepshift.models import build_model

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra (deepshift[onnx])")
onnx = pytest.importorskip("onnx", reason="onnx is an optional extra (deepshift[onnx])")


def digits_images(size: int, channels: int, n: int = 200) -> torch.Tensor:
    """Real test images: scikit-learn's digits, resized to the model's input."""
    sk = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")
    x = torch.tensor(sk.load_digits().images[-n:], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.3) / 0.4).repeat(1, channels, 1, 1)


def run_onnx(path, x):
    return torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("name, size, channels, cfg", [
    ("mnist-fc", 28, 1, deepshift.QConfig(act_bits=(4, 8))),
    ("mnist-conv", 28, 1, deepshift.PSConfig()),
    ("resnet20", 32, 3, deepshift.PSConfig(weight_bits=4)),
])
def test_onnxruntime_matches_the_frozen_model_on_real_images(tmp_path, name, size, channels, cfg):
    torch.manual_seed(0)
    model = build_model(name)
    for m in model.modules():  # trained-looking BatchNorm statistics, not the identity of a fresh one
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model = deepshift.convert_(model, cfg).eval()
    frozen = deepshift.freeze_(model)
    x = digits_images(size, channels)
    expected = frozen(x)
    path = deepshift.export_onnx(frozen, x[:1], tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert {n.domain for n in graph.graph.node} <= {""}, "only standard ONNX operators"
    got = run_onnx(path, x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # Shift layers are exact, and freeze_ puts BatchNorm and pooling in runtime-independent
    # forms (deepshift.frozen_float), so the criterion's 1e-5 holds with room to spare.
    assert (got - expected).abs().max() <= 1e-5


def test_weights_only_mode_is_the_float_simulation(tmp_path):
    torch.manual_seed(0)
    model = deepshift.convert_(build_model("mnist-conv"), deepshift.QConfig()).eval()
    x = digits_images(28, 1, 50)
    path = deepshift.export_onnx(model, x[:1], tmp_path / "w.onnx", mode="weights")
    # A converted model is exported as its frozen copy: power-of-two weights and each bias in the
    # frozen layer's fixed point (DEFAULT_ACT_BITS here), with float activations.
    simulated = copy.deepcopy(model)
    frac = deepshift.DEFAULT_ACT_BITS[1]
    with torch.no_grad():
        for _, layer, _ in deepshift.shift_layers(simulated):
            layer.bias.copy_(torch.round(layer.bias * 2**frac) / 2**frac)
    torch.testing.assert_close(run_onnx(path, x), simulated(x).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fixed_point, fixed_point_float64, weights"):
        deepshift.export_onnx(model, x[:1], tmp_path / "bad.onnx", mode="int")


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_layer_type_exports(tmp_path, name):
    layer, x = make_layer(name)
    deepshift.convert_(layer, deepshift.PSConfig(act_bits=(4, 6)))
    frozen = deepshift.freeze_(layer.eval())
    path = deepshift.export_onnx(frozen, x[:1], tmp_path / "l.onnx")
    torch.testing.assert_close(run_onnx(path, x), frozen(x), rtol=0, atol=1e-5)


EXACT_LAYERS = [n for n in LAYER_NAMES if not n.startswith("convT")]  # ConvTranspose: float32 by design


@pytest.mark.parametrize("name", EXACT_LAYERS)
@pytest.mark.parametrize("cfg", [deepshift.QConfig(weight_bits=5, act_bits=(8, 8)),
                                 deepshift.PSConfig(weight_bits=3, act_bits=(4, 4)),
                                 deepshift.QConfig(weight_bits=2, act_bits=(2, 6))], ids=["q5", "ps3", "q2"])
def test_both_exact_modes_give_the_frozen_layer_bit_for_bit(tmp_path, name, cfg):
    """The default mode's float32 calls (byte planes x weight groups) and the float64 form compute
    the frozen layer exactly under onnxruntime, inputs that saturate the fixed point included."""
    layer, x = make_layer(name)
    frozen = deepshift.freeze_(deepshift.convert_(layer, cfg).eval())
    x = torch.cat([x, 40 * x, x / 50])  # saturating, ordinary and tiny inputs
    expected = frozen(x)
    for mode in ("fixed_point", "fixed_point_float64"):
        path = deepshift.export_onnx(frozen, x[:1], tmp_path / f"{mode}.onnx", mode=mode)
        assert torch.equal(run_onnx(path, x), expected), mode
        kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
        stand_in = next(m for m in exportable(frozen, mode).modules() if isinstance(m, OnnxShiftLayer))
        if mode == "fixed_point":
            assert stand_in.groups, "these layers fit the float32 calls"
            assert "Conv" in kinds or name.startswith("linear")
        else:
            assert not stand_in.groups and "Conv" not in kinds


@pytest.mark.parametrize("bits", [5, 3])
def test_resnet20_exports_exactly_in_both_modes(tmp_path, bits):
    """A whole frozen network (the default (8, 8) activations: 5-bit weights take several weight
    groups per layer, 3-bit ones one or two: single calls that onnxruntime would fuse with the
    BatchNorm after them, and pairs whose Add it would fuse into the second call's accumulator, were
    they not fenced) under onnxruntime: the frozen model's logits bit for bit in both exact modes."""
    model = build_model("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    frozen = deepshift.freeze_(deepshift.convert_(model, deepshift.QConfig(weight_bits=bits)).eval())
    x = digits_images(32, 3, 16)
    for mode in ("fixed_point", "fixed_point_float64"):
        path = deepshift.export_onnx(frozen, x[:1], tmp_path / f"{mode}.onnx", mode=mode)
        assert torch.equal(run_onnx(path, x), frozen(x)), mode
    calls = [len(m.groups) * (1 + m.plane_split) for m in exportable(frozen).modules()
             if isinstance(m, OnnxShiftLayer)]
    assert all(calls)  # every layer as float32 calls: single ones (3 bits), pairs and more (5 bits)
    assert {1} <= set(calls) if bits == 3 else {2, 3} <= set(calls), calls


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 4), st.integers(0, 6), st.integers(1, 9), st.integers(0, 9),
       st.integers(0, 2**31 - 1))
def test_plane_plan_keeps_every_sum_exact(fan_in, outputs, low_exp, span, frac, seed):
    """For random power-of-two weights and activation widths, every group of the plan keeps its
    largest possible sum within float32's exact integers, the groups cover each exponent once, and
    the worst-case input (every q at its extreme, signed like the weights) gives the float64 sum."""
    gen = torch.Generator().manual_seed(seed)
    exps = torch.randint(low_exp, low_exp + span, (outputs, fan_in), generator=gen)
    signs = torch.randint(0, 3, (outputs, fan_in), generator=gen) - 1  # zeros too
    weight = signs * torch.exp2(exps.double() - 20)
    act = (max(1, 16 - frac), frac)
    plan = _plane_plan(weight, act)
    if plan is None:
        return
    split, groups = plan
    used = sorted({int(e) for e in torch.log2(weight.abs()[weight != 0]).tolist()})
    covered = [e for lo, hi in groups for e in used if lo <= e <= hi]
    assert covered == used and all(lo <= hi for lo, hi in groups)
    assert len(groups) * (2 if split else 1) <= MAX_PLANE_CALLS
    lo_q, hi_q = deepshift.core.quantize.fixed_point_limits(act)
    for glo, ghi in groups:
        inside = (weight.abs() >= 2.0**glo) & (weight.abs() <= 2.0**ghi)
        w = torch.where(inside, weight * 2.0**-glo, torch.zeros_like(weight))
        q = torch.where(w > 0, float(hi_q), float(lo_q)).float()  # the largest sums of this group
        planes = [torch.floor(q / 256), q - 256 * torch.floor(q / 256)] if split else [q]
        for plane in planes:
            assert float((plane.abs() * w.abs()).sum(1).max()) <= _F32_EXACT
            assert torch.equal((plane * w.float()).sum(1).double(), (plane.double() * w).sum(1))


@pytest.mark.parametrize("act", [(8, 0), (4, 4), (8, 8), (12, 9), (13, 10)])
def test_the_exported_rounding_is_half_to_even_with_saturation(tmp_path, act):
    """The float32 graph rounds x * 2**F by adding and subtracting 1.5 * 2**23 (or by Round where
    the range is too wide for that): ties to even, both signs, values at and far beyond the range's
    ends and infinities, exactly as the frozen layer rounds them."""
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    cfg = deepshift.QConfig(act_bits=act)
    frozen = deepshift.freeze_(deepshift.convert_(nn.Sequential(layer), cfg).eval())
    lo, hi = deepshift.core.quantize.fixed_point_limits(act)
    ties = torch.arange(-6, 7) + 0.5
    ends = torch.tensor([lo - 0.5, lo - 0.6, hi + 0.5, hi + 0.4, 2.0**22 + 1, -(2.0**22) - 3, 2.0**23 + 5,
                         1e30, -1e30, 0.0, -0.3])
    values = torch.cat([ties, ties + 1e-3, ties - 1e-3, ends])
    x = torch.cat([values * 2.0 ** -act[1], torch.tensor([math.inf, -math.inf])]).float().unsqueeze(1)
    path = deepshift.export_onnx(frozen, x[:1], tmp_path / "r.onnx")
    expected = frozen(x)
    assert torch.equal(run_onnx(path, x), expected)
    want = torch.clamp(torch.round(x.double() * 2.0 ** act[1]), lo, hi) * 2.0 ** -act[1]
    assert torch.equal(expected.double(), want)


def test_a_layer_beyond_float32_takes_the_float64_form(tmp_path):
    """A fan-in so wide that even one power of two's sum can leave float32's exact integers:
    the default mode exports that layer in float64, still exact."""
    layer = nn.Linear(70_000, 2)
    with torch.no_grad():
        layer.weight.fill_(2.0**-4)
    cfg = deepshift.QConfig(act_bits=(8, 8))
    frozen = deepshift.freeze_(deepshift.convert_(nn.Sequential(layer), cfg).eval())
    stand_in = next(m for m in exportable(frozen).modules() if isinstance(m, OnnxShiftLayer))
    assert not stand_in.groups
    x = torch.full((2, 70_000), 127.0)
    x[1] = -128.0
    path = deepshift.export_onnx(frozen, x[:1], tmp_path / "wide.onnx")
    assert torch.equal(run_onnx(path, x), frozen(x))
    # an input wider than float32's exact integers, even on a small layer
    assert _plane_plan(torch.ones(2, 3), (13, 13)) is None
    assert _plane_plan(torch.ones(2, 3), (12, 12)) is not None


def test_the_file_holds_codes_not_float_weights(tmp_path):
    torch.manual_seed(0)
    frozen = deepshift.freeze_(deepshift.convert_(build_model("mnist-fc"), deepshift.QConfig()).eval())
    path = deepshift.export_onnx(frozen, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")
    packed = deepshift.save_packed(frozen, tmp_path / "m.dshift")
    weights = 784 * 512 + 512 * 512 + 512 * 10
    graph = onnx.load(str(path))
    uint8 = sum(len(t.raw_data) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    assert uint8 == weights  # one byte per weight
    # a byte per 5-bit code: 1.6x the packed file, against 8 bytes per weight as float64 constants
    assert os.path.getsize(path) < 1.7 * packed < weights * 4


# ---- Integer-only models -----------------------------------------------------------------------


def _trained_bn(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics that are not the identity (a few training-mode forwards)."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x + 0.5 * torch.randn_like(x))
    return net.eval()


class _PoolNet(nn.Module):
    """Max pooling as a module and functionally (with padding), padding modes, groups, a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1, padding_mode="reflect")
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 3, stride=2, padding=1)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("name, cfg", [
    ("resnet20", deepshift.QConfig(weight_bits=5)),   # BatchNorm, residual adds, global pooling
    ("resnet20", deepshift.PSConfig(weight_bits=3, act_bits=(4, 4))),
    ("mnist-conv", deepshift.QConfig(weight_bits=4)),  # functional max pooling
    ("pool-net", deepshift.PSConfig(weight_bits=5)),
])
def test_onnxruntime_runs_integer_only_models_bit_for_bit(tmp_path, name, cfg):
    torch.manual_seed(0)
    if name == "pool-net":
        net, x = _PoolNet(), torch.randn(4, 2, 12, 12)
    else:
        net = build_model(name, in_channels=1 if name == "mnist-conv" else None)
        x = torch.randn(4, 1, 28, 28) if name == "mnist-conv" else torch.randn(4, 3, 32, 32)
    frozen = deepshift.freeze_(deepshift.convert_(_trained_bn(net, x), cfg))
    model = deepshift.integer_only(frozen, x[:1])
    path = deepshift.export_onnx(model, x[:1], tmp_path / "int.onnx")
    graph = onnx.load(path).graph
    # int64 from the input's rounding to the logits: no float op but the ends
    float_ops = {"Conv", "Gemm", "MaxPool", "BatchNormalization"}
    assert not float_ops & {n.op_type for n in graph.node}
    for scale in (0.5, 1.0, 4.0, 1000.0):  # 1000: every input saturates
        inputs = torch.randn(7, *x.shape[1:]) * scale
        with torch.no_grad():
            expected = model(inputs)
        assert torch.equal(run_onnx(path, inputs), expected), (name, scale)


def test_exported_rounding_shift_equals_the_reference_on_int64(tmp_path):
    # Mod, Div and comparisons in onnxruntime: round half to even, negative values, left shifts
    # (negative amounts), amounts 0 and 40, values near 2**62.
    from deepshift.formats.onnx import _round_shift, _shift_pair
    from deepshift.ops.reference import round_shift

    amounts = torch.tensor([0, 1, 2, 3, 7, 40, -1, -3])

    class Shift(nn.Module):
        def forward(self, x):
            left, div = _shift_pair(amounts)
            return _round_shift(x, left, div)

    g = torch.Generator().manual_seed(5)
    x = torch.randint(-(2**20), 2**20, (500, 8), generator=g)
    x[:40] = torch.arange(-20, 20).unsqueeze(1)  # every tie of the small amounts
    x[40, :6] = 2**61 + 2**39  # a tie at 40 bits
    x[41, :6] = -(2**61) - 2**39 - 1
    expected = round_shift(x, amounts)
    assert torch.equal(Shift()(x), expected)
    path = tmp_path / "shift.onnx"
    torch.onnx.export(Shift(), (x,), path, input_names=["input"], dynamo=False, opset_version=17)
    assert torch.equal(run_onnx(path, x), expected)


def test_integer_only_export_refuses_transposed_convolutions(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.ConvTranspose2d(2, 1, 3))
    frozen = deepshift.freeze_(deepshift.convert_(net, deepshift.QConfig()))
    x = torch.randn(1, 1, 8, 8)
    model = deepshift.integer_only(frozen, x)
    with pytest.raises(ValueError, match="transposed"):
        deepshift.export_onnx(model, x, tmp_path / "t.onnx")
    assert not (tmp_path / "t.onnx").exists()
